"""The README's Python code blocks run as written (those that need files or a trained adapter are
skipped by a marker comment `# not run`)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "# not run" not in b]


def test_readme_has_python_blocks():
    assert BLOCKS, "README has no runnable python block"


# Users run the README with JAX's default promotion; its optax.adam is not strict-promotion clean.
@pytest.mark.standard_promotion
@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs(i, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(BLOCKS[i], f"README.md block {i}", "exec"), {"__name__": "__readme__"})
