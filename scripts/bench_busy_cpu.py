"""Training throughput of the main job's model alone and next to another CPU-bound job.

    python scripts/bench_busy_cpu.py [--rounds 4] [--settings torch ddl_hf] [--json busy.json]

Each setting is a set of environment variables for a training process of its own (libgomp reads
its settings when torch is imported, so every setting needs a fresh process):

- `torch`: torch's defaults: every OpenMP variable removed (OMP_WAIT_POLICY, GOMP_SPINCOUNT,
  KMP_BLOCKTIME, OMP_NUM_THREADS, MKL_NUM_THREADS);
- `ddl_hf`: what the `ddl` commands run with: `torch` plus `ddl_hf_launch.cpu_defaults`;
- `NAME:VAR=VALUE,VAR=VALUE`: `torch` plus the given variables, to try other values
  (`passive:OMP_WAIT_POLICY=PASSIVE`, `spin3k:GOMP_SPINCOUNT=3000`, `one:OMP_NUM_THREADS=1`).

Every training process builds the main job's model (`mini` DDL-CC, vocabulary 8,192) and an
AdamW optimizer, runs `--warmup` steps on a fixed random batch of 8 x 256 tokens, then waits.
The script then gives the processes turns of `--steps_per_turn` steps, one process at a time
(the others sleep), `--rounds` rounds with the order rotated each round: first alone ("idle"),
then next to a neighbour it starts: the same training loop with 2 threads and
OMP_WAIT_POLICY=PASSIVE (a well-behaved CPU-bound program) in a session of its own, as a
program started from another terminal would be. Interleaving the settings exposes them to the
same drift of whatever else runs on the machine. The median step time of each setting is
reported, with the neighbour's own step time during that setting's turns, and the load
average during each phase. All processes are stopped at the end, also on errors; the neighbour
also stops by itself after a deadline. A benchmark, not a test: the figures depend on the
machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
if str(SRC) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(SRC))

from ddl_hf_launch import APPLIED_MARKER, THREAD_VARIABLES, WAIT_VARIABLES, cpu_defaults  # noqa: E402

BATCH_SIZE, SEQ_LEN, VOCAB_SIZE = 8, 256, 8192
TOKENS_PER_STEP = BATCH_SIZE * SEQ_LEN
NEIGHBOUR_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "2"}
READY_TIMEOUT_S = 600  # building the model and the warmup steps, on a busy machine
STEP_TIMEOUT_S = 300  # one training step


def load_average() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None


# --------------------------------------------------------------------------- training loop (children)
def _training_step():
    import torch

    from ddl_hf import DDLConfig, DDLForCausalLM

    torch.manual_seed(0)
    config = DDLConfig.from_preset("mini", "ddl-cc", vocab_size=VOCAB_SIZE)
    model = DDLForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    input_ids = torch.randint(0, VOCAB_SIZE, (BATCH_SIZE, SEQ_LEN), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_worker(warmup: int) -> None:
    """Warm up, then for each line N on stdin run N timed steps and answer one JSON line."""
    import torch

    step = _training_step()
    for _ in range(warmup):
        step()
    print(json.dumps({"threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        times, cpu_start, start = [], time.process_time(), time.time()
        for _ in range(int(line)):
            begin = time.perf_counter()
            step()
            times.append(time.perf_counter() - begin)
        report = {"step_seconds": times, "cpu_seconds": time.process_time() - cpu_start, "window": [start, time.time()]}
        print(json.dumps(report), flush=True)


def run_neighbour(log_path: str, deadline_s: float) -> None:
    """Train until stopped or until `deadline_s` seconds have passed; one line per step to `log_path`."""
    step = _training_step()
    step()
    end = time.time() + deadline_s
    with open(log_path, "a", buffering=1) as log:
        log.write("ready\n")
        while time.time() < end:
            begin = time.perf_counter()
            step()
            log.write(f"{time.time():.3f} {time.perf_counter() - begin:.4f}\n")


# --------------------------------------------------------------------------- orchestration (parent)
def torch_environment() -> dict[str, str]:
    removed = (*WAIT_VARIABLES, *THREAD_VARIABLES, "KMP_BLOCKTIME", APPLIED_MARKER)
    environment = {k: v for k, v in os.environ.items() if k not in removed}
    environment.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), environment.get("PYTHONPATH")]))
    return environment


def parse_settings(names: list[str]) -> dict[str, dict[str, str]]:
    """Setting name -> the variables it adds to `torch_environment()`."""
    settings: dict[str, dict[str, str]] = {}
    for name in names:
        if name == "torch":
            label, variables = name, {}
        elif name == "ddl_hf":
            label, variables = name, cpu_defaults(torch_environment())
        elif ":" in name:
            label, _, assignments = name.partition(":")
            if not label:
                raise ValueError(f"--settings {name!r}: the part before ':' names the setting and is empty")
            variables = {}
            for assignment in filter(None, assignments.split(",")):
                key, equals, value = assignment.partition("=")
                if not equals or not key:
                    raise ValueError(f"--settings {name!r}: expected NAME:VAR=VALUE,VAR=VALUE, got {assignment!r}")
                variables[key] = value
        else:
            raise ValueError(f"--settings {name!r} is unknown; allowed: torch, ddl_hf or NAME:VAR=VALUE,...")
        if label in settings:
            raise ValueError(f"--settings names {label!r} twice")
        settings[label] = variables
    return settings


def _read_line(process: subprocess.Popen, timeout: float, what: str) -> str:
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if ready else ""
    if not line:
        process.kill()
        raise RuntimeError(f"{what}: no answer within {timeout:.0f} s (exit code {process.poll()})")
    return line


class Worker:
    """One setting's training process, waiting for turns."""

    def __init__(self, name: str, variables: dict[str, str], warmup: int, errors: Path) -> None:
        self.name = name
        command = [sys.executable, __file__, "--worker", "--warmup", str(warmup)]
        with open(errors, "w") as error_file:
            self.process = subprocess.Popen(
                command,
                env={**torch_environment(), **variables},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=error_file,
                text=True,
            )
        self.errors = errors
        self.threads: int | None = None

    def wait_ready(self) -> None:
        self.threads = json.loads(self._answer(READY_TIMEOUT_S, "start"))["threads"]

    def turn(self, steps: int) -> dict:
        self.process.stdin.write(f"{steps}\n")
        self.process.stdin.flush()
        return json.loads(self._answer(STEP_TIMEOUT_S * steps, "turn"))

    def _answer(self, timeout: float, what: str) -> str:
        try:
            return _read_line(self.process, timeout, f"setting {self.name!r} ({what})")
        except RuntimeError as error:
            raise RuntimeError(f"{error}: {self.errors.read_text()[-2000:]}") from None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Neighbour:
    """The other CPU-bound job: a passive 2-thread training process in its own session."""

    def __init__(self, folder: Path, deadline_s: float) -> None:
        self.log, self.errors = folder / "neighbour-steps.log", folder / "neighbour-stderr.txt"
        self.log.touch()
        environment = {**torch_environment(), **NEIGHBOUR_ENV}
        command = [sys.executable, __file__, "--neighbour", str(self.log), "--deadline", str(deadline_s)]
        with open(self.errors, "w") as errors:
            self.process = subprocess.Popen(
                command, env=environment, stdout=subprocess.DEVNULL, stderr=errors, start_new_session=True
            )

    def wait_ready(self) -> None:
        start = time.time()
        while "ready" not in self.log.read_text():
            if self.process.poll() is not None:
                errors = self.errors.read_text()[-2000:]
                raise RuntimeError(f"the neighbour job exited ({self.process.returncode}): {errors}")
            if time.time() - start > READY_TIMEOUT_S:
                raise RuntimeError(f"the neighbour job was not ready after {READY_TIMEOUT_S} s")
            time.sleep(0.5)

    def step_seconds(self, window: list[float]) -> list[float]:
        """Step times of the neighbour's steps that ran entirely inside `window` (epoch seconds)."""
        steps = []
        for line in self.log.read_text().splitlines()[1:]:
            end, seconds = (float(value) for value in line.split())
            if window[0] <= end - seconds and end <= window[1]:
                steps.append(seconds)
        return steps

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def run_phase(workers: list[Worker], args: argparse.Namespace, phase: str, neighbour: Neighbour | None) -> dict:
    samples = {
        worker.name: {"step_seconds": [], "cpu_seconds": 0.0, "neighbour_step_seconds": []} for worker in workers
    }
    loads = [load_average()]
    for round_index in range(args.rounds):
        shift = round_index % len(workers)
        for worker in workers[shift:] + workers[:shift]:
            report = worker.turn(args.steps_per_turn)
            sample = samples[worker.name]
            sample["step_seconds"] += report["step_seconds"]
            sample["cpu_seconds"] += report["cpu_seconds"]
            if neighbour is not None:
                sample["neighbour_step_seconds"] += neighbour.step_seconds(report["window"])
        loads.append(load_average())
        print(f"{phase} round {round_index + 1}/{args.rounds} done, load average {loads[-1]}", flush=True)
    return {"samples": samples, "load_average": loads}


def run_benchmark(args: argparse.Namespace) -> dict:
    settings = parse_settings(args.settings)
    folder = Path(tempfile.mkdtemp(prefix="ddl-busy-cpu-"))
    workers: list[Worker] = []
    neighbour = None
    try:
        workers = [Worker(name, variables, args.warmup, folder / f"{name}.err") for name, variables in settings.items()]
        for worker in workers:
            worker.wait_ready()
        idle = run_phase(workers, args, "idle", None)
        # The deadline outlasts the loaded phase; it only matters if this script is killed.
        deadline = READY_TIMEOUT_S + args.rounds * len(workers) * args.steps_per_turn * STEP_TIMEOUT_S
        neighbour = Neighbour(folder, deadline)
        neighbour.wait_ready()
        loaded = run_phase(workers, args, "loaded", neighbour)
    finally:
        if neighbour is not None:
            neighbour.stop()
        for worker in workers:
            worker.stop()
        shutil.rmtree(folder, ignore_errors=True)
    results = {}
    for worker in workers:
        quiet, busy = idle["samples"][worker.name], loaded["samples"][worker.name]
        idle_step, loaded_step = statistics.median(quiet["step_seconds"]), statistics.median(busy["step_seconds"])
        neighbour_steps = busy["neighbour_step_seconds"]
        results[worker.name] = {
            "environment": settings[worker.name],
            "threads": worker.threads,
            "idle_seconds_per_step": idle_step,
            "loaded_seconds_per_step": loaded_step,
            "idle_tokens_per_second": TOKENS_PER_STEP / idle_step,
            "loaded_tokens_per_second": TOKENS_PER_STEP / loaded_step,
            "slowdown": loaded_step / idle_step,
            "idle_cpu_per_wall": quiet["cpu_seconds"] / sum(quiet["step_seconds"]),
            "loaded_cpu_per_wall": busy["cpu_seconds"] / sum(busy["step_seconds"]),
            "neighbour_seconds_per_step": statistics.median(neighbour_steps) if neighbour_steps else None,
            "idle_step_seconds": quiet["step_seconds"],
            "loaded_step_seconds": busy["step_seconds"],
        }
    return {
        "command": " ".join(["python", "scripts/bench_busy_cpu.py", *sys.argv[1:]]),
        "config": {
            "model": "mini ddl-cc, vocab 8192, AdamW, batch 8 x 256",
            "rounds": args.rounds,
            "steps_per_turn": args.steps_per_turn,
            "warmup": args.warmup,
            "neighbour": NEIGHBOUR_ENV,
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "machine": platform.platform(),
            "load_average_idle_phase": idle["load_average"],
            "load_average_loaded_phase": loaded["load_average"],
        },
        "results": results,
    }


def format_table(report: dict) -> str:
    header = (
        f"{'setting':<10} {'added environment':<38} {'threads':>7} {'idle s/step':>11} {'idle tok/s':>10} "
        f"{'loaded s/step':>13} {'loaded tok/s':>12} {'slowdown':>8} {'neighbour s/step':>16}"
    )
    lines = [header]
    for name, result in report["results"].items():
        environment = ",".join(f"{k}={v}" for k, v in result["environment"].items()) or "(none)"
        neighbour = result["neighbour_seconds_per_step"]
        lines.append(
            f"{name:<10} {environment:<38} {result['threads']:>7} {result['idle_seconds_per_step']:>11.3f} "
            f"{result['idle_tokens_per_second']:>10,.0f} {result['loaded_seconds_per_step']:>13.3f} "
            f"{result['loaded_tokens_per_second']:>12,.0f} {result['slowdown']:>7.2f}x "
            f"{'-' if neighbour is None else f'{neighbour:.3f}':>16}"
        )
    config = report["config"]
    steps = config["rounds"] * config["steps_per_turn"]

    def span(values: list[float | None]) -> str:
        known = [value for value in values if value is not None]
        return f"{min(known):.2f} to {max(known):.2f}" if known else "unknown"

    lines.append(
        f"{config['cpus']} CPUs; medians of {steps} steps per setting and phase; load average "
        f"{span(config['load_average_idle_phase'])} (idle phase), {span(config['load_average_loaded_phase'])} (loaded)"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds over all settings per phase (default 4)")
    parser.add_argument("--steps_per_turn", type=int, default=4, help="timed steps per setting per round (default 4)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps when a process starts (default 2)")
    parser.add_argument(
        "--settings", nargs="+", default=["torch", "ddl_hf"], help="torch, ddl_hf or NAME:VAR=VALUE,... (see above)"
    )
    parser.add_argument("--json", dest="json_path", default=None, help="also write the results to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--neighbour", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=600.0, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("rounds", "steps_per_turn"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be an integer >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be an integer >= 0, got {args.warmup}")
    if args.worker:
        run_worker(args.warmup)
        return 0
    if args.neighbour is not None:
        run_neighbour(args.neighbour, args.deadline)
        return 0
    try:
        settings = parse_settings(args.settings)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    if len(settings) < 1:
        raise SystemExit("--settings needs at least one setting")
    report = run_benchmark(args)
    print(format_table(report))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
