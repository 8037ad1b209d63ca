"""Shared test setup: never touch the network, keep runs deterministic and small."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Tiny test models run fastest on one thread, and two threads thrash when the machine is busy.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# And the OpenMP waiting of the `ddl` commands (bounded spinning), before torch loads libgomp; the
# tests' subprocesses inherit it. Torch's default spinning is several times slower on a busy machine.
from ddl_hf_launch import apply_cpu_defaults  # noqa: E402

apply_cpu_defaults()

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


# The files with the longest tests go first: the README's test command runs the suite on 2 pytest-xdist workers,
# a file to a worker (`-n 2 --dist loadfile`), and a long file started last would leave the other worker idle.
LONGEST_FILES_FIRST = ("test_readme.py", "test_gpu_check.py", "test_train_resilience.py", "test_bench.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file is kept


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """One intra-op thread for a module's in-process training runs (`pytestmark = usefixtures(...)`): on a loaded
    2-core machine torch's pool otherwise spins against the other processes, and exact comparisons of runs need
    the same thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# --------------------------------------------------------------------------- the device under test
# `DDL_TEST_DEVICE` (default "cpu") picks where the tests marked `device` put their tensors and models
# (`scripts/gpu_check.py` runs them with `DDL_TEST_DEVICE=cuda pytest -m device`). Inputs are still drawn on the CPU
# from the same seeds and moved, so a test sees the same numbers on every device.
TEST_DEVICE = torch.device(os.environ.get("DDL_TEST_DEVICE", "cpu"))


@pytest.fixture
def device() -> torch.device:
    """The device of the tests marked `device` (`DDL_TEST_DEVICE`, default cpu). On CUDA it switches TF32 off
    for the test (cuDNN convolutions default to it), so that fp32 means fp32 there as it does on the CPU."""
    if TEST_DEVICE.type == "cuda":
        if not torch.cuda.is_available():
            pytest.fail(f"DDL_TEST_DEVICE={TEST_DEVICE} but CUDA is not available")
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:  # with its index, so that it compares equal to the devices of the tensors placed on it
            yield TEST_DEVICE if TEST_DEVICE.index is not None else torch.device("cuda", torch.cuda.current_device())
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        return
    yield TEST_DEVICE


# --------------------------------------------------------------------------- builders shared by the test files
# Plain functions, imported as `from conftest import tiny_model, ...`: pytest's default "prepend" import mode puts
# this folder (it has no __init__.py) on sys.path, and the module it imports as `conftest` is this one.
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from ddl_hf import DDLConfig, DDLForCausalLM  # noqa: E402

TINY_VOCAB = DDLConfig.from_preset("tiny", "baseline").vocab_size


def tiny_model(variant: str = "ddl-cc", *, seed: int | None = 0, **overrides) -> DDLForCausalLM:
    """A tiny-preset model as constructed (training mode), built right after `torch.manual_seed(seed)`
    (`seed=None`: from the global RNG as it is); `overrides` go to `DDLConfig.from_preset`."""
    if seed is not None:
        torch.manual_seed(seed)
    return DDLForCausalLM(DDLConfig.from_preset("tiny", variant, **overrides))


# The token filters and the compressor reads of either form (free W, factored kernel and shared read vector).
COMPRESSOR_AND_FILTER_NAMES = ("conv_weight", "read_weight", "channel_kernel", "read_vector")


def _generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    if seed is not None and generator is not None:
        raise TypeError("pass a seed or a generator, not both")
    return generator if seed is None else torch.Generator().manual_seed(seed)


@torch.no_grad()
def perturb(
    model: torch.nn.Module,
    scale: float,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    filter_scale: float | None = None,
) -> torch.nn.Module:
    """Moves every parameter off its initialization by `scale` times N(0, 1) noise (`filter_scale`, when given,
    for the token filters and compressor reads, `COMPRESSOR_AND_FILTER_NAMES`), drawn parameter by parameter
    from a new generator seeded with `seed`, from `generator`, or from the global RNG. Returns the model."""
    generator = _generator(seed, generator)
    for name, parameter in model.named_parameters():
        wide = filter_scale is not None and name.endswith(COMPRESSOR_AND_FILTER_NAMES)
        parameter.add_(torch.randn(parameter.shape, generator=generator) * (filter_scale if wide else scale))
    return model


def random_tokens(
    batch: int, length: int, *, seed: int | None = None, generator: torch.Generator | None = None, low: int = 0
) -> torch.Tensor:
    """(batch, length) token ids, uniform in [low, TINY_VOCAB), from a new generator seeded with `seed`, from
    `generator`, or from the global RNG."""
    return torch.randint(low, TINY_VOCAB, (batch, length), generator=_generator(seed, generator))


def write_jsonl(path, texts, column: str = "text", with_id: bool = False) -> str:
    """One JSON object a line: each text under `column`, and with `with_id` an "id" field (the text's length)
    beside it. Returns the path as a string."""
    with open(path, "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({column: text, "id": len(text)} if with_id else {column: text}) + "\n")
    return str(path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a launcher's rendezvous (tests may run side by side)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def two_process_torchrun() -> list[str]:
    """`python -m torch.distributed.run` for 2 processes on this machine, on a free port; append its options, the
    script and the script's arguments."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
    ]  # fmt: skip


def two_process_accelerate_launch() -> list[str]:
    """`accelerate launch` of 2 CPU processes (DDP over gloo) on a free port, no mixed precision or dynamo; append
    the script and its arguments."""
    return [
        str(Path(sys.executable).with_name("accelerate")), "launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()),
        "--mixed_precision", "no", "--dynamo_backend", "no",
    ]  # fmt: skip


def offline_env(**changes: str | None) -> dict[str, str]:
    """The environment for a child process: this one's, offline, with `changes` (a None value removes a variable)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **changes}
    return {name: value for name, value in env.items() if value is not None}


def run_fresh_python(script: str, *args, cwd, modules_cache, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `python -c script *args` in a fresh offline process without PYTHONPATH; the code that
    `trust_remote_code=True` copies lands in `modules_cache`, not in the user's cache."""
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=cwd,
        env=offline_env(HF_MODULES_CACHE=str(modules_cache), PYTHONPATH=None),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --------------------------------------------------------------------------- what loading logs
import logging  # noqa: E402

from transformers.utils import logging as hf_logging  # noqa: E402


@pytest.fixture
def load_log(caplog):
    """`caplog` holding what loading logs at WARNING: transformers' loading report (its library logger does not
    propagate, and the suite runs with TRANSFORMERS_VERBOSITY=error) and ddl_hf's own warnings."""
    library = hf_logging.get_logger("transformers")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    library.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING)
    try:
        yield caplog
    finally:
        library.removeHandler(caplog.handler)
        hf_logging.set_verbosity(verbosity)


def ddl_warnings(caplog) -> list[str]:
    """The WARNING messages that ddl_hf itself logged (`checkpoint_checks.check_loaded_weights`)."""
    return [r.getMessage() for r in caplog.records if r.name.startswith("ddl_hf.") and r.levelno == logging.WARNING]


def transformers_report(caplog) -> str:
    """What transformers logged (its loading report names every missing, unexpected or mismatched key)."""
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("transformers"))
