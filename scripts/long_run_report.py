"""Loss curves and loss spikes of long `ddl train` runs, side by side (docs/results/long-run/).

    python scripts/long_run_report.py --runs baseline=RUN_DIR ddl-cc=RUN_DIR --out docs/results/long-run

Reads each run's `trainer_state.json` (and `metrics.json`). Writes `curves.png` (training loss at every
logging step and validation loss at every evaluation, one colour per run) and `report.json`: per run the final
validation loss, the wall time, the largest gradient norm, whether every logged loss is finite, and its loss
spikes.

A spike is a logged training loss (the mean over one logging interval) more than `--spike_ratio` (default 1.2)
times the median of the `--window` (default 10) logged losses before it: a jump far outside the interval-to-
interval spread of this corpus (its files differ in style, so consecutive intervals differ by up to about 10%).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ddl_hf.plots import color_cycle, label_axes, png_figure  # noqa: E402


def read_run(run_dir: Path) -> dict:
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    train = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in history if "eval_loss" in entry]
    grad_norms = [entry["grad_norm"] for entry in history if "grad_norm" in entry]
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    return {"train": train, "eval": evaluation, "grad_norms": grad_norms, "metrics": metrics}


def loss_spikes(train: list[tuple[int, float]], window: int, ratio: float) -> list[dict]:
    """Logged losses above `ratio` times the median of the `window` logged losses before them."""
    spikes = []
    for index in range(window, len(train)):
        step, loss = train[index]
        median = statistics.median(loss for _, loss in train[index - window : index])
        if loss > ratio * median:
            spikes.append({"step": step, "loss": loss, "median_before": median, "ratio": loss / median})
    return spikes


def summarize(name: str, run: dict, window: int, ratio: float) -> dict:
    losses = [loss for _, loss in run["train"]]
    metrics = run["metrics"]
    return {
        "run": name,
        "steps": run["train"][-1][0] if run["train"] else 0,
        "final_train_loss": losses[-1] if losses else None,
        "final_eval_loss": run["eval"][-1][1] if run["eval"] else None,
        "train_wall_time_s": metrics.get("train_wall_time_s"),
        "all_logged_losses_finite": all(math.isfinite(loss) for loss in losses),
        "max_grad_norm": max(run["grad_norms"]) if run["grad_norms"] else None,
        "spikes": loss_spikes(run["train"], window, ratio),
    }


def plot_curves(runs: dict[str, dict], path: Path) -> None:
    with png_figure(path, 1, 2, figsize=(12, 4.5)) as (_, (train_axes, eval_axes)):
        for color, (name, run) in zip(color_cycle(), runs.items()):
            steps, losses = zip(*run["train"])
            train_axes.plot(steps, losses, color=color, linewidth=0.8, label=name)
            steps, losses = zip(*run["eval"])
            eval_axes.plot(steps, losses, color=color, marker="o", markersize=3, label=name)
        train_axes.set_ylim(top=min(8.0, train_axes.get_ylim()[1]))
        label_axes(train_axes, "optimizer step", "training loss (mean over a logging interval)", "training loss")
        label_axes(eval_axes, "optimizer step", "validation loss", "validation loss")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="NAME=RUN_DIR for each run")
    parser.add_argument("--out", required=True, help="folder for curves.png and report.json")
    parser.add_argument("--window", type=int, default=10, help="logged losses in a spike's reference median")
    parser.add_argument("--spike_ratio", type=float, default=1.2, help="a spike exceeds the median by this factor")
    args = parser.parse_args(argv)
    runs = {}
    for item in args.runs:
        name, separator, folder = item.partition("=")
        if not separator or not (Path(folder) / "trainer_state.json").exists():
            parser.error(f"--runs: {item!r} is not NAME=RUN_DIR with a trainer_state.json in RUN_DIR")
        runs[name] = read_run(Path(folder))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(runs, out / "curves.png")
    report = {
        "spike_definition": {"window": args.window, "ratio": args.spike_ratio},
        "runs": [summarize(name, run, args.window, args.spike_ratio) for name, run in runs.items()],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for run in report["runs"]:
        print(
            f"{run['run']}: {run['steps']} steps, final train loss {run['final_train_loss']:.4f}, final validation "
            f"loss {run['final_eval_loss']:.4f}, max grad norm {run['max_grad_norm']:.3f}, "
            f"{len(run['spikes'])} spike(s) {[spike['step'] for spike in run['spikes']]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
