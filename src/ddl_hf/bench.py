"""`ddl bench`: speed and memory of DDL variants against the additive baseline.

Every variant is built at the same size preset, then measured side by side in one process:
each kind of measurement runs all variants in turn, `--repeats` times, with the order rotated
every round, after `--warmup` untimed runs, and the median is reported. Noise from other work
on the machine therefore hits all variants alike. The load average before and after is
recorded in the JSON config, so a reader can judge how quiet the machine was.

Measurements (tokens are batch_size x seq_len per forward unless said otherwise):

- train: one optimizer step, forward with labels + backward + `AdamW.step` + `zero_grad`.
- prefill: one forward without labels and without a cache, under `torch.inference_mode`.
- decode: after a prompt of `--decode_prompt_len` tokens, `--decode_tokens` greedy steps of one
  token with the cache, at each batch size of `--decode_batch_sizes`; new tokens per second.
- peak memory of training, measured in a fresh subprocess per variant (so variants never share
  an allocator): the largest total of live tensor bytes while the model is built and trained
  for 3 steps, which counts weights, gradients, AdamW state and the activations and temporaries
  of a step. On CUDA `torch.cuda.max_memory_allocated()`; on CPU the same quantity from the
  allocation events of `torch.profiler` (`profile_memory=True`), exact and free of the
  allocator noise that the resident set size carries (malloc caching and fragmentation).
- activations: bytes of the distinct tensors autograd saves for backward in one training
  forward (weights excluded), counted with `torch.autograd.graph.saved_tensors_hooks`. This
  is exact and free of allocator noise. With `--compile` it is the compiled model's forward:
  the tensors its graph saves, which AOTAutograd's partitioner chooses (it recomputes some
  intermediates in backward instead), so the figure differs from the eager one.

Each figure is also given as a ratio to `baseline` (added to `--variants` when missing).
`--reference` runs the plain reference implementations of `delta_ops` instead of the fast
paths, to show what the fast paths buy.

`--compile` wraps every model, the baseline included, with `torch.compile` (inductor, static shapes):
training steps and prefill run the compiled model; decoding fills a `StaticCache` with an eager prefill,
as `generate` does, then runs every one-token step through the compiled forward (`fullgraph=True`). The
first call of each compiled workload (the compile itself) is timed apart and reported as
`results[VARIANT]["compile_s"]`; the timed rounds come after it. Peak memory is then that of compiled
training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from transformers.cache_utils import Cache, StaticCache

from .command_line import check_preset_arguments, reports_input_errors
from .models.ddl.configuration_ddl import PRESET_SIZES, DDLConfig
from .models.ddl.delta_ops import recomputed_states, reference_paths
from .models.ddl.modeling_ddl import DDLForCausalLM

DEFAULT_VARIANTS = ["baseline", "ddl-scalar", "ddl-cc", "ddl-tc", "write-only-cc"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BASELINE = "baseline"
RECOMPUTE_SUFFIX = "+recompute"
TIMERS = {"wall": time.perf_counter, "cpu": time.process_time}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ddl bench",
        description="Measure training, prefill and decode throughput and training memory of DDL variants "
        "against the additive baseline, side by side in one process.",
    )
    parser.add_argument("--preset", default="mini", help=f"model size preset: {list(PRESET_SIZES)} (default mini)")
    parser.add_argument(
        "--variants", nargs="+", default=DEFAULT_VARIANTS, help=f"preset variants (default {DEFAULT_VARIANTS})"
    )
    parser.add_argument("--seq_len", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per batch (default 8)")
    parser.add_argument("--dtype", default="float32", help=f"model dtype: {list(DTYPES)} (default float32)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per variant first (default 2)")
    parser.add_argument("--decode_batch_sizes", type=int, nargs="+", default=[1, 8], help="(default 1 8)")
    parser.add_argument("--decode_prompt_len", type=int, default=64, help="prompt tokens before decoding (default 64)")
    parser.add_argument("--decode_tokens", type=int, default=32, help="new tokens per decode run (default 32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--timer",
        default="wall",
        help="wall (elapsed time, default) or cpu (CPU time of this process: robust to other load on the machine, "
        "meaningful with --threads 1 on CPU only)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and inputs (default 0)")
    parser.add_argument("--skip_memory", action="store_true", help="do not measure peak memory (no subprocesses)")
    parser.add_argument(
        "--reference", action="store_true", help="run the plain reference ops of delta_ops instead of the fast paths"
    )
    parser.add_argument(
        "--state_recompute",
        action="store_true",
        help=f"also measure every DDL variant with DDLConfig.state_recompute, as VARIANT{RECOMPUTE_SUFFIX}, side by "
        "side with it",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every model (training, prefill, and decoding with a static cache); compile time is "
        "reported apart",
    )
    parser.add_argument(
        "--compile_backend",
        default="inductor",
        help="torch.compile backend with --compile (default inductor; aot_eager or eager to separate tracing from "
        "code generation)",
    )
    parser.add_argument("--json", dest="json_path", default=None, help="write the results to this JSON file")
    # Internal: the fresh subprocess that measures one variant's peak memory.
    parser.add_argument("--memory_worker", default=None, help=argparse.SUPPRESS)
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    check_preset_arguments(args.preset, args.variants)
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype {args.dtype!r} is unknown; allowed: {list(DTYPES)}")
    for name in ("seq_len", "batch_size", "repeats", "decode_prompt_len", "decode_tokens"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name} must be an integer >= 1, got {value}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be an integer >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be an integer >= 1, got {args.threads}")
    if any(size < 1 for size in args.decode_batch_sizes):
        raise ValueError(f"--decode_batch_sizes must be integers >= 1, got {args.decode_batch_sizes}")
    args.device = resolve_device(args.device)
    if args.timer not in TIMERS:
        raise ValueError(f"--timer must be one of {list(TIMERS)}, got {args.timer!r}")
    if args.timer == "cpu" and args.device != "cpu":
        raise ValueError("--timer cpu measures CPU time and needs --device cpu")


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available in this torch installation")
        return name
    raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {name!r}")


# --------------------------------------------------------------------------- workloads
class Workload:
    """One variant's model, optimizer and fixed inputs; with `args.compile` the model runs compiled."""

    def __init__(self, args: argparse.Namespace, variant: str) -> None:
        torch.manual_seed(args.seed)
        preset_variant, recompute = split_recompute(variant)
        self.config = DDLConfig.from_preset(args.preset, preset_variant, state_recompute=recompute)
        self.model = DDLForCausalLM(self.config).to(device=args.device, dtype=DTYPES[args.dtype])
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.compiled = args.compile
        # Static shapes: every workload has fixed shapes, and a dynamic graph would be slower.
        backend = args.compile_backend
        self.forward = torch.compile(self.model, dynamic=False, backend=backend) if args.compile else self.model
        self.decode_step = (
            torch.compile(self.model, fullgraph=True, dynamic=False, backend=backend) if args.compile else self.model
        )
        # One static cache per batch size, reset before each run: a new cache object would recompile.
        self.static_caches: dict[int, StaticCache] = {}
        generator = torch.Generator().manual_seed(args.seed)
        vocab = self.config.vocab_size
        self.input_ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=generator).to(args.device)
        self.prompts = {
            size: torch.randint(0, vocab, (size, args.decode_prompt_len), generator=generator).to(args.device)
            for size in args.decode_batch_sizes
        }
        self.decode_tokens = args.decode_tokens

    def train_step(self) -> None:
        self.model.train()
        loss = self.forward(input_ids=self.input_ids, labels=self.input_ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def prefill(self) -> None:
        self.model.eval()
        with torch.inference_mode():
            self.forward(input_ids=self.input_ids, use_cache=False)

    def _fresh_cache(self, batch_size: int) -> Cache | None:
        """None (the model builds a dynamic cache) in eager mode; compiled, this batch size's static cache, reset."""
        if not self.compiled:
            return None
        cache = self.static_caches.get(batch_size)
        if cache is None:
            length = self.prompts[batch_size].shape[1] + self.decode_tokens
            cache = StaticCache(config=self.config, max_cache_len=length)
            self.static_caches[batch_size] = cache
        cache.reset()
        return cache

    def decode(self, batch_size: int, clock: Callable[[], float] = time.perf_counter) -> float:
        """Seconds spent on `decode_tokens` cached one-token steps (the prompt is not timed)."""
        self.model.eval()
        device = self.input_ids.device
        prompt = self.prompts[batch_size]
        with torch.inference_mode():
            cache = self._fresh_cache(batch_size)
            out = self.model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
            position = torch.full((batch_size, 1), prompt.shape[1], device=device)
            tokens = [token]
            _synchronize(device)
            start = clock()
            for _ in range(self.decode_tokens):
                out = self.decode_step(input_ids=token, position_ids=position, cache=cache, use_cache=True)
                cache, token, position = out.cache, out.logits[:, -1:].argmax(-1), position + 1
                tokens.append(token)
            _synchronize(device)
            seconds = clock() - start
        # The greedy tokens (B, 1 + decode_tokens), for tests that check what was decoded.
        self.last_decoded = torch.cat(tokens, dim=1)
        return seconds

    def activation_bytes(self) -> int:
        """Bytes of the distinct non-parameter tensors saved for backward by one training forward of the model as
        the training step runs it: compiled, the tensors the compiled graph saves (AOTAutograd's partitioner picks
        them and may recompute others in backward); its runtime saves them through autograd, so the hooks see them.
        """
        parameters = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        self.model.train()
        # With state_recompute the model's own hooks would hide what autograd keeps from these; so the ledger runs
        # here, under them, and only what it keeps as tensors is counted.
        original = self.config.state_recompute
        with recomputed_states() if original and not self.compiled else nullcontext() as ledger:

            def counted(tensor: torch.Tensor):
                packed = ledger.pack(tensor) if ledger is not None else tensor
                return pack(packed) if torch.is_tensor(packed) else packed

            unpack = ledger.unpack if ledger is not None else (lambda packed: packed)
            self.config.state_recompute = False
            try:
                with torch.autograd.graph.saved_tensors_hooks(counted, unpack):
                    loss = self.forward(input_ids=self.input_ids, labels=self.input_ids).loss
            finally:
                self.config.state_recompute = original
        del loss
        return sum(storages.values())


def split_recompute(variant: str) -> tuple[str, bool]:
    """`ddl-cc+recompute` -> ("ddl-cc", True); `ddl-cc` -> ("ddl-cc", False)."""
    if variant.endswith(RECOMPUTE_SUFFIX):
        return variant[: -len(RECOMPUTE_SUFFIX)], True
    return variant, False


def _synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(function: Callable[[], object], device: str, clock: Callable[[], float]) -> float:
    _synchronize(device)
    start = clock()
    function()
    _synchronize(device)
    return clock() - start


def interleaved_medians(
    variants: list[str],
    measure: Callable[[str], float],
    repeats: int,
    warmup: int,
    first_calls: dict[str, float] | None = None,
) -> dict[str, float]:
    """Median over `repeats` rounds of `measure(variant)`; each round visits every variant, starting
    one variant later than the round before, after `warmup` untimed rounds. `first_calls`, when given,
    receives each variant's first measurement (a compiled workload's compile), which always runs apart
    from the warmup."""
    if first_calls is not None:
        for variant in variants:
            first_calls[variant] = measure(variant)
    for _ in range(warmup):
        for variant in variants:
            measure(variant)
    samples: dict[str, list[float]] = {variant: [] for variant in variants}
    for round_index in range(repeats):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            samples[variant].append(measure(variant))
    return {variant: statistics.median(values) for variant, values in samples.items()}


# --------------------------------------------------------------------------- memory
def _peak_allocated_while(profiler: torch.profiler.profile) -> int:
    """Largest total of live CPU tensor bytes over the allocation events the profiler recorded."""
    peak, pending = 0, list(profiler.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        pending.extend(node.children)
        total = getattr(node.extra_fields, "total_allocated", None)  # only allocation events carry it
        if total is not None:
            peak = max(peak, total)
    return peak


def measure_memory_here(args: argparse.Namespace, variant: str, steps: int = 3) -> int:
    """Peak bytes of live tensors while one variant is built and trained for a few steps, in this
    (fresh) process: `torch.cuda.max_memory_allocated` on CUDA; on CPU the same quantity from the
    allocation events of `torch.profiler` (`profile_memory=True`), which tracks every CPU tensor
    allocated and freed after it starts."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        workload = Workload(args, variant)
        for _ in range(steps):
            workload.train_step()
        return torch.cuda.max_memory_allocated(device) - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        workload = Workload(args, variant)
        for _ in range(steps):
            workload.train_step()
    return _peak_allocated_while(profiler)


def measure_memory_in_subprocess(args: argparse.Namespace, variant: str) -> int:
    command = [sys.executable, "-m", "ddl_hf.cli", "bench", "--memory_worker", variant]
    command += ["--preset", args.preset, "--seq_len", str(args.seq_len), "--batch_size", str(args.batch_size)]
    command += ["--dtype", args.dtype, "--device", args.device, "--seed", str(args.seed)]
    command += ["--decode_batch_sizes", "1", "--decode_prompt_len", "1"]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    if args.reference:
        command.append("--reference")
    if args.compile:
        command += ["--compile", "--compile_backend", args.compile_backend]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the memory measurement of {variant} failed:\n{done.stderr[-2000:]}")
    return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_memory_bytes"])


# --------------------------------------------------------------------------- report
def run_benchmark(args: argparse.Namespace) -> dict:
    variants = args.variants if BASELINE in args.variants else [BASELINE, *args.variants]
    if args.state_recompute:
        variants = [*variants, *(name + RECOMPUTE_SUFFIX for name in variants if name != BASELINE)]
    if args.compile:
        # Dynamo keeps at most `recompile_limit` graphs per code object, and every model here shares the forward
        # functions' code: this process holds each variant in four compiled workloads (training, prefill, decoding
        # at each batch size). Past the limit dynamo runs the frames eagerly under its own overhead, 50x slower.
        limit = len(variants) * (2 + 2 * len(args.decode_batch_sizes)) + 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    load_before = _load_average()
    workloads = {variant: Workload(args, variant) for variant in variants}
    device, clock = args.device, TIMERS[args.timer]
    tokens = args.batch_size * args.seq_len

    # Compiled, the first call of each workload compiles; its wall time is reported apart.
    compile_seconds: dict[str, dict[str, float]] = {name: {} for name in variants}

    def medians(kind: str, measure: Callable[[str], float], warmup: int) -> dict[str, float]:
        first = {} if args.compile else None
        seconds = interleaved_medians(variants, measure, args.repeats, warmup, first)
        for name, value in (first or {}).items():
            compile_seconds[name][kind] = value
        return seconds

    def throughput(kind: str, function_of: Callable[[Workload], Callable[[], object]], count: int):
        seconds = medians(kind, lambda name: _timed(function_of(workloads[name]), device, clock), args.warmup)
        return {name: count / value for name, value in seconds.items()}

    metrics: dict[str, dict[str, float]] = {name: {} for name in variants}
    for name, value in throughput("train", lambda w: w.train_step, tokens).items():
        metrics[name]["train_tokens_per_s"] = value
    for name, value in throughput("prefill", lambda w: w.prefill, tokens).items():
        metrics[name]["prefill_tokens_per_s"] = value
    for size in args.decode_batch_sizes:
        seconds = medians(
            f"decode_batch_{size}", lambda name, size=size: workloads[name].decode(size, clock), min(args.warmup, 1)
        )
        for name, value in seconds.items():
            metrics[name][f"decode_batch_{size}_tokens_per_s"] = size * args.decode_tokens / value
    largest = max(args.decode_batch_sizes)
    for name in variants:
        metrics[name]["decode_tokens_per_s"] = metrics[name][f"decode_batch_{largest}_tokens_per_s"]
        metrics[name]["activation_bytes"] = workloads[name].activation_bytes()
    workloads.clear()  # free them before the memory subprocesses run
    if not args.skip_memory:
        for name in variants:
            metrics[name]["peak_memory_bytes"] = measure_memory_in_subprocess(args, name)

    results = {}
    for name in variants:
        entry = dict(metrics[name])
        for key, value in metrics[name].items():
            entry[_ratio_key(key)] = value / metrics[BASELINE][key]
        preset_variant, recompute = split_recompute(name)
        if recompute:  # what the option costs and saves: against the same variant without it ("plain")
            for key, value in metrics[name].items():
                entry[_ratio_key(key) + "_to_plain"] = value / metrics[preset_variant][key]
        if args.compile:
            entry["compile_s"] = compile_seconds[name]
        results[name] = entry
    config = {
        "preset": args.preset,
        "variants": variants,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "device": device,
        "device_name": _device_name(device),
        "threads": torch.get_num_threads(),
        "timer": args.timer,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "decode_batch_sizes": args.decode_batch_sizes,
        "decode_prompt_len": args.decode_prompt_len,
        "decode_tokens": args.decode_tokens,
        "ops": "reference" if args.reference else "fast",
        "compile": args.compile_backend if args.compile else None,
        "memory": None if args.skip_memory else _memory_definition(device),
        "load_average_before": load_before,
        "load_average_after": _load_average(),
        "torch": torch.__version__,
    }
    return {"config": config, "results": results}


def _ratio_key(key: str) -> str:
    """`train_tokens_per_s` -> `train_ratio`, `peak_memory_bytes` -> `memory_ratio`, ..."""
    for suffix in ("_tokens_per_s", "_bytes"):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    return ("memory" if key == "peak_memory" else key) + "_ratio"


def _memory_definition(device: str) -> str:
    if torch.device(device).type == "cuda":
        return "torch.cuda.max_memory_allocated over model creation and 3 training steps, fresh process per variant"
    return (
        "peak bytes of live CPU tensors (torch.profiler allocation events) over model creation and 3 training "
        "steps, fresh process per variant"
    )


def _load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def format_table(report: dict) -> str:
    """A markdown table: each figure with its ratio to the baseline."""
    config, results = report["config"], report["results"]
    columns = [
        ("train tok/s", "train_tokens_per_s", "train_ratio"),
        ("prefill tok/s", "prefill_tokens_per_s", "prefill_ratio"),
    ]
    columns += [
        (f"decode b{size} tok/s", f"decode_batch_{size}_tokens_per_s", f"decode_batch_{size}_ratio")
        for size in config["decode_batch_sizes"]
    ]
    columns.append(("activations MiB", "activation_bytes", "activation_ratio"))
    if config["memory"] is not None:
        columns.append(("peak memory MiB", "peak_memory_bytes", "memory_ratio"))
    header = "| variant | " + " | ".join(title for title, _, _ in columns) + " |"
    lines = [header, "|---|" + "---:|" * len(columns)]
    for name, entry in results.items():
        cells = []
        for _, key, ratio in columns:
            value = entry[key] / 2**20 if key.endswith("_bytes") else entry[key]
            shown = f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
            cells.append(f"{shown} ({entry[ratio]:.2f}x)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@reports_input_errors("bench")
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.memory_worker is not None:
        args.variants = [split_recompute(args.memory_worker)[0]]
    check_arguments(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with reference_paths() if args.reference else nullcontext():
        if args.memory_worker is not None:
            print(json.dumps({"peak_memory_bytes": measure_memory_here(args, args.memory_worker)}))
            return 0
        report = run_benchmark(args)
    print(
        f"ddl bench: preset {args.preset}, batch {args.batch_size} x seq {args.seq_len}, {args.dtype} on "
        f"{report['config']['device_name']} ({report['config']['threads']} threads), {args.repeats} rounds, "
        f"{report['config']['ops']} ops{', compiled' if args.compile else ''}, load average "
        f"{report['config']['load_average_before']} -> "
        f"{report['config']['load_average_after']}"
    )
    load = report["config"]["load_average_before"]
    if load is not None and args.timer == "wall" and load[0] > (os.cpu_count() or 1):
        print(
            f"ddl bench: warning: the machine was busy (load average {load[0]} on {os.cpu_count()} cores); "
            "wall-clock figures of multi-threaded runs are unreliable under load, rerun when it is idle or "
            "with --threads 1 --timer cpu",
            file=sys.stderr,
        )
    print(format_table(report))
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        print(f"wrote {args.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
