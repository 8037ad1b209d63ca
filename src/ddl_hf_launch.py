"""Entry point of the `ddl` command: CPU defaults for OpenMP and malloc first, then `ddl_hf.cli`.

PyTorch's CPU kernels run on an OpenMP thread pool (GNU libgomp in the Linux wheels). By default
a waiting libgomp thread spins for 300,000 iterations (milliseconds) before it sleeps. On a
machine that is doing something else, the spinning thread burns the core that its team mate, or
the other program, needs: next to one other 2-thread job on 2 cores a training step of the main
job got 7 to 14 times slower. A spin of 1,000 iterations, then sleep, keeps the idle speed (within
2%) and most of the loaded speed of never spinning (`OMP_WAIT_POLICY=PASSIVE`, which costs about
3% on an idle machine); the measurements are in docs/performance.md. libgomp reads its settings once, when
`import torch` loads it, so they must be in the environment before torch is imported.

This module is deliberately outside the `ddl_hf` package: importing any `ddl_hf` module runs
`ddl_hf/__init__.py`, which imports transformers and torch, which is too late. It imports
nothing but the standard library. The `ddl` console script (`ddl_hf_launch:main`),
`python -m ddl_hf`, and `scripts/train.py` (also under `accelerate launch`) call
`apply_cpu_defaults()` before torch is imported; a program that merely does `import ddl_hf`
keeps its environment as it is.

The defaults only fill what the user left unset:

- waiting: `GOMP_SPINCOUNT=1000` (`WAIT_DEFAULTS`), unless `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT`
  is set. Only libgomp reads it: with another OpenMP runtime, such as LLVM's libomp, set
  `OMP_WAIT_POLICY=PASSIVE` yourself. `KMP_BLOCKTIME`, which `accelerate launch --cpu` sets,
  is for Intel's and LLVM's runtimes; libgomp ignores it, so it does not count as a choice;
- threads: `OMP_NUM_THREADS` = the physical cores this process may run on (its CPU affinity
  mask, at most the cgroup CPU quota), divided among the processes of a multi-process launch
  (`LOCAL_WORLD_SIZE` and the like), unless `OMP_NUM_THREADS` or `MKL_NUM_THREADS` is set.

- memory: glibc's malloc keeps freed memory for reuse (`MALLOC_MMAP_MAX_=0`,
  `MALLOC_TRIM_THRESHOLD_=2147483647`, `MEMORY_DEFAULTS`), unless one of `MEMORY_VARIABLES` is set.
  By default glibc serves each large block (above an adaptive threshold of 128 KiB to 32 MiB) with
  fresh pages from the kernel and returns them at free, and gives back the top of its heap: a
  training step's activations and gradients (MiB each) are then faulted in again, page by page,
  at every step. Keeping them made training steps 3 to 13% shorter for the baseline and 16 to 18%
  for DDL-CC on this project's CPU (mini preset) and cut the page faults by 6 to 8x (measurements in
  docs/performance.md, "A busy CPU"); the process's resident memory stays at its peak
  instead of shrinking between steps. glibc reads these variables when a process starts, so the
  running process gets the same settings through `mallopt`; other C libraries ignore them.

Child processes (accelerate workers, the memory subprocesses of `ddl bench`) inherit them.
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import sys
import warnings
from collections.abc import Mapping, MutableMapping
from pathlib import Path

# A bounded spin, then sleep: libgomp's default is 300,000 iterations, PASSIVE is 0. The measurements behind the
# value are in docs/performance.md ("A busy CPU: the OpenMP and malloc defaults of the commands").
WAIT_DEFAULTS = {"GOMP_SPINCOUNT": "1000"}
# Either of these set means "I chose how libgomp's threads wait": leave waiting alone.
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# Either of these set by the user fixes torch's intra-op thread count: leave it alone.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# Processes per machine, as launchers (torchrun, MPI) announce it: the cores are shared among them.
LOCAL_SIZE_VARIABLES = (
    "LOCAL_WORLD_SIZE",
    "MPI_LOCALNRANKS",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MV2_COMM_WORLD_LOCAL_SIZE",
)
# Freed memory stays in malloc's heap: no blocks of their own from the kernel (mmap), no trimming of the heap top
# (below 2 GiB, the largest value `mallopt` takes). The measurements are in the module docstring.
MEMORY_DEFAULTS = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647"}
# Any of these set means "I chose how memory is allocated" (glibc's settings, or another allocator preloaded).
MEMORY_VARIABLES = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
    "LD_PRELOAD",
)
# glibc's `mallopt` parameters for the variables of MEMORY_DEFAULTS (malloc.h).
_MALLOPT_PARAMETERS = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_MMAP_MAX_": -4}
# Set in the environment once the defaults were applied (inherited by child processes).
APPLIED_MARKER = "DDL_HF_CPU_DEFAULTS"


def _is_set(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip() != ""


def physical_cores(cpus: set[int], sysfs: str | Path = "/sys/devices/system/cpu") -> int:
    """Number of distinct physical cores among the logical CPUs `cpus` (SMT siblings count once),
    read from the sysfs CPU topology; a CPU without topology files counts as its own core."""
    cores = set()
    for cpu in cpus:
        topology = Path(sysfs) / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            cores.add(("cpu", str(cpu)))
            continue
        cores.add((package, core))
    return max(1, len(cores))


def cgroup_cpu_limit(cpu_max: str) -> int | None:
    """CPUs allowed by a cgroup v2 `cpu.max` line (`"QUOTA PERIOD"`, rounded up), None without a quota."""
    fields = cpu_max.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def _cgroup_limit_of_this_process(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The smallest CPU quota on the cgroup v2 path of this process, None when there is none."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    relative = next((line[3:] for line in lines if line.startswith("0::")), None)
    if relative is None:
        return None
    limits = []
    folder = root / relative.lstrip("/")
    while True:
        try:
            limit = cgroup_cpu_limit((folder / "cpu.max").read_text())
        except OSError:
            limit = None
        if limit is not None:
            limits.append(limit)
        if folder == root or root not in folder.parents:
            break
        folder = folder.parent
    return min(limits) if limits else None


def usable_cores() -> int:
    """Physical cores in this process's CPU affinity mask, at most its cgroup CPU quota."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)
    cores = physical_cores(cpus)
    limit = _cgroup_limit_of_this_process()
    return min(cores, limit) if limit is not None else cores


def cpu_defaults(environ: Mapping[str, str], cores: int | None = None) -> dict[str, str]:
    """The variables `apply_cpu_defaults` would add to `environ`; never one the user set."""
    defaults: dict[str, str] = {}
    if not any(_is_set(environ, name) for name in WAIT_VARIABLES):
        defaults.update(WAIT_DEFAULTS)
    if not any(_is_set(environ, name) for name in THREAD_VARIABLES):
        count = usable_cores() if cores is None else cores
        if count < 1:
            raise ValueError(f"cores must be an integer >= 1, got {count}")
        defaults["OMP_NUM_THREADS"] = str(max(1, count // local_processes(environ)))
    if not any(_is_set(environ, name) for name in MEMORY_VARIABLES):
        defaults.update(MEMORY_DEFAULTS)
    return defaults


def set_malloc_options(settings: Mapping[str, str]) -> bool:
    """Give this process the glibc malloc settings among `settings` (`MEMORY_DEFAULTS` names) through
    `mallopt`, since glibc reads them from the environment only when a process starts. False, doing
    nothing, without glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    for name, value in settings.items():
        if name in _MALLOPT_PARAMETERS and mallopt(_MALLOPT_PARAMETERS[name], int(value)) != 1:
            warnings.warn(f"ddl_hf_launch: glibc's mallopt refused {name}={value}; keeping its default", stacklevel=2)
    return True


def local_processes(environ: Mapping[str, str]) -> int:
    """Processes of this job on this machine, from the first of `LOCAL_SIZE_VARIABLES` a launcher set (else 1)."""
    for name in LOCAL_SIZE_VARIABLES:
        if _is_set(environ, name):
            try:
                size = int(environ[name])
            except ValueError:
                raise ValueError(f"{name} must be an integer >= 1, got {environ[name]!r}") from None
            if size < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {size}")
            return size
    return 1


def apply_cpu_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Add `cpu_defaults` to `environ` (default `os.environ`) and return what was added.

    The OpenMP settings take effect only before torch is imported in this process (libgomp reads
    them when it is loaded); the malloc settings also reach `os.environ`'s own process at once
    (`set_malloc_options`). Child processes started later inherit them all either way."""
    if environ is None:
        environ = os.environ
        if "torch" in sys.modules:
            warnings.warn(
                "ddl_hf_launch.apply_cpu_defaults(): torch is already imported, so this process keeps the OpenMP "
                "settings it started with; only child processes get the defaults. Call it before importing torch.",
                stacklevel=2,
            )
    added = cpu_defaults(environ)
    environ.update(added)
    environ.setdefault(APPLIED_MARKER, ",".join(sorted(added)) or "none")
    if environ is os.environ:
        set_malloc_options(added)
    return added


def running_ddl_hf_as_main(argv: list[str] | None = None, orig_argv: list[str] | None = None) -> bool:
    """True while `python -m ddl_hf[.module]` imports the package (sys.argv[0] is "-m" until then)."""
    argv = sys.argv if argv is None else argv
    orig_argv = getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv
    if argv[:1] != ["-m"]:
        return False
    for index, argument in enumerate(orig_argv[1:], start=1):
        if argument == "-m":
            module = orig_argv[index + 1] if index + 1 < len(orig_argv) else ""
        elif argument.startswith("-m"):
            module = argument[2:]
        else:
            continue
        return module == "ddl_hf" or module.startswith("ddl_hf.")
    return False


def main() -> int:
    """The `ddl` console script."""
    apply_cpu_defaults()
    from ddl_hf.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
