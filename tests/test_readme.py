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


def test_every_test_the_readme_cites_exists():
    """The docs (docs/guarantees.md above all) name tests as `tests/<file>.py::<name>` (and `::<name>` for the
    same file)."""
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    cited = 0
    for cell in re.findall(r"`(tests/[\w/]+\.py)::(\w+)`((?:, `::\w+`)*)", text):
        path, first, more = cell
        source = (ROOT / path).read_text()
        for name in [first, *re.findall(r"`::(\w+)`", more)]:
            cited += 1
            assert re.search(rf"^def {name}\(", source, flags=re.M), f"README cites {path}::{name}, which does not exist"
    assert cited > 30


def test_every_link_of_the_readme_and_docs_resolves():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
