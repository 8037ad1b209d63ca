"""`ddl compare`: train several variants x seeds on identical data and compare them.

    ddl compare --preset mini --variants baseline ddl-scalar ddl-cc write-only-cc --seeds 3 \\
        --max_steps 300 --output_dir runs/compare-mini [any `ddl train` data or training flag ...]

A variant is a preset variant (`ddl-cc`), or one with DDLConfig fields changed, written
`VARIANT:FIELD=VALUE[,FIELD=VALUE ...]` in the syntax of `--config_overrides` (which, passed through,
applies to every run). For example the authors' factored CC read against a freely learned one:

    ddl compare --preset mini --variants ddl-cc ddl-cc:compressor_form=free --reference ddl-cc \\
        --seeds 3 --max_steps 300 --output_dir runs/cc-read-forms

Every (variant, seed) is one `ddl train` run (`train.run_training`) in
`OUTPUT_DIR/runs/VARIANT/seed-S` (a `:` in the variant becomes `+` in the folder name), keeping its
final model and tokenizer. Runs of one seed use
the same `--seed`, so the Trainer shuffles the training blocks identically for every variant
(each run's `data_order/rank0.tsv` lists the hash of every batch, to check it); only the
initial weights differ, as they must between architectures. Flags that `ddl compare` sets
itself (`--preset`, `--variant`, `--seed`, `--data_seed`, `--max_steps`, `--output_dir`,
`--model_name_or_path`, `--config_name`) cannot be passed through.

Rerunning the same command skips finished runs (a `metrics.json` whose run arguments match)
and resumes unfinished ones from their last checkpoint; changed arguments stop with an error
naming them (`run_files.check_output_dir`).

Outputs in `OUTPUT_DIR`:

- `results.json`, `results.md`: per variant the final validation loss as mean +- sample std
  over seeds and per seed, perplexity exp(mean loss), parameters, tokens, training FLOPs per
  token (`flops.training_flops_per_token`: 2 FLOPs per multiply-add, backward = 2 x forward,
  causal attention at the mean context (T + 1) / 2), total training FLOPs, training wall time,
  and the difference to the `--reference` variant (default `baseline`) with a 95% interval: runs of one
  seed share their data order, so the per-seed differences d_s = loss(variant, s) - loss(reference, s) are
  paired and
  the interval is mean(d) +- t_{0.975, n-1} std(d) / sqrt(n) over the n seeds both have.
- `loss_vs_tokens.png`, `loss_vs_flops.png`: validation loss at every evaluation against
  training tokens and against cumulative training FLOPs; one colour per variant, the line is
  the mean over seeds and the band spans the lowest to the highest seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import statistics
import sys
from pathlib import Path

from .command_line import check_preset_arguments, reports_input_errors
from .models.ddl.configuration_ddl import PRESET_SIZES, PRESET_VARIANTS, DDLConfig
from .plots import color_cycle, label_axes, png_figure

DEFAULT_VARIANTS = ("baseline", "ddl-scalar", "ddl-cc", "write-only-cc")
DEFAULT_REFERENCE = "baseline"
# `VARIANT:FIELD=VALUE,...`: a preset variant with DDLConfig fields changed.
OVERRIDES_SEPARATOR = ":"
CONFIDENCE = 0.95
# `ddl train` flags that `ddl compare` sets for every run.
CONTROLLED_TRAIN_FLAGS = (
    "--preset",
    "--variant",
    "--seed",
    "--data_seed",
    "--max_steps",
    "--output_dir",
    "--model_name_or_path",
    "--config_name",
)
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
LOSS_VS_TOKENS_PNG, LOSS_VS_FLOPS_PNG = "loss_vs_tokens.png", "loss_vs_flops.png"


# --------------------------------------------------------------------------- statistics over seeds
def _t_central_probability(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer `df` >= 1 (closed form, Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    cos_sq = math.cos(theta) ** 2
    if df % 2 == 1:
        if df == 1:
            return 2.0 * theta / math.pi
        term, series = 1.0, 1.0
        for j in range(1, (df - 3) // 2 + 1):  # coefficients 2/3, 2*4/(3*5), ...
            term *= cos_sq * (2 * j) / (2 * j + 1)
            series += term
        return 2.0 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)
    term, series = 1.0, 1.0
    for j in range(1, (df - 2) // 2 + 1):  # coefficients 1/2, 1*3/(2*4), ...
        term *= cos_sq * (2 * j - 1) / (2 * j)
        series += term
    return math.sin(theta) * series


def t_quantile(probability: float, df: int) -> float:
    """The `probability` quantile of Student's t with integer `df` >= 1, for probability in (0.5, 1),
    by bisection on the closed-form distribution function (exact to float precision, no scipy)."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an integer >= 1, got {df!r}")
    if not 0.5 < probability < 1.0:
        raise ValueError(f"probability must lie in (0.5, 1), got {probability!r}")
    central = 2.0 * probability - 1.0
    low, high = 0.0, 1.0
    while _t_central_probability(high, df) < central:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if _t_central_probability(middle, df) < central:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def mean_and_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1 in the denominator; None for a single value)."""
    if not values:
        raise ValueError("mean_and_std needs at least one value")
    mean = float(statistics.mean(values))
    if len(values) == 1:
        return mean, None
    return mean, float(statistics.stdev(values))


def paired_difference(
    values_by_seed: dict[int, float], reference_by_seed: dict[int, float], confidence: float = CONFIDENCE
) -> dict | None:
    """`values - reference` over the seeds both have: mean, sample std and the t interval
    mean +- t_{(1 + confidence) / 2, n - 1} std / sqrt(n) (None bounds with a single seed).
    Returns None when no seed is shared."""
    seeds = sorted(set(values_by_seed) & set(reference_by_seed))
    if not seeds:
        return None
    differences = [values_by_seed[seed] - reference_by_seed[seed] for seed in seeds]
    mean, std = mean_and_std(differences)
    result = {"seeds": seeds, "mean": mean, "std": std, "confidence": confidence, "low": None, "high": None}
    if std is not None:
        half_width = t_quantile((1.0 + confidence) / 2.0, len(seeds) - 1) * std / math.sqrt(len(seeds))
        result.update(low=mean - half_width, high=mean + half_width)
    return result


# --------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddl compare",
        allow_abbrev=False,  # `--seed` and `--variant` are `ddl train` flags, not abbreviations of ours
        description=(
            "Train several variants x seeds with identical data order per seed, then compare final validation "
            "loss, FLOPs and wall time. Any other `ddl train` flag (data options, batch size, learning rate, "
            "--block_size, --eval_steps, ...) is passed to every run."
        ),
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(DEFAULT_VARIANTS),
        help=f"residual variants to train (default: {' '.join(DEFAULT_VARIANTS)}); allowed: {list(PRESET_VARIANTS)}",
    )
    parser.add_argument(
        "--reference",
        default=DEFAULT_REFERENCE,
        help="the variant every other one is compared with, seed by seed (default baseline; with the default, "
        "a comparison without baseline reports no differences)",
    )
    parser.add_argument("--preset", default="mini", help=f"model size preset: {list(PRESET_SIZES)} (default mini)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant: 0, 1, ..., N-1 (default 3)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max_steps", type=int, help="optimizer steps per run")
    budget.add_argument("--max_tokens", type=int, help="training tokens per run (rounded up to whole steps)")
    parser.add_argument("--output_dir", default="runs/compare", help="where runs and results go")
    return parser


def split_variant(variant: str) -> tuple[str, str | None]:
    """`"ddl-cc:compressor_form=free"` -> `("ddl-cc", "compressor_form=free")`; `"ddl-cc"` -> `("ddl-cc", None)`."""
    preset_variant, separator, overrides = variant.partition(OVERRIDES_SEPARATOR)
    return preset_variant, (overrides if separator else None)


def passed_config_overrides(train_flags: list[str]) -> str | None:
    """The value of a passed-through `--config_overrides` (the last one, as argparse takes it)."""
    value = None
    for index, token in enumerate(train_flags):
        if token == "--config_overrides" and index + 1 < len(train_flags):
            value = train_flags[index + 1]
        elif token.startswith("--config_overrides="):
            value = token.split("=", 1)[1]
    return value


def variant_config_overrides(variant: str, train_flags: list[str]) -> str | None:
    """The `--config_overrides` of one run: the passed-through ones, then the variant's own."""
    from .train import parse_config_overrides

    _, own = split_variant(variant)
    common = passed_config_overrides(train_flags)
    if own is None:
        return common
    if common is None:
        return own
    both = sorted(set(parse_config_overrides(common)) & set(parse_config_overrides(own)))
    if both:
        raise ValueError(
            f"--variants {variant!r} sets {both}, which --config_overrides {common!r} sets for every run too; "
            "set each field in one place"
        )
    return f"{common},{own}"


def check_arguments(args: argparse.Namespace, train_flags: list[str]) -> None:
    from .train import parse_config_overrides

    if len(set(args.variants)) != len(args.variants):
        raise ValueError(f"--variants lists a variant twice: {list(args.variants)}")
    check_preset_arguments(args.preset, list(dict.fromkeys(split_variant(variant)[0] for variant in args.variants)))
    for variant in args.variants:
        _, own = split_variant(variant)
        if own is not None:
            if not own:
                raise ValueError(f"--variants {variant!r}: give FIELD=VALUE after {OVERRIDES_SEPARATOR!r}")
            try:
                parse_config_overrides(own)
            except ValueError as error:
                raise ValueError(f"--variants {variant!r}: {error}") from None
        variant_config_overrides(variant, train_flags)
    if args.reference != DEFAULT_REFERENCE and args.reference not in args.variants:
        raise ValueError(f"--reference {args.reference!r} must be one of --variants {list(args.variants)}")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be an integer >= 1, got {args.seeds}")
    for name in ("max_steps", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be an integer >= 1, got {value}")
    controlled = sorted(
        {
            flag
            for token in train_flags
            for flag in CONTROLLED_TRAIN_FLAGS
            if token == flag or token.startswith(flag + "=")
        }
    )
    if controlled:
        raise ValueError(
            f"ddl compare sets {controlled} for every run itself; use --preset, --variants, --seeds, --max_steps or "
            "--max_tokens and --output_dir of ddl compare instead"
        )
    if train_flags and not train_flags[0].startswith("-"):
        raise ValueError(f"unexpected argument {train_flags[0]!r}: ddl compare takes flags only")


def run_dir(output_dir: str | Path, variant: str, seed: int) -> Path:
    # Not every file system takes a ':' in a name.
    return Path(output_dir) / "runs" / variant.replace(OVERRIDES_SEPARATOR, "+") / f"seed-{seed}"


def run_arguments(args: argparse.Namespace, train_flags: list[str], variant: str, seed: int, max_steps: int):
    """`train.parse_args` for one run: the passed-through flags plus the ones compare controls (and the
    variant's own config overrides)."""
    from .train import parse_args

    overrides = variant_config_overrides(variant, train_flags)
    argv = [
        *train_flags,
        *([] if overrides is None else ["--config_overrides", overrides]),
        "--preset",
        args.preset,
        "--variant",
        split_variant(variant)[0],
        "--seed",
        str(seed),
        "--max_steps",
        str(max_steps),
        "--output_dir",
        str(run_dir(args.output_dir, variant, seed)),
    ]
    return parse_args(argv)


def resolve_max_steps(args: argparse.Namespace, train_flags: list[str]) -> tuple[int, int]:
    """(optimizer steps per run, tokens per step). `--max_tokens` is rounded up to whole steps."""
    from .train import parse_config_overrides, resolve_block_size

    model_args, data_args, training_args = run_arguments(args, train_flags, args.variants[0], 0, 1)
    config = DDLConfig.from_preset(
        args.preset, split_variant(args.variants[0])[0], **parse_config_overrides(model_args.config_overrides or "")
    )
    block_size = resolve_block_size(data_args, config)
    tokens_per_step = (
        training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * training_args.world_size
        * block_size
    )
    if args.max_steps is not None:
        return args.max_steps, tokens_per_step
    return math.ceil(args.max_tokens / tokens_per_step), tokens_per_step


# --------------------------------------------------------------------------- running
def train_all(args: argparse.Namespace, train_flags: list[str], max_steps: int) -> None:
    """Train every (variant, seed), seed by seed, skipping finished runs and resuming unfinished ones."""
    from .run_files import METRICS_FILE, check_output_dir, run_fingerprint
    from .train import run_training

    for seed in range(args.seeds):
        for variant in args.variants:
            model_args, data_args, training_args = run_arguments(args, train_flags, variant, seed, max_steps)
            folder = run_dir(args.output_dir, variant, seed)
            check_output_dir(folder, run_fingerprint(model_args, data_args, training_args))
            if (folder / METRICS_FILE).is_file():
                print(f"ddl compare: skipped {variant} seed {seed}: finished ({folder / METRICS_FILE})", flush=True)
                continue
            print(f"ddl compare: training {variant} seed {seed} for {max_steps} steps in {folder}", flush=True)
            run_training(model_args, data_args, training_args)


def load_run(folder: Path) -> dict:
    """Final metrics and the validation curve of one finished run."""
    from .run_files import METRICS_FILE, load_trainer_state

    metrics = json.loads((folder / METRICS_FILE).read_text(encoding="utf-8"))
    history = load_trainer_state(folder).log_history
    tokens_per_step = metrics["tokens_seen"] / metrics["global_step"]
    curve = [(entry["step"], entry["eval_loss"]) for entry in history if "eval_loss" in entry]
    curve = sorted(dict(curve).items())  # one point per step
    return {
        "metrics": metrics,
        "curve": [
            {
                "step": step,
                "tokens": step * tokens_per_step,
                "flops": step * tokens_per_step * metrics["training_flops_per_token"],
                "eval_loss": loss,
            }
            for step, loss in curve
        ],
    }


# --------------------------------------------------------------------------- results
def summarize(runs: dict[tuple[str, int], dict], variants: list[str], reference: str = DEFAULT_REFERENCE) -> dict:
    """Per variant: statistics over seeds of the final metrics, and the paired difference to `reference`."""
    losses = {
        variant: {seed: run["metrics"]["eval_loss"] for (name, seed), run in runs.items() if name == variant}
        for variant in variants
    }
    summary = {}
    for variant in variants:
        seeds = sorted(losses[variant])
        metrics = [runs[(variant, seed)]["metrics"] for seed in seeds]
        loss_mean, loss_std = mean_and_std([losses[variant][seed] for seed in seeds])
        tokens = {m["tokens_seen"] for m in metrics}
        if len(tokens) != 1:
            raise ValueError(f"the {variant} runs saw different numbers of tokens {sorted(tokens)}; rerun them")
        wall_times = {seed: m["train_wall_time_s"] for seed, m in zip(seeds, metrics, strict=True)}
        summary[variant] = {
            "seeds": seeds,
            "final_eval_loss": {"mean": loss_mean, "std": loss_std, "per_seed": losses[variant]},
            "perplexity": math.exp(loss_mean),
            "perplexity_per_seed": {seed: math.exp(loss) for seed, loss in losses[variant].items()},
            "parameters": metrics[0]["num_parameters"],
            "tokens": metrics[0]["tokens_seen"],
            "training_flops_per_token": metrics[0]["training_flops_per_token"],
            "training_flops": metrics[0]["training_flops"],
            "train_wall_time_s": dict(zip(("mean", "std"), mean_and_std(list(wall_times.values())), strict=True))
            | {"per_seed": wall_times},
            "difference_to_reference": (
                paired_difference(losses[variant], losses[reference])
                if reference in losses and variant != reference
                else None
            ),
        }
    return summary


def _format_number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.3e}".replace("e+", "e")


def results_markdown(report: dict) -> str:
    lines = [
        f"# ddl compare: {report['preset']} preset, {len(report['seeds'])} seed(s), "
        f"{report['max_steps']} steps per run",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Block size {report['block_size']}, {report['tokens_per_step']:,} tokens per step. Validation loss in "
        "nats/token on the held-out blocks, mean ± sample std over seeds. Δ: paired difference to "
        f"{report['reference_variant']} per seed, with a {report['confidence']:.0%} t interval over seeds.",
        "",
        "| variant | val loss | per seed | ppl | params | tokens | train FLOPs/token | train FLOPs | wall time/run (s) "
        f"| Δ vs {report['reference_variant']} [{report['confidence']:.0%} CI] |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, entry in report["variants"].items():
        loss = entry["final_eval_loss"]
        std = f" ± {loss['std']:.4f}" if loss["std"] is not None else ""
        per_seed = ", ".join(f"{loss['per_seed'][seed]:.4f}" for seed in entry["seeds"])
        wall = entry["train_wall_time_s"]
        wall_text = f"{wall['mean']:.1f}" + (f" ± {wall['std']:.1f}" if wall["std"] is not None else "")
        difference = entry["difference_to_reference"]
        if difference is None:
            delta = "—"
        elif difference["low"] is None:
            delta = f"{difference['mean']:+.4f}"
        else:
            delta = f"{difference['mean']:+.4f} [{difference['low']:+.4f}, {difference['high']:+.4f}]"
        lines.append(
            f"| {variant} | {loss['mean']:.4f}{std} | {per_seed} | {entry['perplexity']:.2f} | "
            f"{entry['parameters']:,} | {entry['tokens']:,} | {_format_number(entry['training_flops_per_token'])} | "
            f"{_format_number(entry['training_flops'])} | {wall_text} | {delta} |"
        )
    lines += [
        "",
        "Training FLOPs count 2 per multiply-add of every matmul, attention score and value product (causal: "
        "(T + 1) / 2 keys per token on average), the LM head and the DDL extras (gates, values, compressors, EC "
        "convolution, the rank-1 read and write), forward + backward = 3 x forward (`ddl_hf.flops`).",
        "",
        f"Plots: `{LOSS_VS_TOKENS_PNG}`, `{LOSS_VS_FLOPS_PNG}` (line: mean over seeds; band: lowest to highest seed).",
        "",
    ]
    return "\n".join(lines)


def plot_curves(
    runs: dict[tuple[str, int], dict], variants: list[str], x_key: str, path: Path, xlabel: str, title: str
) -> None:
    """Validation loss against `x_key` ("tokens" or "flops"): per variant the mean over seeds at the
    evaluation steps every seed has, and a band from the lowest to the highest seed."""
    with png_figure(path, figsize=(8, 5)) as (_, axes):
        colors = color_cycle()
        for index, variant in enumerate(variants):
            curves = [run["curve"] for (name, _), run in sorted(runs.items()) if name == variant]
            steps = sorted(set.intersection(*({point["step"] for point in curve} for curve in curves)))
            if not steps:
                continue
            by_step = [{point["step"]: point for point in curve} for curve in curves]
            x = [by_step[0][step][x_key] for step in steps]
            losses = [[curve[step]["eval_loss"] for curve in by_step] for step in steps]
            color = colors[index % len(colors)]
            axes.plot(
                x,
                [statistics.mean(values) for values in losses],
                "o-",
                color=color,
                markersize=3,
                label=f"{variant} ({len(curves)} seed{'s' if len(curves) > 1 else ''})",
            )
            if len(curves) > 1:
                axes.fill_between(
                    x,
                    [min(values) for values in losses],
                    [max(values) for values in losses],
                    color=color,
                    alpha=0.2,
                    linewidth=0,
                )
        label_axes(axes, xlabel, "validation loss (nats/token)", title)


def write_results(args: argparse.Namespace, argv: list[str], max_steps: int, tokens_per_step: int) -> dict:
    """Collect every run of the command and write results.json, results.md and the two plots."""
    runs = {
        (variant, seed): load_run(run_dir(args.output_dir, variant, seed))
        for seed in range(args.seeds)
        for variant in args.variants
    }
    block_sizes = {run["metrics"]["block_size"] for run in runs.values()}
    report = {
        "command": "ddl compare " + shlex.join(argv),
        "preset": args.preset,
        "variants": summarize(runs, args.variants, args.reference),
        "seeds": list(range(args.seeds)),
        "max_steps": max_steps,
        "tokens_per_step": tokens_per_step,
        "block_size": block_sizes.pop() if len(block_sizes) == 1 else sorted(block_sizes),
        "confidence": CONFIDENCE,
        "reference_variant": args.reference,
        "curves": {f"{variant}/seed-{seed}": run["curve"] for (variant, seed), run in runs.items()},
    }
    output_dir = Path(args.output_dir)
    (output_dir / RESULTS_JSON).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (output_dir / RESULTS_MD).write_text(results_markdown(report), encoding="utf-8")
    title = f"{args.preset} preset, {args.seeds} seed(s): mean over seeds, band = lowest to highest seed"
    plot_curves(runs, args.variants, "tokens", output_dir / LOSS_VS_TOKENS_PNG, "training tokens", title)
    plot_curves(runs, args.variants, "flops", output_dir / LOSS_VS_FLOPS_PNG, "training FLOPs (analytic)", title)
    return report


@reports_input_errors("compare")
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, train_flags = build_parser().parse_known_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    check_arguments(args, train_flags)
    max_steps, tokens_per_step = resolve_max_steps(args, train_flags)
    if args.max_tokens is not None:
        print(
            f"ddl compare: --max_tokens {args.max_tokens:,} -> {max_steps} steps of {tokens_per_step:,} tokens "
            f"({max_steps * tokens_per_step:,} tokens per run)"
        )
    train_all(args, train_flags, max_steps)
    report = write_results(args, argv, max_steps, tokens_per_step)
    print()
    print(results_markdown(report))
    print(f"wrote {Path(args.output_dir) / RESULTS_MD}, {RESULTS_JSON}, {LOSS_VS_TOKENS_PNG}, {LOSS_VS_FLOPS_PNG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
