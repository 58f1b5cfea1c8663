"""The README's examples run as written: each Python block on its own, as a reader pastes it.

Each ```python block runs in a fresh interpreter, from a directory that holds the repository's
``examples`` (the blocks that use the example model put ``examples`` on ``sys.path`` themselves), so a
block that leans on another block's names fails here. The bash blocks are not run (they train for
minutes), but the files they name must exist.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_the_readme_has_its_python_examples():
    assert len(PYTHON_BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs_on_its_own(index, tmp_path):
    block = PYTHON_BLOCKS[index]
    os.symlink(ROOT / "examples", tmp_path / "examples")
    env = {k: v for k, v in os.environ.items() if k not in ("GRADCLIP_CONFIG", "PYTHONPATH")}
    result = subprocess.run(
        [sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"README python block {index} failed on its own:\n{block}\n{result.stderr[-3000:]}"


def test_the_files_the_readme_bash_blocks_name_exist():
    named = set(re.findall(r"\b((?:examples|benchmarks)/[\w./-]+\.(?:py|yaml))", "\n".join(BASH_BLOCKS)))
    assert "examples/train.py" in named
    for path in sorted(named):
        assert (ROOT / path).is_file(), f"a README bash block names {path}, which does not exist"


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
