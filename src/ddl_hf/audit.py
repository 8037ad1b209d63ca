"""`ddl audit MODEL_DIR`: how a trained DDL model uses its gates, measured on held-out text.

Runs the saved model over validation blocks inside `record_delta_stats` (the public recording
API of `delta_stats`) and reports, for every layer and sublayer (attention, MLP): the beta
distribution (mean, std, quantiles, the fraction of tokens in the regimes skip beta < 0.1,
partial 0.1-0.9, match 0.9-1.1, over-relaxed > 1.1), the mean discrepancy of the readout
before and after the update (|e| = |k^T X - v^T|, |e'| = |k^T X' - v^T|) and their ratio,
and the mean norm of the value target |v|. Per depth it also reports the "logit lens" loss: the
next-token loss of `lm_head(norm(h))` for every width-d entry h of `output_hidden_states` (entry i
is the read of the state that block i takes; the last entry is the model's output, whose loss is the
validation loss).

Data: the validation split of the built-in corpus by default, or `--validation_file`, or the
validation split of `--dataset_name`; documents are tokenized and packed as in `ddl train`,
and the first `--num_batches` x `--batch_size` blocks are used, in order.

Writes `audit.json` (settings, validation loss on the audited blocks, one entry per shortcut)
and `audit.png` (beta-regime heatmap over layers x sublayers; discrepancy ratio per layer) to
`--output_dir` (default `MODEL_DIR/audit`), and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .command_line import reports_input_errors
from .data import (
    TXT_SAMPLE_BY,
    DataArguments,
    collate_blocks,
    load_documents,
    load_local_text_file,
    pack_into_blocks,
    tokenize_documents,
)
from .delta_stats import BETA_REGIMES, record_delta_stats
from .plots import label_axes, png_figure


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddl audit",
        description="Report how a trained DDL model uses its gates (beta regimes, discrepancy) on held-out text.",
    )
    parser.add_argument("model_dir", help="folder of a saved DDL model and its tokenizer (save_pretrained)")
    parser.add_argument(
        "--output_dir", default=None, help="where audit.json and audit.png go (default MODEL_DIR/audit)"
    )
    parser.add_argument("--validation_file", default=None, help="local .txt, .json, .jsonl or .parquet file")
    parser.add_argument(
        "--dataset_name", default=None, help="hub dataset (or local dataset folder); its validation split"
    )
    parser.add_argument("--dataset_config_name", default=None, help="configuration of --dataset_name")
    parser.add_argument("--text_column", default="text", help="column holding the documents' text")
    parser.add_argument("--txt_sample_by", default="document", choices=TXT_SAMPLE_BY, help="documents of a .txt file")
    parser.add_argument("--dataset_cache_dir", default=None, help="cache folder for datasets")
    parser.add_argument("--num_batches", type=int, default=16, help="batches of validation blocks to run")
    parser.add_argument("--batch_size", type=int, default=8, help="blocks per batch")
    parser.add_argument(
        "--block_size",
        type=int,
        default=None,
        help="tokens per block (default: the block size the model was trained with, from MODEL_DIR/metrics.json, "
        "else the `ddl train` default)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    return parser


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"--{name} must be an integer >= 1, got {value}")


def trained_block_size(model_dir: Path) -> int | None:
    """The block size in the model's `metrics.json` (written by `ddl train`), None without one."""
    metrics = model_dir / "metrics.json"
    if metrics.is_file():
        trained = json.loads(metrics.read_text(encoding="utf-8")).get("block_size")
        if trained:
            return int(trained)
    return None


def audit_block_size(block_size: int | None, model_dir: Path, config) -> int:
    """`--block_size`, else the one the model was trained with, else `ddl train`'s default for the model; checked
    against the model's context as `ddl train` checks it (`train.resolve_block_size`)."""
    from .train import resolve_block_size

    return resolve_block_size(DataArguments(block_size=block_size or trained_block_size(model_dir)), config)


def validation_documents(args: argparse.Namespace):
    """The held-out documents chosen by the data options."""
    if args.validation_file is not None:
        if args.dataset_name is not None:
            raise ValueError("give either --validation_file or --dataset_name, not both")
        return load_local_text_file(
            args.validation_file,
            text_column=args.text_column,
            argument="--validation_file",
            txt_sample_by=args.txt_sample_by,
            cache_dir=args.dataset_cache_dir,
        )
    data_args = DataArguments(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        text_column=args.text_column,
        dataset_cache_dir=args.dataset_cache_dir,
    )
    _, validation = load_documents(data_args)
    if validation is None:
        raise ValueError(
            f"{data_args.source_description} has no 'validation' split; pass held-out text with --validation_file"
        )
    return validation


def hidden_state_losses(model, hidden_states, input_ids: torch.Tensor) -> list[float]:
    """The mean next-token loss of `lm_head(norm(h))` for every entry h of `output_hidden_states` (the
    "logit lens"). The last entry is `last_hidden_state`, already normalized: its loss is the model's."""
    head, norm = model.get_output_embeddings(), model.model.norm
    targets = input_ids[:, 1:].reshape(-1)
    losses = []
    for i, hidden in enumerate(hidden_states):
        normed = hidden if i == len(hidden_states) - 1 else norm(hidden)
        logits = head(normed[:, :-1]).float()
        losses.append(float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)))
    return losses


def audit_model(model, blocks, batch_size: int, num_batches: int, device: torch.device) -> dict:
    """Run `model` over the first `num_batches` x `batch_size` of `blocks` (rows of `input_ids`) while
    recording; returns the summary, the number of tokens, the mean validation loss and the mean loss of
    every hidden state through the final norm and the LM head (`hidden_state_losses`)."""
    model.eval()
    rows = min(len(blocks), batch_size * num_batches)
    loss_sum, loss_tokens, depth_sums = 0.0, 0, None
    with torch.no_grad(), record_delta_stats(model) as stats:
        for start in range(0, rows, batch_size):
            batch = collate_blocks([blocks[i] for i in range(start, min(start + batch_size, rows))])
            input_ids = batch["input_ids"].to(device)
            output = model(input_ids=input_ids, labels=input_ids, output_hidden_states=True)
            predicted = input_ids.numel() - input_ids.shape[0]  # the last token of a block has no target
            loss_sum += float(output.loss) * predicted
            loss_tokens += predicted
            depth = [loss * predicted for loss in hidden_state_losses(model, output.hidden_states, input_ids)]
            depth_sums = depth if depth_sums is None else [a + b for a, b in zip(depth_sums, depth, strict=True)]
    return {
        "blocks": rows,
        "batches": math.ceil(rows / batch_size),
        "validation_loss": loss_sum / loss_tokens,
        "hidden_state_losses": [total / loss_tokens for total in depth_sums],
        "shortcuts": stats.summary(),
    }


def format_table(shortcuts: list[dict]) -> str:
    header = (
        f"{'layer':>5} {'sublayer':<9} {'beta mean':>9} {'q05':>6} {'q50':>6} {'q95':>6} "
        f"{'skip':>6} {'partial':>7} {'match':>6} {'over':>6} {'|e|':>8} {'|e_after|':>9} {'ratio':>6} {'|v|':>7}"
    )
    lines = [header, "-" * len(header)]
    for entry in shortcuts:
        if entry["tokens"] == 0:
            lines.append(f"{entry['layer']!s:>5} {entry['sublayer']!s:<9} (no tokens recorded)")
            continue
        beta, regimes, quantiles = entry["beta"], entry["beta"]["regimes"], entry["beta"]["quantiles"]
        ratio = entry["discrepancy_ratio"]
        lines.append(
            f"{entry['layer']!s:>5} {entry['sublayer']!s:<9} {beta['mean']:>9.3f} "
            f"{quantiles.get('0.05', math.nan):>6.3f} {quantiles.get('0.5', math.nan):>6.3f} "
            f"{quantiles.get('0.95', math.nan):>6.3f} "
            f"{regimes['skip']:>6.1%} {regimes['partial']:>7.1%} {regimes['match']:>6.1%} "
            f"{regimes['over_relaxed']:>6.1%} {entry['discrepancy_before']:>8.4f} {entry['discrepancy_after']:>9.4f} "
            f"{(ratio if ratio is not None else math.nan):>6.3f} {entry['value_norm']:>7.3f}"
        )
    return "\n".join(lines)


def plot_audit(shortcuts: list[dict], path: Path, title: str) -> None:
    """Two panels: fraction of tokens per beta regime for every (layer, sublayer), and the
    discrepancy ratio mean |e'| / mean |e| per layer, one line per sublayer."""
    recorded = [entry for entry in shortcuts if entry["tokens"] > 0]
    regimes = list(BETA_REGIMES)
    fractions = [[entry["beta"]["regimes"][name] for name in regimes] for entry in recorded]
    labels = [f"layer {entry['layer']} {entry['sublayer']}" for entry in recorded]
    with png_figure(
        path,
        1,
        2,
        suptitle=title,
        figsize=(12, max(3.0, 0.35 * len(recorded) + 1.5)),
        gridspec_kw={"width_ratios": [1.2, 1]},
    ) as (figure, (heat_axis, ratio_axis)):
        image = heat_axis.imshow(fractions, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        heat_axis.set_xticks(range(len(regimes)), ["skip\n<0.1", "partial\n0.1-0.9", "match\n0.9-1.1", "over\n>1.1"])
        heat_axis.set_yticks(range(len(labels)), labels)
        for row, values in enumerate(fractions):
            for column, value in enumerate(values):
                heat_axis.text(
                    column, row, f"{value:.0%}", ha="center", va="center", color="white" if value < 0.6 else "black"
                )
        heat_axis.set_title("fraction of tokens per beta regime")
        figure.colorbar(image, ax=heat_axis, fraction=0.046)
        for sublayer in ("attention", "mlp"):
            points = [
                (entry["layer"], entry["discrepancy_ratio"])
                for entry in recorded
                if entry["sublayer"] == sublayer and entry["discrepancy_ratio"] is not None
            ]
            if points:
                ratio_axis.plot(*zip(*points, strict=True), marker="o", label=sublayer)
        ratio_axis.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        ratio_axis.set_xticks(sorted({entry["layer"] for entry in recorded if entry["layer"] is not None}))
        ratio_axis.set_ylim(bottom=0.0)
        label_axes(ratio_axis, "layer", "mean |e'| / mean |e|", "discrepancy after / before the update", grid=False)


def run_audit(args: argparse.Namespace) -> dict:
    # The package's __init__ (imported with this module) registers the DDL Auto classes.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("num_batches", "batch_size", "block_size"):
        _check_positive(name, getattr(args, name))
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"MODEL_DIR {str(model_dir)!r} has no config.json: give the folder of a saved model")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
    config = model.config
    if getattr(config, "residual_mode", None) == "additive":
        raise ValueError(
            f"{str(model_dir)!r} is an additive baseline (residual_mode='additive'): it has no gates to audit"
        )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    block_size = audit_block_size(args.block_size, model_dir, config)
    documents = validation_documents(args)
    tokenized = tokenize_documents(documents, tokenizer, args.text_column)
    blocks = pack_into_blocks(tokenized, block_size)
    if len(blocks) == 0:
        raise ValueError(f"the validation text has fewer tokens than one block of --block_size {block_size}")
    wanted = args.num_batches * args.batch_size
    if len(blocks) < wanted:
        print(
            f"ddl audit: the validation text holds {len(blocks)} blocks of {block_size}, fewer than {wanted}; using all"
        )
    result = audit_model(model, blocks, args.batch_size, args.num_batches, device)
    return {
        "model_dir": str(model_dir),
        "variant": getattr(config, "variant_name", None),
        "block_size": block_size,
        "batch_size": args.batch_size,
        "num_batches_requested": args.num_batches,
        "tokens": result["blocks"] * block_size,
        "data": args.validation_file or args.dataset_name or "built-in corpus (validation split)",
        "beta_regimes": {name: list(bounds) for name, bounds in BETA_REGIMES.items()},
        **result,
    }


@reports_input_errors("audit")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = run_audit(args)
    output_dir = Path(args.output_dir or os.path.join(args.model_dir, "audit"))
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "audit.json").write_text(json.dumps(report, indent=2) + "\n")
    title = f"{report['variant']}: {report['tokens']} tokens, validation loss {report['validation_loss']:.4f}"
    plot_audit(report["shortcuts"], output_dir / "audit.png", title)
    print(format_table(report["shortcuts"]))
    depth = ", ".join(f"{i}: {loss:.4f}" for i, loss in enumerate(report["hidden_state_losses"]))
    print(f"\nloss of lm_head(norm(hidden_states[i])), i = block read (last = output): {depth}")
    print(f"\n{title}\nwrote {output_dir / 'audit.json'} and {output_dir / 'audit.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
