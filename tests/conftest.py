import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("PL_DISABLE_FORK", "1")
# The zero-code entry point runs for every Trainer: a developer's own GRADCLIP_CONFIG must not leak in.
os.environ.pop("GRADCLIP_CONFIG", None)
warnings.filterwarnings("ignore", ".*does not have many workers.*")
