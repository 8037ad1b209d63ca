"""The README's ```python blocks run as written, in a temporary working directory.

```py blocks are sketches that need the reader's own model or files and are not run.
"""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(PYTHON_BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"readme_block_{index}"}
    exec(compile(PYTHON_BLOCKS[index], f"README.md[python block {index}]", "exec"), namespace)
