"""The OpenMP defaults of the `ddl` commands (ddl_hf_launch): set before torch is imported, never
over a value the user chose, and never by a plain `import ddl_hf`.

The subprocess tests run the real entry points with a `sitecustomize` that records, through an
audit hook, the environment at the moment torch is first imported: what libgomp reads.
"""

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

import ddl_hf_launch
from ddl_hf_launch import (
    MEMORY_DEFAULTS,
    MEMORY_VARIABLES,
    THREAD_VARIABLES,
    WAIT_DEFAULTS,
    WAIT_VARIABLES,
    cgroup_cpu_limit,
    cpu_defaults,
    physical_cores,
    running_ddl_hf_as_main,
)

REPO = Path(__file__).resolve().parents[1]
WATCHED = (*WAIT_VARIABLES, *THREAD_VARIABLES, *MEMORY_VARIABLES, ddl_hf_launch.APPLIED_MARKER)

RECORDER = """
import atexit, json, os, sys

WATCHED = {watched!r}
_at_torch_import = {{}}


def _hook(event, args):
    if event == "import" and args[0] == "torch" and not _at_torch_import:
        _at_torch_import.update({{name: os.environ.get(name) for name in WATCHED}})
        _at_torch_import["torch_already_loaded"] = "torch" in sys.modules


sys.addaudithook(_hook)
atexit.register(lambda: print("ENVIRONMENT AT TORCH IMPORT " + json.dumps(_at_torch_import)))
"""


# --------------------------------------------------------------------------- pure functions
def test_defaults_fill_an_empty_environment():
    assert cpu_defaults({}, cores=3) == {**WAIT_DEFAULTS, "OMP_NUM_THREADS": "3", **MEMORY_DEFAULTS}
    assert WAIT_DEFAULTS == {"GOMP_SPINCOUNT": "1000"}
    assert MEMORY_DEFAULTS == {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647"}


@pytest.mark.parametrize("name", WAIT_VARIABLES)
def test_a_waiting_variable_the_user_set_is_kept(name):
    environment = {name: "PASSIVE" if name == "OMP_WAIT_POLICY" else "7"}
    assert cpu_defaults(environment, cores=2) == {"OMP_NUM_THREADS": "2", **MEMORY_DEFAULTS}


def test_kmp_blocktime_is_not_a_choice_for_libgomp():
    # `accelerate launch --cpu` sets KMP_BLOCKTIME=1 (Intel/LLVM OpenMP), which libgomp ignores.
    assert cpu_defaults({"KMP_BLOCKTIME": "1", "OMP_NUM_THREADS": "2"}) == {**WAIT_DEFAULTS, **MEMORY_DEFAULTS}


@pytest.mark.parametrize("name", THREAD_VARIABLES)
def test_a_thread_count_the_user_set_is_kept(name):
    assert cpu_defaults({name: "5"}, cores=2) == {**WAIT_DEFAULTS, **MEMORY_DEFAULTS}


@pytest.mark.parametrize("name", MEMORY_VARIABLES)
def test_a_memory_setting_the_user_chose_is_kept(name):
    # Any glibc malloc setting, or another allocator preloaded (jemalloc, tcmalloc), leaves malloc alone.
    assert cpu_defaults({name: "1", "OMP_WAIT_POLICY": "PASSIVE"}, cores=2) == {"OMP_NUM_THREADS": "2"}


def test_empty_values_count_as_unset_and_everything_set_adds_nothing():
    assert cpu_defaults({"OMP_WAIT_POLICY": "", "OMP_NUM_THREADS": " "}, cores=1) == {
        **WAIT_DEFAULTS,
        "OMP_NUM_THREADS": "1",
        **MEMORY_DEFAULTS,
    }
    chosen = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "4", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert cpu_defaults(chosen) == {}


def test_apply_adds_the_defaults_and_a_marker_and_keeps_the_rest():
    environment = {"OMP_WAIT_POLICY": "ACTIVE", "PATH": "/bin"}
    added = ddl_hf_launch.apply_cpu_defaults(environment)
    assert added == {"OMP_NUM_THREADS": str(ddl_hf_launch.usable_cores()), **MEMORY_DEFAULTS}
    assert environment == {
        "OMP_WAIT_POLICY": "ACTIVE",
        "PATH": "/bin",
        **added,
        "DDL_HF_CPU_DEFAULTS": "MALLOC_MMAP_MAX_,MALLOC_TRIM_THRESHOLD_,OMP_NUM_THREADS",
    }


def test_the_cores_are_shared_among_the_processes_of_a_launch():
    assert cpu_defaults({"LOCAL_WORLD_SIZE": "2"}, cores=5)["OMP_NUM_THREADS"] == "2"
    assert cpu_defaults({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, cores=2)["OMP_NUM_THREADS"] == "1"
    with pytest.raises(ValueError, match=r"LOCAL_WORLD_SIZE must be an integer >= 1, got 'two'"):
        cpu_defaults({"LOCAL_WORLD_SIZE": "two"}, cores=2)
    with pytest.raises(ValueError, match=r"MPI_LOCALNRANKS must be an integer >= 1, got 0"):
        cpu_defaults({"MPI_LOCALNRANKS": "0"}, cores=2)


def test_applying_after_torch_was_imported_warns(monkeypatch):
    for name in WATCHED:  # restored after the test
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MALLOC_TOP_PAD_", "0")  # keeps this test process's malloc as it is
    with pytest.warns(UserWarning, match="torch is already imported, so this process keeps the OpenMP settings"):
        added = ddl_hf_launch.apply_cpu_defaults()
    assert added == WAIT_DEFAULTS and os.environ["GOMP_SPINCOUNT"] == WAIT_DEFAULTS["GOMP_SPINCOUNT"]


def test_zero_cores_is_refused():
    with pytest.raises(ValueError, match="cores must be an integer >= 1, got 0"):
        cpu_defaults({}, cores=0)


@pytest.mark.parametrize(
    ("line", "cpus"),
    [
        ("max 100000", None),
        ("200000 100000\n", 2),
        ("150000 100000", 2),
        ("50000 100000", 1),
        ("", None),
        ("a b", None),
    ],
)
def test_cgroup_quota(line, cpus):
    assert cgroup_cpu_limit(line) == cpus


def test_physical_cores_count_smt_siblings_once(tmp_path):
    for cpu, package, core in [(0, 0, 0), (1, 0, 0), (2, 0, 1), (3, 1, 0)]:
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text(f"{package}\n")
        (topology / "core_id").write_text(f"{core}\n")
    assert physical_cores({0, 1, 2, 3}, sysfs=tmp_path) == 3
    assert physical_cores({0, 1}, sysfs=tmp_path) == 1
    assert physical_cores({0, 7, 8}, sysfs=tmp_path) == 3  # no topology files: one core each


@pytest.mark.parametrize(
    ("orig_argv", "expected"),
    [
        (["python", "-m", "ddl_hf", "train"], True),
        (["python", "-X", "dev", "-m", "ddl_hf.cli", "bench"], True),
        (["python", "-mddl_hf"], True),
        (["python", "-m", "ddl_hf_other"], False),
        (["python", "-m", "pytest", "-m", "ddl_hf"], False),
        (["python", "-m", "mypackage"], False),
    ],
)
def test_python_dash_m_detection(orig_argv, expected):
    assert running_ddl_hf_as_main(["-m"], orig_argv) is expected
    assert running_ddl_hf_as_main(["/path/to/program.py"], orig_argv) is False  # the import came later


def test_ci_exports_the_same_wait_default():
    text = (REPO / ".ci" / "run").read_text()
    exports = dict(re.findall(r"export (GOMP_SPINCOUNT|OMP_WAIT_POLICY)=(\S+);", text))
    assert exports == WAIT_DEFAULTS


# --------------------------------------------------------------------------- real entry points
@pytest.fixture(scope="module")
def recorder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recorder")
    (folder / "sitecustomize.py").write_text(RECORDER.format(watched=WATCHED))
    return folder


def environment_at_torch_import(command: list[str], recorder: Path, **user: str) -> dict:
    environment = {name: value for name, value in os.environ.items() if name not in WATCHED}
    environment.update(user, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    environment["PYTHONPATH"] = os.pathsep.join([str(recorder), str(REPO / "src")])
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("ENVIRONMENT AT TORCH IMPORT "))
    seen = json.loads(line.removeprefix("ENVIRONMENT AT TORCH IMPORT "))
    assert seen, f"{command} never imported torch"
    assert seen.pop("torch_already_loaded") is False
    return seen


def unset(**values: str) -> dict:
    return {name: None for name in WATCHED} | values


def ddl_script() -> str:
    script = Path(sys.executable).with_name("ddl")
    assert script.exists(), f"the `ddl` console script is not installed next to {sys.executable}: pip install -e ."
    return str(script)


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "ddl_hf", "--help"],
        [sys.executable, str(REPO / "scripts" / "train.py"), "--help"],
        "console script",
    ],
    ids=["python -m ddl_hf", "scripts/train.py", "ddl"],
)
def test_entry_points_set_the_defaults_before_torch(command, recorder):
    command = [ddl_script(), "--help"] if command == "console script" else command
    threads = str(ddl_hf_launch.usable_cores())
    added = "GOMP_SPINCOUNT,MALLOC_MMAP_MAX_,MALLOC_TRIM_THRESHOLD_,OMP_NUM_THREADS"
    expected = unset(**WAIT_DEFAULTS, OMP_NUM_THREADS=threads, **MEMORY_DEFAULTS, DDL_HF_CPU_DEFAULTS=added)
    assert environment_at_torch_import(command, recorder) == expected


def test_the_console_script_keeps_what_the_user_set(recorder):
    user = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "3", "MALLOC_MMAP_THRESHOLD_": "1048576"}
    expected = unset(**user, DDL_HF_CPU_DEFAULTS="none")
    assert environment_at_torch_import([ddl_script(), "--help"], recorder, **user) == expected


def test_importing_ddl_hf_changes_nothing(recorder):
    command = [sys.executable, "-c", "import ddl_hf"]
    assert environment_at_torch_import(command, recorder) == unset()
    user = {"OMP_NUM_THREADS": "1"}
    assert environment_at_torch_import(command, recorder, **user) == unset(**user)


MALLOC_CHECK = """
import ctypes, sys
import ddl_hf_launch
if sys.argv[1] == "apply":
    ddl_hf_launch.apply_cpu_defaults()
import torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
before = mallinfo2()
block = torch.ones(64 << 20, dtype=torch.uint8)
during = mallinfo2()
del block
after = mallinfo2()
print(during.hblkhd - before.hblkhd, after.arena - before.arena)
"""


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or tuple(map(int, platform.libc_ver()[1].split("."))) < (2, 33),
    reason="needs glibc >= 2.33 (mallinfo2)",
)
def test_the_memory_defaults_keep_a_freed_block_for_the_next_step():
    """glibc, as it is, serves a 64 MiB tensor with pages of its own (mmap) and returns them at free, so the next
    step faults them in again; with the defaults (set in the running process through mallopt) the block comes
    from the heap and stays there."""
    environment = {name: value for name, value in os.environ.items() if name not in WATCHED}
    environment["PYTHONPATH"] = str(REPO / "src")
    results = {}
    for mode in ("apply", "plain"):
        command = [sys.executable, "-c", MALLOC_CHECK, mode]
        done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120, check=True)
        results[mode] = [int(field) for field in done.stdout.split()]
    mapped, kept = results["apply"]
    assert mapped == 0 and kept >= 64 << 20
    mapped, kept = results["plain"]
    assert mapped >= 64 << 20 and kept < 64 << 20
