"""The pages under docs/ stay true to the code (docs/development.md, "Documentation"):

- every ```python block runs as written, in a fresh namespace and a temporary working directory that holds tiny
  stand-ins of the files the pages name (`STANDINS`); blocks that compile (`torch.compile(`) are marked slow;
- the `ddl` commands of every ```bash block run (marked slow), page by page and in order in one working directory,
  with the flags of a tiny stand-in appended (`standin_flags`); `pip install` lines are skipped, and any other
  command fails the test: a sketch goes in a ```sh block;
- ```py and ```sh blocks are sketches that are not run (your own large model, several processes or GPUs, the network);
- the API reference documents every public name, the pages state the README's main-job figures, and the site
  builds with `mkdocs build --strict` (where the `docs` extra is installed).

docs/results/ holds published records (the commands that made them, at full size): its ```python blocks run, its
```bash blocks are not.
"""

import re
import shlex
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.rglob("*.md"))


def page_name(page: Path) -> str:
    return page.relative_to(DOCS).as_posix()


def fenced(page: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), flags=re.S | re.M)


PYTHON_BLOCKS = [
    pytest.param(
        page,
        code,
        id=f"{page_name(page)}[{index}]",
        marks=[pytest.mark.slow] if "torch.compile(" in code else [],
    )
    for page in PAGES
    for index, code in enumerate(fenced(page, "python"))
]
BASH_PAGES = [page for page in PAGES if fenced(page, "bash") and page.relative_to(DOCS).parts[0] != "results"]


# --------------------------------------------------------------------------- tiny stand-ins of what the pages name
def _texts(count: int, length: int) -> list[str]:
    from ddl_hf.data import builtin_corpus_documents

    return [text[:length] for _, text in builtin_corpus_documents("train")[:count]]


@pytest.fixture(scope="session")
def standins(tmp_path_factory):
    """One folder of stand-ins, copied into each working directory:

    - `my_text.jsonl`, `standin-val.jsonl`, `more.jsonl`, `corpus.txt`: a few standard-library sources;
    - `my-tokenizer/`, `standin-tokenizer/`: a byte-level BPE tokenizer of 300 tokens trained on them;
    - `runs/default/` and `path/to/ddl-model/`: what `ddl train --preset tiny` writes (model, tokenizer, card);
    - `ckpt.pt`: a tiny DDL-CC state dict in the authors' naming (`torch.save`);
    - `configs/`: the repository's.
    """
    import json

    import torch

    from ddl_hf import DDLConfig, DDLForCausalLM
    from ddl_hf.reference_checkpoints import to_reference_state_dict
    from ddl_hf.tokenization import train_bpe_tokenizer
    from ddl_hf.train import parse_args, run_training

    folder = tmp_path_factory.mktemp("docs_standins")
    texts = _texts(60, 1500)

    def jsonl(name, rows):
        (folder / name).write_text("".join(json.dumps({"text": text}) + "\n" for text in rows))

    jsonl("my_text.jsonl", texts[:48])
    jsonl("standin-val.jsonl", texts[48:56])
    jsonl("more.jsonl", texts[56:])
    (folder / "corpus.txt").write_text("\n\n".join(texts[:24]))
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    for name in ("my-tokenizer", "standin-tokenizer"):
        tokenizer.save_pretrained(folder / name)
    run_training(
        *parse_args(
            [
                "--preset",
                "tiny",
                "--tokenizer_name",
                str(folder / "my-tokenizer"),
                "--output_dir",
                str(folder / "runs" / "default"),
            ]
            + ["--train_file", str(folder / "my_text.jsonl"), "--validation_file", str(folder / "standin-val.jsonl")]
            + TRAIN_SIZE[2:]
            + ["--dataset_cache_dir", str(folder / "standin-cache")]
        )
    )
    shutil.rmtree(folder / "standin-cache")
    shutil.copytree(folder / "runs" / "default", folder / "path" / "to" / "ddl-model")
    torch.manual_seed(0)
    torch.save(to_reference_state_dict(DDLForCausalLM(DDLConfig.from_preset("tiny", "ddl-cc"))), folder / "ckpt.pt")
    return folder


def working_dir(standins: Path, target: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        shutil.copytree(standins / name, target / name) if (standins / name).is_dir() else shutil.copy(
            standins / name, target / name
        )
    (target / "configs").symlink_to(ROOT / "configs")
    return target


PYTHON_STANDINS = (
    "my_text.jsonl",
    "standin-val.jsonl",
    "more.jsonl",
    "corpus.txt",
    "my-tokenizer",
    "runs",
    "path",
    "ckpt.pt",
)
# No runs/ or my-tokenizer/: the pages' own commands make them.
BASH_STANDINS = ("my_text.jsonl", "standin-val.jsonl", "more.jsonl", "corpus.txt", "standin-tokenizer", "ckpt.pt")


# --------------------------------------------------------------------------- ```python blocks
def test_docs_have_python_examples():
    assert len(PYTHON_BLOCKS) >= 8


@pytest.mark.parametrize(("page", "code"), PYTHON_BLOCKS)
def test_docs_python_block_runs(page, code, standins, tmp_path, monkeypatch):
    monkeypatch.chdir(working_dir(standins, tmp_path, PYTHON_STANDINS))
    namespace: dict = {"__name__": "docs_block"}
    exec(compile(code, f"docs/{page_name(page)}[python block]", "exec"), namespace)


# --------------------------------------------------------------------------- ```bash blocks
# Appended to a command's own flags (the last occurrence of a flag wins): a tiny model, a few steps, small batches.
TRAIN_SIZE = [
    "--preset", "tiny", "--max_steps", "2", "--block_size", "32", "--per_device_train_batch_size", "2",
    "--per_device_eval_batch_size", "2", "--max_eval_samples", "2", "--eval_steps", "2", "--save_steps", "2",
    "--logging_steps", "1", "--warmup_steps", "0", "--report_to", "none", "--disable_tqdm", "true",
    "--sample_max_new_tokens", "0",
]  # fmt: skip
BENCH_SIZE = [
    "--preset", "tiny", "--seq_len", "16", "--batch_size", "2", "--repeats", "1", "--warmup", "0",
    "--decode_batch_sizes", "1", "--decode_prompt_len", "4", "--decode_tokens", "2", "--skip_memory",
]  # fmt: skip


def standin_flags(command: str, argv: list[str]) -> list[str]:
    """The flags that make `ddl COMMAND argv` a tiny run; where the command names no data or tokenizer of its own,
    the stand-in files instead of the built-in corpus and its tokenizer."""
    given = set(argv)
    data = []
    if not {"--train_file", "--dataset_name"} & given:
        data += ["--train_file", "my_text.jsonl", "--validation_file", "standin-val.jsonl"]
    if not {"--tokenizer_name", "--model_name_or_path"} & given:
        data += ["--tokenizer_name", "standin-tokenizer"]
    cache = ["--dataset_cache_dir", "standin-cache"]
    if command == "train":
        return TRAIN_SIZE + data + cache
    if command == "compare":
        return ["--seeds", "1", *TRAIN_SIZE, *data, *cache]
    if command == "audit":
        data = [] if {"--validation_file", "--dataset_name"} & given else ["--validation_file", "standin-val.jsonl"]
        return ["--num_batches", "1", "--batch_size", "2", "--block_size", "32", *data, *cache]
    if command == "bench":
        return BENCH_SIZE + (["--compile_backend", "eager"] if "--compile" in argv else [])
    if command in ("tokenizer", "convert-reference", "export-reference"):
        return []
    raise AssertionError(
        f"`ddl {command}` has no tiny stand-in in tests/test_docs.py: add one, or make it a ```sh sketch"
    )


def shell_commands(block: str) -> list[list[str]]:
    """The commands of a ```bash block: continuation lines joined, comments dropped, split at `&&`."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            end = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:end])
            words = words[end + 1 :]
    return [command for command in commands if command]


def runnable(command: list[str]) -> list[str] | None:
    """`ddl ...` as its argv (after any VAR=value prefix); None for `pip install ...`; anything else fails."""
    words = [word for word in command if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", word)]
    if words[:2] == ["pip", "install"]:
        return None
    assert words[0] == "ddl", (
        f"only `ddl` and `pip install` run in a ```bash block; make this a ```sh sketch: {command}"
    )
    return words[1:]


def test_bash_blocks_hold_only_commands_with_stand_ins():
    from ddl_hf.cli import SUBCOMMANDS

    seen = 0
    for page in BASH_PAGES:
        for block in fenced(page, "bash"):
            for command in shell_commands(block):
                argv = runnable(command)
                if argv is not None:
                    assert argv[0] in SUBCOMMANDS, (page_name(page), command)
                    standin_flags(argv[0], argv[1:])
                    seen += 1
    assert seen >= 10


@pytest.mark.slow
@pytest.mark.parametrize("page", BASH_PAGES, ids=page_name)
def test_docs_bash_commands_run_on_tiny_standins(page, standins, tmp_path, monkeypatch):
    from ddl_hf.cli import main

    monkeypatch.chdir(working_dir(standins, tmp_path, BASH_STANDINS))
    for block in fenced(page, "bash"):
        for command in shell_commands(block):
            argv = runnable(command)
            if argv is None:
                continue
            full = [*argv, *standin_flags(argv[0], argv[1:])]
            assert main(full) == 0, f"docs/{page_name(page)}: ddl {' '.join(full)}"


# --------------------------------------------------------------------------- what the pages state
def one_figure(text: str, pattern: str):
    found = re.findall(pattern, " ".join(text.split()))
    assert len(found) == 1, (pattern, found)
    return found[0]


@pytest.mark.parametrize(
    ("page", "pattern"),
    [
        ("index.md", r"final validation loss (\d+\.\d+)\):"),
        ("training.md", r"final validation loss (\d+\.\d+), perplexity (\d+)\)"),
    ],
)
def test_the_pages_state_the_readme_main_job_figures(page, pattern):
    assert one_figure((DOCS / page).read_text(), pattern) == one_figure(README.read_text(), pattern)


def test_the_api_reference_documents_every_public_name():
    import ddl_hf

    documented = set(re.findall(r"^::: ddl_hf\.(\w+)$", (DOCS / "api.md").read_text(), flags=re.M))
    assert documented == set(ddl_hf.__all__) - {"__version__"}


def test_every_page_is_in_the_site_navigation():
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def leaves(entries):
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            yield from leaves(value) if isinstance(value, list) else [value]

    # docs/results/ may hold pages that are not in the navigation (`not_in_nav`): published records.
    pages = {page_name(page) for page in PAGES if page.relative_to(DOCS).parts[0] != "results"}
    assert pages <= set(leaves(nav)) and "results/README.md" in set(leaves(nav))


def test_the_readme_is_a_short_front_door():
    if (ROOT / "README.new.md").exists():
        pytest.skip("README.new.md is not swapped in yet")
    assert len(README.read_text().splitlines()) <= 250


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="the `docs` extra is not installed")
    pytest.importorskip("mkdocstrings")
    import subprocess
    import sys

    from conftest import offline_env

    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=offline_env(NO_MKDOCS_2_WARNING="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
