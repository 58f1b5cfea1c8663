"""The README's Python examples run as written, in order, in one namespace (as a reader would)."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 3
    os.symlink(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)  # lightning_logs/ lands here
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as err:  # name the block in the failure
            raise AssertionError(f"README python block {i} failed:\n{block}") from err
    assert (tmp_path / "lightning_logs").is_dir()
