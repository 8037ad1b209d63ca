"""`scripts/long_run_report.py`: loss spikes found exactly where they are, and the report of real run files."""

import json
import subprocess
import sys

import pytest

from test_train import REPO

SCRIPT = REPO / "scripts" / "long_run_report.py"
sys.path.insert(0, str(SCRIPT.parent))
import long_run_report  # noqa: E402


def test_a_spike_is_a_loss_above_ratio_times_the_median_of_the_window_before_it():
    losses = [(10 * i, 4.0) for i in range(1, 13)] + [(130, 4.9), (140, 4.7), (150, 4.0)]
    spikes = long_run_report.loss_spikes(losses, window=10, ratio=1.2)
    assert spikes == [{"step": 130, "loss": 4.9, "median_before": 4.0, "ratio": pytest.approx(1.225)}]
    assert long_run_report.loss_spikes(losses, window=10, ratio=1.23) == []


def test_report_of_two_runs_from_their_trainer_state(tmp_path):
    runs = []
    for name, jump in (("baseline", 0.0), ("ddl-cc", 3.0)):
        folder = tmp_path / name
        folder.mkdir()
        history = [{"step": 10 * i, "loss": 5.0 - 0.01 * i, "grad_norm": 1.0 + 0.1 * i} for i in range(1, 21)]
        history[15]["loss"] += jump
        history.append({"step": 200, "eval_loss": 4.5})
        (folder / "trainer_state.json").write_text(json.dumps({"log_history": history}))
        (folder / "metrics.json").write_text(json.dumps({"train_wall_time_s": 12.5}))
        runs.append(f"{name}={folder}")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--runs", *runs, "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    baseline, ddl = report["runs"]
    assert (baseline["run"], baseline["steps"], baseline["final_eval_loss"]) == ("baseline", 200, 4.5)
    assert baseline["spikes"] == [] and baseline["max_grad_norm"] == pytest.approx(3.0)
    assert [spike["step"] for spike in ddl["spikes"]] == [160] and ddl["train_wall_time_s"] == 12.5
    assert (tmp_path / "out" / "curves.png").stat().st_size > 10_000
    assert "ddl-cc: 200 steps" in result.stdout and "1 spike(s) [160]" in result.stdout


def test_a_run_folder_without_trainer_state_is_refused_by_name(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--runs", f"baseline={tmp_path}", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--runs: 'baseline=" in result.stderr and "trainer_state.json" in result.stderr
