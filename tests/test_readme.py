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


def readme_figure(pattern: str) -> str:
    found = re.findall(pattern, " ".join(README.read_text().split()))
    assert len(found) == 1, (pattern, found)
    return found[0]


@pytest.mark.slow
def test_the_first_command_gives_the_main_job_figures(tmp_path):
    """The README's first command, as a reader runs it (the installs done: this environment has them): `ddl train`
    in a fresh folder, offline, with the thread defaults of the `ddl` command. The final validation loss it prints is
    the one the README states at the top (2 decimals) and in "Training: `ddl train`" (4 decimals, with the
    perplexity rounded). About 3 minutes on an idle 2-core CPU, up to ~15 on a loaded one."""
    import shutil
    import subprocess

    from conftest import offline_env

    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1).strip()
    installs, _, command = first_block.rpartition(" && ")
    assert installs == "pip install torch==2.13.0 && pip install -e ." and command == "ddl train"
    ddl = shutil.which("ddl")
    assert ddl is not None, "the `ddl` command is installed by `pip install -e .`"
    result = subprocess.run(
        [ddl, "train"],
        cwd=tmp_path,
        env=offline_env(OMP_NUM_THREADS=None),  # the command's own thread default, as in a reader's shell
        capture_output=True,
        text=True,
        timeout=2400,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    printed = re.search(r"final validation loss (\d+\.\d{4}) \| perplexity (\d+\.\d{2}) \|", result.stdout)
    assert printed is not None, result.stdout[-2000:]
    loss, perplexity = printed.group(1), float(printed.group(2))
    assert readme_figure(r"final validation loss (\d+\.\d+)\):") == f"{float(loss):.2f}", loss
    training = readme_figure(r"final validation loss (\d+\.\d+), perplexity (\d+)\)")
    assert training == (loss, f"{perplexity:.0f}"), (loss, perplexity)
