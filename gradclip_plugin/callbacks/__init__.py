"""Lightning callbacks: thin layers over :mod:`gradclip_plugin.functional`."""

from gradclip_plugin.callbacks.base import ClipStats, GradientClipCallback
from gradclip_plugin.callbacks.clip import ClipByGlobalNorm, ClipByNorm, ClipByValue

__all__ = ["ClipByGlobalNorm", "ClipByNorm", "ClipByValue", "ClipStats", "GradientClipCallback"]
