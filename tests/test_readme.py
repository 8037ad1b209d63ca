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


def readme_figure(readme: str, pattern: str):
    found = re.findall(pattern, " ".join(readme.split()))
    assert len(found) == 1, (pattern, found)
    return found[0]


def check_main_job_figures(stdout: str, readme: str) -> None:
    """The final validation loss `ddl train` printed is the README's, at the top (2 decimals) and in "Results"
    (4 decimals, with the perplexity rounded)."""
    printed = re.search(r"final validation loss (\d+\.\d{4}) \| perplexity (\d+\.\d{2}) \|", stdout)
    assert printed is not None, stdout[-2000:]
    loss, perplexity = printed.group(1), float(printed.group(2))
    assert readme_figure(readme, r"final validation loss (\d+\.\d+)\):") == f"{float(loss):.2f}", loss
    training = readme_figure(readme, r"final validation loss (\d+\.\d+), perplexity (\d+)\)")
    assert training == (loss, f"{perplexity:.0f}"), (loss, perplexity)


@pytest.mark.slow
def test_the_first_command_gives_the_main_job_figures(tmp_path):
    """The README's first command, as a reader runs it (the installs done: this environment has them): `ddl train`
    in a fresh folder, offline, with the thread defaults of the `ddl` command; it prints the README's figures
    (`check_main_job_figures`). About 3 minutes on an idle 2-core CPU, 10 or more on a loaded one."""
    import shutil
    import subprocess

    from conftest import offline_env

    readme = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, flags=re.S).group(1).strip()
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
    check_main_job_figures(result.stdout, readme)
