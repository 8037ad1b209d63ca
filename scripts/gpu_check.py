#!/usr/bin/env python
"""One command for the first GPU: what has to work on the device, each step under a time budget.

    python scripts/gpu_check.py --device cuda --out gpu_check_out          # about 8 minutes at most on one H100
    python scripts/gpu_check.py --device cpu --preset tiny --out /tmp/dry   # the dry run (tests this script)

Steps (each a subprocess with its own timeout, recorded as pass / fail / skipped with a reason):

- tests_*: the tests marked `device` (tests/conftest.py's `device` fixture, `DDL_TEST_DEVICE`) through pytest:
  the fused ops against their references (forward and every gradient, fp32 and bf16, eager and compiled by
  inductor, which writes Triton on a GPU), cached generation against the full forward, save and load, FSDP2 in
  one process, bf16 autocast training and a bf16 model's cached generation. The dry run runs a quick subset of each
  file (`DRY_RUN_TESTS`).
- bench_eager, bench_compiled: `ddl bench --device DEVICE --dtype bfloat16` (a bf16 model: train, prefill, decode;
  eager with peak memory, `torch.cuda.max_memory_allocated` on CUDA; then `--compile`).
- train_sdpa, train_flash_attention_2: `ddl train` for 50 steps with `--bf16 true` (bf16 autocast) on a local
  tokenizer and local text files (no network), attention set by `--config_overrides attn_implementation=...`;
  flash-attention 2 only where the `flash_attn` package is installed and the device is CUDA.
- generate_static_compiled: `generate` with a static cache and its decoding step compiled, against eager greedy
  decoding (fp32, TF32 off): the tokens must be equal. A bf16 model's agreement is recorded, not required.

Writes OUT/gpu_check.json (schema below), OUT/gpu_check.md (the table), OUT/logs/STEP.log and each step's files.
The whole run stops starting steps when `--total_s` is spent (the rest are skipped, naming the reason).

JSON: {"schema": 1, "ok": bool (no step failed), "dry_run": bool, "device", "device_name", "preset", "torch",
"transformers", "cuda", "flash_attn", "started_utc", "seconds", "total_s", "command",
"steps": [{"name", "title", "status": "pass" | "fail" | "skipped", "reason": str | null, "seconds", "budget_s",
"command": [str] | null, "log": str | null, "details": {...}}]}.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCHEMA = 1
DEFAULT_TOTAL_S = 470  # under 8 minutes, leaving time for the report

# name -> (title, budget in seconds on a GPU, budget in the dry run). The budgets are ceilings; the run keeps
# within --total_s whatever they add up to.
STEPS = {
    "tests_fused_ops": ("fused ops vs references (fp32, bf16, eager, inductor)", 200, 240),
    "tests_generation_cache": ("cached generation vs full forward", 45, 120),
    "tests_checkpoints": ("save and load", 30, 60),
    "tests_fsdp2": ("FSDP2, one process", 60, 120),
    "tests_precision": ("bf16 autocast training, bf16 model generation", 45, 120),
    "bench_eager": ("ddl bench bf16, eager, peak memory", 75, 120),
    "train_sdpa": ("ddl train 50 steps, bf16, sdpa", 75, 180),
    "generate_static_compiled": ("generate: static cache, compiled step = eager", 120, 180),
    "bench_compiled": ("ddl bench bf16, --compile", 150, 180),
    "train_flash_attention_2": ("ddl train 50 steps, bf16, flash-attention 2", 75, 180),
}

TEST_FILES = {
    "tests_fused_ops": "tests/test_delta_ops.py",
    "tests_generation_cache": "tests/test_generation_cache.py",
    "tests_checkpoints": "tests/test_checkpoints.py",
    "tests_fsdp2": "tests/test_distributed.py",
    "tests_precision": "tests/test_precision.py",
}
# The dry run (CPU) runs a quick subset: the device plumbing, not the CPU suite again.
DRY_RUN_TESTS = {
    "tests_fused_ops": "opcheck or (token_compress_matches_reference and convolution) or cached_decoding",
    "tests_generation_cache": "crop_rolls and ddl-tc",
    "tests_checkpoints": "round_trips",
    "tests_fsdp2": "one_process",
    "tests_precision": "ddl-tc",
}
BENCH_VARIANTS = ["baseline", "ddl-cc", "ddl-tc"]
TRAIN_STEPS = 50


# --------------------------------------------------------------------------- running steps
def _environment(device: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["DDL_TEST_DEVICE"] = device
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    return env


def run_command(command: list[str], log: Path, timeout: float, device: str, cwd: Path = REPO) -> tuple[int | None, str]:
    """Runs `command` in its own process group, output to `log`; (return code or None on timeout, output tail)."""
    with open(log, "w", encoding="utf-8") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        process = subprocess.Popen(
            command, cwd=cwd, env=_environment(device), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = None
    return code, log.read_text(encoding="utf-8", errors="replace")[-3000:]


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.dry_run = args.device == "cpu"
        self.deadline = time.monotonic() + args.total_s
        self.steps: list[dict] = []

    def budget(self, name: str) -> int:
        title, gpu_budget, dry_budget = STEPS[name]
        return dry_budget if self.dry_run else gpu_budget

    def record(self, name: str, status: str, reason: str | None = None, **fields) -> dict:
        entry = {
            "name": name,
            "title": STEPS[name][0],
            "status": status,
            "reason": reason,
            "seconds": round(fields.pop("seconds", 0.0), 1),
            "budget_s": self.budget(name),
            "command": fields.pop("command", None),
            "log": fields.pop("log", None),
            "details": fields.pop("details", {}),
        }
        self.steps.append(entry)
        mark = {"pass": "PASS", "fail": "FAIL", "skipped": "SKIP"}[status]
        print(f"[gpu_check] {mark} {name} ({entry['seconds']} s){': ' + reason if reason else ''}", flush=True)
        return entry

    def run(self, name: str, command: list[str], check) -> dict:
        """Runs one step's command under min(its budget, the time left), then `check(code, tail)` ->
        (status, reason, details)."""
        left = self.deadline - time.monotonic()
        if left < 20:
            return self.record(name, "skipped", f"the run's time budget (--total_s {self.args.total_s}) is spent")
        timeout = min(self.budget(name), left)
        log = self.logs / f"{name}.log"
        start = time.monotonic()
        code, tail = run_command(command, log, timeout, self.args.device)
        seconds = time.monotonic() - start
        common = dict(seconds=seconds, command=command, log=str(log.relative_to(self.out)))
        if code is None:
            reason = f"timed out after {timeout:.0f} s (step budget {self.budget(name)} s)"
            return self.record(name, "fail", reason, details={"tail": tail[-1500:]}, **common)
        try:
            status, reason, details = check(code, tail)
        except Exception as error:  # a check that cannot read the step's output is the step's failure
            status, reason, details = "fail", f"could not check the result: {type(error).__name__}: {error}", {}
        if status == "fail":
            details = {**details, "tail": tail[-1500:]}
        return self.record(name, status, reason, details=details, **common)


# --------------------------------------------------------------------------- a) tests
def junit_counts(path: Path) -> dict:
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {
        key: sum(int(suite.get(key, 0)) for suite in suites) for key in ("tests", "failures", "errors", "skipped")
    }
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = failed[:20]
    return counts


def run_tests(runner: Runner, name: str) -> None:
    junit = runner.out / f"{name}.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "device", TEST_FILES[name]]
    command += [f"--junitxml={junit}", "-o", "junit_family=xunit1"]
    if runner.dry_run:
        command += ["-k", DRY_RUN_TESTS[name]]

    def check(code, tail):
        counts = junit_counts(junit)
        if code == 0 and counts["passed"] > 0:
            return "pass", None, counts
        if code == 5 or counts["tests"] == 0:
            return "fail", "no test was collected", counts
        return "fail", f"pytest exited {code}: {counts['failures']} failed, {counts['errors']} errors", counts

    runner.run(name, command, check)


# --------------------------------------------------------------------------- b) bench
def run_bench(runner: Runner, name: str, compiled: bool) -> None:
    report = runner.out / f"{name}.json"
    command = [sys.executable, "-m", "ddl_hf.cli", "bench", "--device", runner.args.device, "--dtype", "bfloat16"]
    # Compiled, one DDL variant beside the baseline (each compiles three workloads: train, prefill, decode).
    variants = ["baseline", "ddl-tc"] if runner.dry_run or compiled else BENCH_VARIANTS
    command += ["--preset", runner.args.preset, "--variants", *variants, "--json", str(report)]
    if runner.dry_run:
        command += ["--seq_len", "32", "--batch_size", "2", "--repeats", "1", "--warmup", "0", "--decode_tokens", "4"]
        command += ["--decode_batch_sizes", "2", "--decode_prompt_len", "8", "--skip_memory"]
    else:
        command += ["--repeats", "2" if compiled else "3", "--warmup", "1"]
    if compiled:
        # Inductor on the GPU (Triton); the dry run traces with aot_eager (no C++ compiles on a small CPU).
        command += ["--compile", "--compile_backend", runner.args.compile_backend, "--skip_memory"]
        command += ["--decode_batch_sizes", "8"] if not runner.dry_run else []

    def check(code, tail):
        if code != 0:
            return "fail", f"ddl bench exited {code}", {}
        data = json.loads(report.read_text())
        results, config = data["results"], data["config"]
        details = {"config": {k: config[k] for k in ("device", "device_name", "dtype", "compile", "memory")}}
        details["results"] = results
        details["table"] = format_bench_table(data)
        keys = ["train_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s"]
        bad = [f"{v}.{k}" for v, entry in results.items() for k in keys if not entry.get(k, 0) > 0]
        if bad:
            return "fail", f"missing or non-positive figures: {bad}", details
        if config["memory"] is not None:
            if runner.args.device.startswith("cuda") and "max_memory_allocated" not in config["memory"]:
                return "fail", f"peak memory is not torch.cuda.max_memory_allocated: {config['memory']}", details
            if not all(entry["peak_memory_bytes"] > 0 for entry in results.values()):
                return "fail", "a peak memory figure is not positive", details
        return "pass", None, details

    runner.run(name, command, check)


def format_bench_table(report: dict) -> str:
    sys.path.insert(0, str(REPO / "src"))
    from ddl_hf.bench import format_table

    return format_table(report)


# --------------------------------------------------------------------------- c) train
def prepare_train_assets(folder: Path, dry_run: bool) -> dict:
    """A BPE tokenizer and train / validation JSON-lines files cut from the built-in corpus (standard-library
    sources on this machine): `ddl train` then needs no network."""
    sys.path.insert(0, str(REPO / "src"))
    from ddl_hf.data import builtin_corpus_documents
    from ddl_hf.tokenization import train_bpe_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    documents = [text for _, text in builtin_corpus_documents("validation")]
    texts = [text[:4000] for text in documents[: 60 if dry_run else 400] if text.strip()]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300 if dry_run else 2048)
    tokenizer.save_pretrained(folder / "tokenizer")
    files = {"tokenizer": str(folder / "tokenizer")}
    for split, part in (("train", texts[: -len(texts) // 8]), ("validation", texts[-len(texts) // 8 :])):
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps({"text": text}) + "\n" for text in part), encoding="utf-8")
        files[split] = str(path)
    return files


def run_train(runner: Runner, name: str, attention: str, assets: dict | None) -> None:
    if attention == "flash_attention_2":
        if not runner.args.device.startswith("cuda"):
            runner.record(name, "skipped", "flash-attention 2 runs on CUDA only")
            return
        if importlib.util.find_spec("flash_attn") is None:
            runner.record(name, "skipped", "the flash_attn package is not installed")
            return
    if assets is None:
        runner.record(name, "fail", "the local tokenizer and data could not be prepared (see train_sdpa)")
        return
    output = runner.out / name
    block, batch = (32, 4) if runner.dry_run else (256, 8)
    command = [sys.executable, "-m", "ddl_hf.cli", "train", "--preset", runner.args.preset, "--variant", "ddl-tc"]
    command += ["--tokenizer_name", assets["tokenizer"], "--train_file", assets["train"]]
    command += ["--validation_file", assets["validation"], "--dataset_cache_dir", str(runner.out / "datasets_cache")]
    command += ["--block_size", str(block), "--per_device_train_batch_size", str(batch)]
    command += ["--per_device_eval_batch_size", str(batch), "--max_eval_samples", "16"]
    command += ["--max_steps", str(TRAIN_STEPS), "--warmup_steps", "5", "--logging_steps", "5"]
    command += ["--eval_steps", str(TRAIN_STEPS), "--save_strategy", "no", "--report_to", "none"]
    command += ["--bf16", "true", "--config_overrides", f"attn_implementation={attention}"]
    command += ["--output_dir", str(output)]
    if not runner.args.device.startswith("cuda"):
        command += ["--use_cpu", "true"]

    def check(code, tail):
        if code != 0:
            return "fail", f"ddl train exited {code}", {}
        state = json.loads((output / "trainer_state.json").read_text())
        losses = {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}
        evals = [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]
        config = json.loads((output / "config.json").read_text())
        details = {"global_step": state["global_step"], "losses": losses, "eval_loss": evals[-1] if evals else None}
        details["saved_dtype"] = config.get("dtype", config.get("torch_dtype"))
        if state["global_step"] != TRAIN_STEPS:
            return "fail", f"trained {state['global_step']} steps, not {TRAIN_STEPS}", details
        values = list(losses.values())
        if not values or not all(math.isfinite(value) for value in values + evals):
            return "fail", "a logged loss is missing or not finite", details
        if not values[-1] < values[0]:
            return "fail", f"the loss did not fall: {values[0]:.3f} -> {values[-1]:.3f}", details
        return "pass", None, details

    runner.run(name, command, check)


# --------------------------------------------------------------------------- d) generate (worker)
def generate_worker(args: argparse.Namespace) -> int:
    """In a fresh process: greedy tokens of `generate` with a static cache and a compiled decoding step against
    eager greedy decoding with the dynamic cache, per variant; writes a JSON report to --worker_out."""
    import torch
    from transformers import CompileConfig

    sys.path.insert(0, str(REPO / "src"))
    from ddl_hf import DDLConfig, DDLForCausalLM

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    variants = ["ddl-tc"] if device.type == "cpu" else ["ddl-cc", "ddl-tc"]
    new_tokens = 12 if device.type == "cpu" else 32
    results = {}
    for variant in variants:
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            model = DDLForCausalLM(DDLConfig.from_preset(args.preset, variant)).eval()
            with torch.no_grad():  # off the init, so that the tokens depend on every weight
                for parameter in model.parameters():
                    parameter.add_(0.05 * torch.randn_like(parameter))
            model = model.to(device, dtype)
            prompt = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
            prompt = prompt.to(device)
            greedy = dict(do_sample=False, max_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None)
            eager = model.generate(prompt, disable_compile=True, **greedy)
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            compile_config = CompileConfig(fullgraph=True, dynamic=False, backend=args.compile_backend)
            compile_config._compile_all_devices = True  # on the CPU too (the dry run)
            start = time.perf_counter()
            compiled = model.generate(prompt, cache_implementation="static", compile_config=compile_config, **greedy)
            seconds = time.perf_counter() - start
            graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
            new = slice(prompt.shape[1], None)
            results[f"{variant}/{str(dtype).removeprefix('torch.')}"] = {
                "equal": bool(torch.equal(eager, compiled)),
                "match_fraction": float((eager[:, new] == compiled[:, new]).float().mean()),
                "compiled_graphs": graphs,
                "compiled_generate_s": round(seconds, 2),
                "shape": list(compiled.shape),
            }
            # After every entry: a run stopped by its timeout still leaves what it finished.
            Path(args.worker_out).write_text(json.dumps(results, indent=2))
    return 0


def run_generate(runner: Runner) -> None:
    name = "generate_static_compiled"
    report = runner.out / f"{name}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "generate", "--device", runner.args.device]
    command += ["--preset", runner.args.preset, "--compile_backend", runner.args.compile_backend]
    command += ["--worker_out", str(report), "--out", str(runner.out)]

    def check(code, tail):
        if code != 0:
            return "fail", f"the generate worker exited {code}", {}
        results = json.loads(report.read_text())
        details = {"results": results}
        not_compiled = [key for key, entry in results.items() if entry["compiled_graphs"] < 1]
        if not_compiled:
            return "fail", f"generate compiled no graph for {not_compiled}", details
        # fp32 (TF32 off): the compiled static-cache tokens must be the eager tokens. bf16: recorded only, since
        # inductor's fused kernels round differently and a greedy near-tie may then flip.
        unequal = [key for key, entry in results.items() if key.endswith("float32") and not entry["equal"]]
        if unequal:
            return "fail", f"compiled static-cache tokens differ from eager greedy for {unequal}", details
        return "pass", None, details

    runner.run(name, command, check)


# --------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    lines = [
        f"# gpu_check: {'dry run on ' if report['dry_run'] else ''}{report['device_name']}",
        "",
        f"device `{report['device']}`, preset `{report['preset']}`, torch {report['torch']}, transformers "
        f"{report['transformers']}, CUDA {report['cuda']}, flash_attn {report['flash_attn']}; "
        f"{report['seconds']:.0f} s in all (limit {report['total_s']} s); started {report['started_utc']}.",
        f"**{'all steps passed or were skipped' if report['ok'] else 'FAILED'}**",
        "",
        "| step | what | status | seconds | budget s | notes |",
        "|---|---|---|---:|---:|---|",
    ]
    for step in report["steps"]:
        note = step["reason"] or ""
        details = step["details"]
        if step["name"].startswith("tests_") and "tests" in details:
            counts = f"{details['passed']} passed, {details['failures'] + details['errors']} failed"
            note = f"{counts}, {details['skipped']} skipped" + (f"; {note}" if note else "")
        elif step["name"].startswith("train_") and "losses" in details and details["losses"]:
            values = list(details["losses"].values())
            note = f"loss {values[0]:.3f} -> {values[-1]:.3f}" + (f"; {note}" if note else "")
        note = note.replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {step['name']} | {step['title']} | {step['status']} | {step['seconds']:.1f} | {step['budget_s']} "
            f"| {note} |"
        )
    for step in report["steps"]:
        if "table" in step["details"]:
            lines += ["", f"## {step['name']}", "", step["details"]["table"]]
    return "\n".join(lines) + "\n"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for the dry run (default cuda)")
    parser.add_argument("--preset", default=None, help="model size preset (default small; tiny with --device cpu)")
    parser.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and the logs")
    parser.add_argument("--total_s", type=float, default=DEFAULT_TOTAL_S, help="time for all steps together")
    parser.add_argument("--only", nargs="+", choices=list(STEPS), default=None, help="run these steps only")
    parser.add_argument(
        "--compile_backend", default=None, help="torch.compile backend (default inductor; aot_eager on cpu)"
    )
    parser.add_argument("--worker", choices=["generate"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker_out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.preset is None:
        args.preset = "tiny" if args.device == "cpu" else "small"
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.device == "cpu" else "inductor"
    if args.worker == "generate":
        return generate_worker(args)

    import torch  # here, not at the top: the workers above import what they need themselves

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available (use --device cpu for the dry run)")
    started, start = datetime.now(timezone.utc), time.monotonic()
    runner = Runner(args)
    selected = args.only or list(STEPS)
    assets, assets_tried = None, False
    for name in STEPS:
        if name not in selected:
            runner.record(name, "skipped", "not selected (--only)")
        elif name in TEST_FILES:
            run_tests(runner, name)
        elif name.startswith("bench_"):
            run_bench(runner, name, compiled=name == "bench_compiled")
        elif name.startswith("train_"):
            if not assets_tried:
                assets_tried = True
                try:
                    assets = prepare_train_assets(runner.out / "train_assets", runner.dry_run)
                except Exception as error:  # recorded as the train steps' failure
                    print(f"[gpu_check] preparing the train assets failed: {error}", flush=True)
            run_train(runner, name, name.removeprefix("train_"), assets)
        else:
            run_generate(runner)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.machine()
    report = {
        "schema": SCHEMA,
        "ok": all(step["status"] != "fail" for step in runner.steps),
        "dry_run": runner.dry_run,
        "device": args.device,
        "device_name": device_name,
        "preset": args.preset,
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "cuda": torch.version.cuda,
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
        "started_utc": started.isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - start, 1),
        "total_s": args.total_s,
        "command": [sys.executable, *sys.argv],
        "steps": runner.steps,
    }
    out = Path(args.out)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
