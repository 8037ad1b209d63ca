"""The `ddl` command: `ddl train | tokenizer | bench | compare | audit | convert-reference | export-reference`.

Each subcommand is a `main(argv) -> int` in its own module (`module:function` names another function);
modules are imported only when called so that `ddl --help` stays fast.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "train": ("ddl_hf.train", "pretrain or fine-tune a model with the HF Trainer (the main job)"),
    "tokenizer": ("ddl_hf.tokenization", "train a byte-level BPE tokenizer on text files"),
    "bench": ("ddl_hf.bench", "measure speed and memory of DDL variants against the additive baseline"),
    "compare": ("ddl_hf.compare", "train several variants x seeds on identical data and compare them"),
    "audit": ("ddl_hf.audit", "report how a trained model uses its gates (beta regimes, discrepancy)"),
    "convert-reference": ("ddl_hf.reference_checkpoints", "convert a checkpoint of the authors' code to ddl_hf"),
    "export-reference": (
        "ddl_hf.reference_checkpoints:export_main",
        "write a ddl_hf model as a state dict in the authors' naming",
    ),
}


def _usage() -> str:
    lines = ["usage: ddl <command> [options]", "", "commands:"]
    lines += [f"  {name:<18} {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    lines += ["", "`ddl <command> --help` describes each command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"ddl: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _, function = SUBCOMMANDS[command][0].partition(":")
    module = importlib.import_module(module_name)
    return int(getattr(module, function or "main")(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
