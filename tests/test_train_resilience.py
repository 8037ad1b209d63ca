"""`ddl train` under preemption (SIGTERM / SIGUSR1) and divergence (non-finite loss or gradient norm).

Real processes and real signals: a child runs `ddl train`'s `main` with one extra callback that, after a given
optimizer step, writes a file and waits for the test's go-ahead, so that the signal lands at a known step. The
fixtures and helpers (tiny runs on real text, one intra-op thread) are `tests/test_train.py`'s.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

import test_train
from conftest import two_process_accelerate_launch, two_process_torchrun
from ddl_hf import DDLConfig, DDLForCausalLM
from ddl_hf.run_files import checkpoint_is_complete, last_complete_checkpoint
from ddl_hf.train import DIVERGED_EXIT_CODE, PREEMPTED_EXIT_CODE, parse_args, run_training
from test_train import REPO, assert_same_run, data_order, subprocess_env, tiny_argv

# tests/test_train.py's fixtures: the tiny tokenizer and files, its uninterrupted reference run; one thread.
assets, reference_run = test_train.assets, test_train.reference_run
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# Runs `ddl train` (`main`) with a callback that, after optimizer step argv[3], writes argv[1].RANK and waits until
# argv[2] exists. argv[4:] are the arguments of `ddl train`.
WAITING_CHILD = """
import os, sys, time
from pathlib import Path
from transformers import TrainerCallback
import ddl_hf.train as train

class WaitAfterStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(sys.argv[3]):
            Path(f"{sys.argv[1]}.{args.process_index}").write_text(str(os.getpid()))
            while not Path(sys.argv[2]).exists():
                time.sleep(0.05)

run_training = train.run_training
train.run_training = lambda *args: run_training(*args, callbacks=[WaitAfterStep()])
sys.exit(train.main(sys.argv[4:]))
"""


def start_waiting_child(tmp_path, wait_after_step, argv, launcher=()):
    script = tmp_path / "child.py"
    script.write_text(WAITING_CHILD)
    stdout, stderr = (tmp_path / "stdout.txt").open("w"), (tmp_path / "stderr.txt").open("w")
    paused, go = tmp_path / "paused", tmp_path / "go"
    command = [*launcher] if launcher else [sys.executable]
    child = subprocess.Popen(
        [*command, str(script), str(paused), str(go), str(wait_after_step), *argv],
        env=subprocess_env(),
        stdout=stdout,
        stderr=stderr,
    )
    return child, paused, go


def wait_for_files(child, paths, tmp_path, timeout=300):
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in paths):
        assert child.poll() is None, (tmp_path / "stderr.txt").read_text()[-4000:]
        assert time.monotonic() < deadline, f"the child never wrote {paths}"
        time.sleep(0.1)


# --------------------------------------------------------------------------- preemption
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_stop_signal_checkpoints_the_step_exits_75_and_the_rerun_resumes_exactly(
    reference_run, assets, tmp_path, signum
):
    """The signal arrives after step 4 (the child waits there); the run finishes step 5, commits checkpoint-5
    (not a regular save step: save_steps is 2), skips the final model, evaluation and sample, and exits with
    PREEMPTED_EXIT_CODE. Rerunning the same command resumes from checkpoint-5 to the uninterrupted run's losses,
    data order and weights, exactly."""
    reference_dir, reference_metrics = reference_run
    output_dir = tmp_path / "run"
    child, paused, go = start_waiting_child(tmp_path, 4, [*tiny_argv(assets, output_dir), "--disable_tqdm", "true"])
    wait_for_files(child, [Path(f"{paused}.0")], tmp_path)
    child.send_signal(signum)
    go.touch()
    returncode = child.wait(timeout=300)
    stdout, stderr = (tmp_path / "stdout.txt").read_text(), (tmp_path / "stderr.txt").read_text()
    assert PREEMPTED_EXIT_CODE == 75
    assert returncode == PREEMPTED_EXIT_CODE, stderr[-4000:]
    assert f"received {signum.name}" in stderr and str(output_dir / "checkpoint-5") in stderr, stderr[-4000:]
    assert last_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-5")
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    assert not (output_dir / "model.safetensors").exists() and not (output_dir / "metrics.json").exists()
    assert "final validation loss" not in stdout and "sample from the saved model" not in stdout
    assert [line.split("\t")[0] for line in data_order(output_dir)] == ["1", "2", "3", "4", "5"]

    metrics = run_training(*parse_args(tiny_argv(assets, output_dir)))
    assert_same_run(output_dir, reference_dir)
    assert metrics["eval_loss"] == reference_metrics["eval_loss"]
    assert metrics["tokens_seen"] == reference_metrics["tokens_seen"]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["launcher", "rank1"])
def test_two_processes_stop_at_one_step_on_sigterm_and_resume_exactly(assets, tmp_path, target):
    """`accelerate launch` with 2 gloo processes, both waiting after step 1. `launcher`: SIGTERM to the launcher,
    which forwards it to both ranks. `rank1`: SIGTERM to rank 1 only; rank 0 learns of it from the all-reduced
    stop flag. Either way both ranks stop after step 2, commit one checkpoint-2 (both RNG states) and exit 75; the
    rerun ends with the losses, data order (both ranks) and weights of an uninterrupted 2-process run."""

    def launch_argv(output_dir):
        return [
            *tiny_argv(assets, output_dir, "--max_steps", "4", "--eval_steps", "4", "--save_steps", "4"),
            "--per_device_eval_batch_size", "4",
            "--sample_max_new_tokens", "0",
            "--disable_tqdm", "true",
        ]  # fmt: skip

    launcher = two_process_accelerate_launch()

    def launch(output_dir):
        command = [*launcher, str(REPO / "scripts/train.py"), *launch_argv(output_dir)]
        return subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=400)

    reference_dir = tmp_path / "reference"
    result = launch(reference_dir)
    assert result.returncode == 0, result.stderr[-4000:]

    output_dir = tmp_path / "run"
    child, paused, go = start_waiting_child(tmp_path, 1, launch_argv(output_dir), launcher=launcher)
    ranks = [Path(f"{paused}.0"), Path(f"{paused}.1")]
    wait_for_files(child, ranks, tmp_path)
    time.sleep(0.5)  # the process ids are written
    if target == "launcher":
        child.send_signal(signal.SIGTERM)
        time.sleep(2)  # torchelastic forwards it to the ranks
    else:
        os.kill(int(ranks[1].read_text()), signal.SIGTERM)
    go.touch()
    returncode = child.wait(timeout=300)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert returncode != 0, stderr[-4000:]
    stops = re.findall(r"(received SIGTERM|another process received a stop signal): stopping after step (\d+)", stderr)
    expected = (
        [("received SIGTERM", "2")] * 2
        if target == "launcher"
        else [
            ("another process received a stop signal", "2"),
            ("received SIGTERM", "2"),
        ]
    )
    assert sorted(stops) == sorted(expected), stderr[-4000:]
    if target == "rank1":
        assert f"exitcode  : {PREEMPTED_EXIT_CODE}" in stderr, stderr[-4000:]  # torchelastic's failure report
    assert last_complete_checkpoint(output_dir) == str(output_dir / "checkpoint-2"), stderr[-4000:]
    rng_states = {p.name for p in (output_dir / "checkpoint-2").glob("rng_state_*.pth")}
    assert rng_states == {"rng_state_0.pth", "rng_state_1.pth"}
    assert not (output_dir / "model.safetensors").exists()
    for rank in (0, 1):
        assert [line.split("\t")[0] for line in data_order(output_dir, rank)] == ["1", "2"]

    result = launch(output_dir)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resuming from" in result.stdout + result.stderr
    assert_same_run(output_dir, reference_dir)
    assert data_order(output_dir, 1) == data_order(reference_dir, 1)


# --------------------------------------------------------------------------- restarts
@pytest.mark.slow
def test_torchrun_restarts_a_group_that_lost_a_rank_and_ends_like_an_uninterrupted_run(assets, tmp_path):
    """`torchrun --max-restarts 1` with 2 gloo processes, both waiting after step 3 (checkpoint-2 is complete):
    SIGKILL to rank 1. torchelastic stops rank 0 and restarts both; the new attempt joins its own group
    (`join_restarted_elastic_group`), resumes from checkpoint-2 and ends with the losses, data order (both ranks)
    and weights of an uninterrupted run of the same launcher that saved at the same steps."""

    def launcher():
        return [*two_process_torchrun(), "--max-restarts", "1"]

    def run_argv(output_dir):
        return [
            *tiny_argv(assets, output_dir, "--max_steps", "4", "--eval_steps", "4", "--save_steps", "2"),
            "--per_device_eval_batch_size", "4",
            "--sample_max_new_tokens", "0",
            "--disable_tqdm", "true",
        ]  # fmt: skip

    reference_dir = tmp_path / "reference"
    command = [*launcher(), str(REPO / "scripts/train.py"), *run_argv(reference_dir)]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]

    output_dir = tmp_path / "run"
    child, paused, go = start_waiting_child(tmp_path, 3, run_argv(output_dir), launcher=launcher())
    ranks = [Path(f"{paused}.0"), Path(f"{paused}.1")]
    wait_for_files(child, ranks, tmp_path)
    time.sleep(0.5)  # the process ids are written
    assert checkpoint_is_complete(output_dir / "checkpoint-2")
    killed = [int(rank.read_text()) for rank in ranks]
    os.kill(killed[1], signal.SIGKILL)
    go.touch()
    returncode = child.wait(timeout=400)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert returncode == 0, stderr[-4000:]
    # The restarted attempt passed step 3 again, in new processes.
    assert all(int(rank.read_text()) not in killed for rank in ranks), stderr[-4000:]
    restarted = re.findall(r"torchelastic restart 1: rank (\d) joined the restarted group", stderr)
    assert sorted(restarted) == ["0", "1"], stderr[-4000:]
    assert stderr.count(f"resuming from {output_dir / 'checkpoint-2'}") >= 1, stderr[-4000:]
    assert_same_run(output_dir, reference_dir)
    assert data_order(output_dir, 1) == data_order(reference_dir, 1)


# --------------------------------------------------------------------------- divergence
# A learning rate of 1e6 on the tiny preset: finite losses for a few steps, then NaN (within 20 steps).
EVERY_STEP_SAVED = ("--max_steps", "20", "--save_steps", "1", "--save_total_limit", "3")
DIVERGING = ("--learning_rate", "1e6", *EVERY_STEP_SAVED)
NONFINITE = re.compile(r"at step (\d+): loss ([^\s;,]+), grad norm ([^\s;,]+)")


def run_cli(argv, tmp_path):
    return subprocess.run(
        [sys.executable, "-m", "ddl_hf.cli", "train", *argv, "--disable_tqdm", "true"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )


def all_finite(path) -> bool:
    return all(torch.isfinite(tensor).all() for tensor in load_file(path).values())


def optimizer_tensors(checkpoint):
    state = torch.load(Path(checkpoint) / "optimizer.pt", weights_only=True)["state"]
    return [tensor for entry in state.values() for tensor in entry.values()]


@pytest.mark.parametrize("learning_rate", ["1e6", "3e38"], ids=["nonfinite_loss", "nonfinite_weights"])
def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(assets, tmp_path, learning_rate):
    """lr 1e6: a step's loss and gradient norm become NaN; the run stops at that step, before its update. lr 3e38:
    an update with a finite loss and gradient norm overflows the weights to inf; the checkpoint of that step
    refuses to be written. Either way: exit status 3, a message naming the step, loss and grad norm, the
    checkpoint of the step before is the newest (and finite), and no final model, metrics or sample."""
    output_dir = tmp_path / "run"
    result = run_cli(tiny_argv(assets, output_dir, "--learning_rate", learning_rate, *EVERY_STEP_SAVED), tmp_path)
    assert result.returncode == DIVERGED_EXIT_CODE, result.stderr[-4000:]
    found = NONFINITE.search(result.stderr)
    assert found and "ddl train: error: training diverged" in result.stderr, result.stderr[-4000:]
    step, loss, grad_norm = int(found[1]), float(found[2]), float(found[3])
    assert 1 < step <= 20
    if learning_rate == "1e6":
        assert not (math.isfinite(loss) and math.isfinite(grad_norm))
    else:
        assert f"non-finite weights in the checkpoint of step {step}" in result.stderr

    # Every step before it was finite and checkpointed; the newest checkpoint is the one of the step before.
    newest = output_dir / f"checkpoint-{step - 1}"
    assert last_complete_checkpoint(output_dir) == str(newest) and checkpoint_is_complete(newest)
    assert str(newest) in result.stderr
    assert all_finite(newest / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in optimizer_tensors(newest))
    state = json.loads((newest / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == step - 1 and all(math.isfinite(value) for value in losses)
    # Nothing else was written: no final model, metrics or sample.
    assert not (output_dir / "model.safetensors").exists() and not (output_dir / "metrics.json").exists()
    assert not list(output_dir.glob(f"checkpoint-{step}*"))
    assert "sample from the saved model" not in result.stdout and "final validation loss" not in result.stdout


def token_ids(tokenizer, jsonl_path):
    """The token stream `ddl train` packs from a JSONL file: each document's tokens, then EOS."""
    ids = []
    for line in Path(jsonl_path).read_text(encoding="utf-8").splitlines():
        ids += tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return ids


def poisoned_model(assets, folder):
    """The tiny DDL-CC model with untied embeddings whose input embedding of one token is 3e38 (finite, so it can
    be saved): a micro-batch that holds that token overflows to a NaN loss, the others train normally. The token
    is the one in the most 32-token training blocks (3.7% here) among those absent from the validation file."""
    tokenizer = AutoTokenizer.from_pretrained(assets["tokenizer"])
    train, validation = token_ids(tokenizer, assets["train"]), set(token_ids(tokenizer, assets["validation"]))
    blocks = [set(train[i : i + 32]) for i in range(0, len(train) - 31, 32)]
    counts = {t: sum(t in block for block in blocks) for t in range(len(tokenizer)) if t not in validation}
    token = max(counts, key=counts.get)
    assert 0.02 < counts[token] / len(blocks) < 0.2
    config = DDLConfig.from_preset(
        "tiny",
        "ddl-cc",
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = DDLForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[token] = 3e38
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_max_nonfinite_skips_skips_the_overflowing_batches_and_trains_on(assets, tmp_path):
    """A real input that makes the loss NaN: a model whose embedding of one token overflows. With enough
    --max_nonfinite_skips the run skips exactly the steps whose batch holds that token: each is logged (step,
    loss, grad norm; stderr and log_history), its update not applied (the checkpoint after it has the weights and
    optimizer state of the one before), and the run ends with finite weights and validation loss. With one skip
    fewer, the last of those steps stops the run instead, with the last good checkpoint the newest."""
    model_dir = poisoned_model(assets, tmp_path / "poisoned")

    def argv(output_dir, skips):
        every_step = ("--max_steps", "20", "--save_steps", "1", "--save_total_limit", "25", "--eval_steps", "20")
        return [
            *tiny_argv(assets, output_dir, *every_step),
            "--model_name_or_path", str(model_dir),
            "--max_nonfinite_skips", str(skips),
            "--sample_max_new_tokens", "0",
        ]  # fmt: skip

    output_dir = tmp_path / "run"
    result = run_cli(argv(output_dir, 20), tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((output_dir / "trainer_state.json").read_text())
    skipped = [entry for entry in state["log_history"] if "nonfinite_loss" in entry]
    steps = [entry["step"] for entry in skipped]
    assert 0 < len(steps) < 20, steps
    assert all(math.isnan(entry["nonfinite_loss"]) and math.isnan(entry["nonfinite_grad_norm"]) for entry in skipped)
    assert [int(step) for step in re.findall(r"skipping step (\d+) \(20 skips allowed\)", result.stderr)] == steps
    losses = {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}
    assert all(math.isfinite(loss) for step, loss in losses.items() if step not in steps)
    for step in steps:
        before = model_dir if step == 1 else output_dir / f"checkpoint-{step - 1}"
        after = output_dir / f"checkpoint-{step}"
        weights_before, weights_after = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
        assert all(torch.equal(weights_before[k], weights_after[k]) for k in weights_before), step
        if step > 1:
            assert all(torch.equal(a, b) for a, b in zip(optimizer_tensors(before), optimizer_tensors(after))), step
    final = load_file(output_dir / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in final.values())
    assert not torch.equal(
        final["model.layers.0.mlp.up_proj.weight"],
        load_file(model_dir / "model.safetensors")["model.layers.0.mlp.up_proj.weight"],
    )  # the other steps trained
    assert math.isfinite(json.loads((output_dir / "metrics.json").read_text())["eval_loss"])

    stopped_dir = tmp_path / "stopped"
    result = run_cli(argv(stopped_dir, len(steps) - 1), tmp_path)
    assert result.returncode == DIVERGED_EXIT_CODE, result.stderr[-4000:]
    found = NONFINITE.search(result.stderr.split("training diverged")[-1])
    assert int(found[1]) == steps[-1] and math.isnan(float(found[2])), result.stderr[-4000:]
    assert last_complete_checkpoint(stopped_dir) == str(stopped_dir / f"checkpoint-{steps[-1] - 1}")
    assert not (stopped_dir / "model.safetensors").exists()


def test_help_documents_the_exit_codes(capsys):
    from ddl_hf.train import main

    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"{PREEMPTED_EXIT_CODE}: stopped by SIGTERM or SIGUSR1" in help_text
    assert f"{DIVERGED_EXIT_CODE}: a non-finite loss or gradient norm" in help_text
    assert "--max_nonfinite_skips" in help_text
