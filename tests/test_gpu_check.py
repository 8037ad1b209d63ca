"""`scripts/gpu_check.py`, the first GPU's one command, run here as its CPU dry run (`--device cpu --preset tiny`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import offline_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"
STEPS = [
    "tests_fused_ops",
    "tests_generation_cache",
    "tests_checkpoints",
    "tests_fsdp2",
    "tests_precision",
    "bench_eager",
    "train_sdpa",
    "generate_static_compiled",
    "bench_compiled",
    "train_flash_attention_2",
]


def run_gpu_check(out: Path, *extra: str, timeout: int) -> tuple[subprocess.CompletedProcess, dict]:
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--preset", "tiny", "--out", str(out), *extra]
    env = offline_env(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    report_file = out / "gpu_check.json"
    assert report_file.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads(report_file.read_text())


def test_steps_past_the_time_budget_are_skipped_with_the_reason(tmp_path):
    done, report = run_gpu_check(tmp_path, "--total_s", "1", "--only", "bench_eager", timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert report["schema"] == 1 and report["ok"] and report["dry_run"] and report["device"] == "cpu"
    assert [step["name"] for step in report["steps"]] == STEPS
    by_name = {step["name"]: step for step in report["steps"]}
    assert all(step["status"] == "skipped" for step in report["steps"])
    assert "time budget" in by_name["bench_eager"]["reason"]
    assert all("--only" in step["reason"] for name, step in by_name.items() if name != "bench_eager")
    table = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {name} |" in table for name in STEPS)


@pytest.mark.slow
def test_dry_run_passes_every_step_and_writes_the_json_and_the_table(tmp_path):
    done, report = run_gpu_check(tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:]
    assert report["ok"] and report["dry_run"] and report["preset"] == "tiny"
    assert [step["name"] for step in report["steps"]] == STEPS
    for step in report["steps"]:
        assert step["status"] in ("pass", "skipped"), step
        assert set(step) == {"name", "title", "status", "reason", "seconds", "budget_s", "command", "log", "details"}
    by_name = {step["name"]: step for step in report["steps"]}
    # Only flash-attention 2 is skipped on the CPU, with its reason; every other step ran and passed.
    assert by_name["train_flash_attention_2"]["status"] == "skipped"
    assert "CUDA" in by_name["train_flash_attention_2"]["reason"]
    assert all(step["status"] == "pass" for name, step in by_name.items() if name != "train_flash_attention_2")
    for name in STEPS[:5]:
        details = by_name[name]["details"]
        assert details["passed"] > 0 and details["failures"] == details["errors"] == 0, (name, details)
    for name in ("bench_eager", "bench_compiled"):
        assert set(by_name[name]["details"]["results"]) == {"baseline", "ddl-tc"}
        assert by_name[name]["details"]["config"]["dtype"] == "bfloat16"
    assert by_name["bench_compiled"]["details"]["config"]["compile"] == "aot_eager"
    train = by_name["train_sdpa"]["details"]
    assert train["global_step"] == 50 and list(train["losses"].values())[-1] < list(train["losses"].values())[0]
    generated = by_name["generate_static_compiled"]["details"]["results"]
    assert generated["ddl-tc/float32"]["equal"] and generated["ddl-tc/float32"]["compiled_graphs"] >= 1
    assert "ddl-tc/bfloat16" in generated
    for step in report["steps"]:
        if step["log"]:
            assert (tmp_path / step["log"]).is_file()
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| train_sdpa | " in table and "| pass |" in table and "## bench_eager" in table
