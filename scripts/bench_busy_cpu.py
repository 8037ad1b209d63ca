"""Training throughput of the main job's model alone and next to another CPU-bound job.

    python scripts/bench_busy_cpu.py [--steps 16] [--settings torch ddl_hf] [--json busy.json]

Each setting is a set of environment variables for a fresh training process (libgomp reads its
settings when torch is imported, so every measurement is its own process):

- `torch`: torch's defaults: every OpenMP variable removed (OMP_WAIT_POLICY, GOMP_SPINCOUNT,
  KMP_BLOCKTIME, OMP_NUM_THREADS, MKL_NUM_THREADS);
- `ddl_hf`: what the `ddl` commands run with: `torch` plus `ddl_hf_launch.cpu_defaults`;
- `NAME:VAR=VALUE,VAR=VALUE`: `torch` plus the given variables, to try other values
  (`passive:OMP_WAIT_POLICY=PASSIVE`, `spin1k:GOMP_SPINCOUNT=1000`, `one:OMP_NUM_THREADS=1`).

The training process builds the main job's model (`mini` DDL-CC, vocabulary 8,192) and runs
AdamW steps on random batches of 8 x 256 tokens: `--warmup` untimed, then `--steps` timed (fewer
when one measurement passes `--max_seconds`). "idle" runs it alone; "loaded" runs it next to a
neighbour this script starts: the same training loop with 2 threads and OMP_WAIT_POLICY=PASSIVE
(a well-behaved CPU-bound program), stopped at the end, or by its own deadline if this script
dies. The neighbour's own step time during each loaded measurement is reported too. Idle and
loaded runs alternate setting by setting within a round; with `--rounds` > 1 the medians are
reported. This is a benchmark, not a test: the figures depend on the machine and on whatever
else runs on it, so the load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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

from ddl_hf_launch import THREAD_VARIABLES, WAIT_VARIABLES, cpu_defaults  # noqa: E402

BATCH_SIZE, SEQ_LEN, VOCAB_SIZE = 8, 256, 8192
NEIGHBOUR_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "2"}
READY_TIMEOUT_S = 300


def load_average() -> list[float] | None:
    try:
        return [float(value) for value in Path("/proc/loadavg").read_text().split()[:3]]
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


def run_worker(steps: int, warmup: int, max_seconds: float) -> None:
    """Print one JSON line: step times of `steps` timed training steps (fewer past `max_seconds`)."""
    import torch

    step = _training_step()
    for _ in range(warmup):
        step()
    times, cpu_start, start = [], time.process_time(), time.time()
    while len(times) < steps and not (len(times) >= 2 and time.time() - start > max_seconds):
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
    cpu = time.process_time() - cpu_start
    report = {
        "threads": torch.get_num_threads(),
        "steps": len(times),
        "step_seconds": times,
        "window": [start, time.time()],
        "cpu_seconds": cpu,
    }
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
    environment = {k: v for k, v in os.environ.items() if k not in (*WAIT_VARIABLES, *THREAD_VARIABLES)}
    environment.pop("DDL_HF_CPU_DEFAULTS", None)
    environment.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), environment.get("PYTHONPATH")]))
    return environment


def parse_settings(names: list[str]) -> dict[str, dict[str, str]]:
    """Setting name -> the variables it adds to `torch_environment()`."""
    settings: dict[str, dict[str, str]] = {}
    for name in names:
        if name == "torch":
            settings[name] = {}
        elif name == "ddl_hf":
            settings[name] = cpu_defaults(torch_environment())
        elif ":" in name:
            label, _, assignments = name.partition(":")
            variables = {}
            for assignment in filter(None, assignments.split(",")):
                key, equals, value = assignment.partition("=")
                if not equals or not key:
                    raise ValueError(f"--settings {name!r}: expected NAME:VAR=VALUE,VAR=VALUE, got {assignment!r}")
                variables[key] = value
            if not label:
                raise ValueError(f"--settings {name!r}: the part before ':' names the setting and is empty")
            settings[label] = variables
        else:
            raise ValueError(f"--settings {name!r} is unknown; allowed: torch, ddl_hf or NAME:VAR=VALUE,...")
    return settings


def measure_timeout(args: argparse.Namespace) -> float:
    """Seconds one measurement may take: imports and warmup steps are slow on a busy machine."""
    return args.max_seconds + 60 * (args.warmup + 3)


def measure(args: argparse.Namespace, variables: dict[str, str]) -> dict:
    command = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--max_seconds", str(args.max_seconds)]
    environment = {**torch_environment(), **variables}
    done = subprocess.run(
        command, env=environment, capture_output=True, text=True, timeout=measure_timeout(args), check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"training process failed ({done.returncode}): {done.stderr[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["seconds_per_step"] = sum(report["step_seconds"]) / report["steps"]
    report["tokens_per_second"] = BATCH_SIZE * SEQ_LEN / report["seconds_per_step"]
    report["cpu_per_wall"] = report["cpu_seconds"] / sum(report["step_seconds"])
    return report


class Neighbour:
    """The other CPU-bound job: a passive 2-thread training process, always stopped on exit."""

    def __init__(self, deadline_s: float) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="ddl-neighbour-"))
        self.log, self.errors = self.folder / "steps.log", self.folder / "stderr.txt"
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

    def seconds_per_step(self, window: list[float]) -> float | None:
        """Mean step time of the neighbour's steps that ended inside `window` (epoch seconds)."""
        steps = []
        for line in self.log.read_text().splitlines()[1:]:
            end, seconds = (float(value) for value in line.split())
            if window[0] <= end - seconds and end <= window[1]:
                steps.append(seconds)
        return statistics.mean(steps) if steps else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def run_benchmark(args: argparse.Namespace) -> dict:
    settings = parse_settings(args.settings)
    names = list(settings)
    samples: dict[str, dict[str, list[dict]]] = {name: {"idle": [], "loaded": []} for name in names}
    load_before = load_average()
    for round_index in range(args.rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            report = measure(args, settings[name])
            samples[name]["idle"].append(report)
            print(f"round {round_index + 1} {name:<12} idle   {report['seconds_per_step']:.2f} s/step", flush=True)
        # The deadline outlasts every loaded measurement; it only matters if this script is killed.
        neighbour = Neighbour(deadline_s=READY_TIMEOUT_S + len(names) * measure_timeout(args))
        try:
            neighbour.wait_ready()
            for name in order:
                report = measure(args, settings[name])
                report["neighbour_seconds_per_step"] = neighbour.seconds_per_step(report["window"])
                samples[name]["loaded"].append(report)
                print(f"round {round_index + 1} {name:<12} loaded {report['seconds_per_step']:.2f} s/step", flush=True)
        finally:
            neighbour.stop()
    results = {}
    for name in names:
        idle = statistics.median(r["tokens_per_second"] for r in samples[name]["idle"])
        loaded = statistics.median(r["tokens_per_second"] for r in samples[name]["loaded"])
        neighbour = [r["neighbour_seconds_per_step"] for r in samples[name]["loaded"]]
        neighbour = [value for value in neighbour if value is not None]
        results[name] = {
            "environment": settings[name],
            "threads": samples[name]["idle"][0]["threads"],
            "idle_tokens_per_second": idle,
            "loaded_tokens_per_second": loaded,
            "idle_seconds_per_step": BATCH_SIZE * SEQ_LEN / idle,
            "loaded_seconds_per_step": BATCH_SIZE * SEQ_LEN / loaded,
            "slowdown": idle / loaded,
            "neighbour_seconds_per_step": statistics.median(neighbour) if neighbour else None,
            "samples": samples[name],
        }
    return {
        "config": {
            "model": "mini ddl-cc, vocab 8192",
            "batch": [BATCH_SIZE, SEQ_LEN],
            "steps": args.steps,
            "warmup": args.warmup,
            "max_seconds": args.max_seconds,
            "rounds": args.rounds,
            "neighbour": NEIGHBOUR_ENV,
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "machine": platform.platform(),
            "load_average_before": load_before,
            "load_average_after": load_average(),
        },
        "results": results,
    }


def format_table(report: dict) -> str:
    lines = [
        f"{'setting':<12} {'environment':<40} {'idle tok/s':>10} {'loaded tok/s':>12} {'slowdown':>8} "
        f"{'idle s/step':>11} {'loaded s/step':>13} {'neighbour s/step':>16}",
    ]
    for name, result in report["results"].items():
        environment = ",".join(f"{k}={v}" for k, v in result["environment"].items()) or "(none)"
        neighbour = result["neighbour_seconds_per_step"]
        lines.append(
            f"{name:<12} {environment:<40} {result['idle_tokens_per_second']:>10,.0f} "
            f"{result['loaded_tokens_per_second']:>12,.0f} {result['slowdown']:>7.2f}x "
            f"{result['idle_seconds_per_step']:>11.2f} {result['loaded_seconds_per_step']:>13.2f} "
            f"{'-' if neighbour is None else f'{neighbour:.2f}':>16}"
        )
    config = report["config"]
    lines.append(
        f"{config['cpus']} CPUs, {config['steps']} timed steps (at most {config['max_seconds']:g} s) per measurement, "
        f"{config['rounds']} round(s); load average before {config['load_average_before']}, "
        f"after {config['load_average_after']}"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16, help="timed training steps per measurement (default 16)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument(
        "--max_seconds", type=float, default=60.0, help="stop a measurement after this long, >= 2 steps (default 60)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="idle + loaded rounds; medians reported (default 1)")
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
    for name in ("steps", "rounds"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be an integer >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be an integer >= 0, got {args.warmup}")
    if args.max_seconds <= 0:
        raise SystemExit(f"--max_seconds must be > 0, got {args.max_seconds}")
    if args.worker:
        run_worker(args.steps, args.warmup, args.max_seconds)
        return 0
    if args.neighbour is not None:
        run_neighbour(args.neighbour, args.deadline)
        return 0
    report = run_benchmark(args)
    print(format_table(report))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
