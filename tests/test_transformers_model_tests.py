"""transformers' own ModelTesterMixin, from the source distribution of the installed transformers, against ddl-cc.

The mixin (`tests/test_modeling_common.py`, ~130 tests of loading, saving, heads, hidden states, attention
backends, resizing, initialisation, ...) is transformers' code, so it is never copied into this repository:
`.ci/run` downloads the source distribution of the installed version (`pip download --no-binary :all:`) and names
it in `DDL_TRANSFORMERS_SDIST` (the .tar.gz or its unpacked folder); without it this test skips and says how to
get it. The test assembles a scratch `tests/` package from it and `transformers_suite/model_tests.py`, runs pytest
there in a fresh process, and reads the JUnit report: no failure or error, and every test that skips on ddl-cc
skips on transformers' own Llama too, run beside it on the same backbone.

The source distribution lacks two files the mixin imports (`tests/exporters/test_export.py`,
`tests/generation/test_utils.py`, which transformers keeps in its repository only); stand-ins define the two
mixin names as empty classes, so the export and generation tests are not part of this run. Generation is
covered by our own tests (`test_generation_cache.py`, `test_compile.py`) and by the full shared suite
(docs/development.md).
"""

import os
import re
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import transformers

from conftest import offline_env

SDIST_VARIABLE = "DDL_TRANSFORMERS_SDIST"
SUITE_MODULE = Path(__file__).parent / "transformers_suite" / "model_tests.py"

# The files the mixin imports that the source distribution lacks, and the class each must define.
STAND_INS = {"exporters/test_export.py": "ExportTesterMixin", "generation/test_utils.py": "GenerationTesterMixin"}
# Meaningless without the real GenerationTesterMixin: it checks that a generative model's test class inherits it.
DESELECTED = ["test_generation_tester_mixin_inheritance"]


def unpacked_sdist(location: Path, scratch: Path) -> Path:
    """The unpacked source distribution at `location` (its folder, or its .tar.gz unpacked under `scratch`)."""
    if location.is_dir():
        return location
    with tarfile.open(location) as archive:
        archive.extractall(scratch, filter="data")
    (root,) = [path for path in scratch.iterdir() if path.is_dir() and path.name.startswith("transformers-")]
    return root


def assemble_suite(sdist: Path, scratch: Path) -> Path:
    """A scratch folder whose `tests/` package holds the mixin's files, the stand-ins and our model tests."""
    tests = scratch / "suite" / "tests"
    tests.mkdir(parents=True)
    for common in (sdist / "tests").glob("*.py"):
        shutil.copy(common, tests)
    (tests / "__init__.py").touch()
    for relative, class_name in STAND_INS.items():
        stand_in = tests / relative
        stand_in.parent.mkdir()
        (stand_in.parent / "__init__.py").touch()
        stand_in.write_text(
            f'"""Stand-in: transformers\' source distribution does not ship tests/{stand_in.parent.name}."""\n\n\n'
            f"class {class_name}:\n    pass\n"
        )
    shutil.copy(SUITE_MODULE, tests / "test_modeling_ddl.py")
    return tests.parent


def outcomes(junit: Path) -> dict[str, dict[str, str]]:
    """{class name: {test name: "passed" | "skipped: reason" | "failed: message"}} from a JUnit report."""
    by_class: dict[str, dict[str, str]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for tag, label in (("failure", "failed"), ("error", "failed"), ("skipped", "skipped")):
            found = case.find(tag)
            if found is not None:
                outcome = f"{label}: {found.get('message', '')}"
        by_class.setdefault(case.get("classname").rsplit(".", 1)[-1], {})[case.get("name")] = outcome
    return by_class


@pytest.mark.slow
def test_transformers_model_tester_mixin_passes_on_ddl_cc_with_no_skip_that_llama_does_not_have(tmp_path):
    location = os.environ.get(SDIST_VARIABLE)
    if not location:
        pytest.skip(
            f"{SDIST_VARIABLE} is not set: `pip download --no-deps --no-binary :all: "
            f"transformers=={transformers.__version__}` and set it to the .tar.gz (.ci/run does)"
        )
    sdist = unpacked_sdist(Path(location), tmp_path)
    assert sdist.name == f"transformers-{transformers.__version__}", (
        f"{SDIST_VARIABLE}={location} is {sdist.name}, not the installed transformers {transformers.__version__}"
    )
    suite = assemble_suite(sdist, tmp_path)
    junit = tmp_path / "junit.xml"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_modeling_ddl.py", "-q", "-p", "no:cacheprovider"]
        + [
            "--rootdir",
            str(suite),
            "-o",
            "addopts=",
            f"--junitxml={junit}",
            "-k",
            " and ".join(f"not {name}" for name in DESELECTED),
        ],
        cwd=suite,
        # transformers' default verbosity: the mixin reads the warnings of `from_pretrained` (conftest sets "error")
        env=offline_env(PYTHONPATH=str(suite), TRANSFORMERS_VERBOSITY=None),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert junit.is_file(), done.stdout[-4000:] + done.stderr[-4000:]
    by_class = outcomes(junit)
    ddl, llama = by_class["DDLCCModelTest"], by_class["LlamaModelTest"]
    assert set(ddl) == set(llama), set(ddl) ^ set(llama)
    failed = {
        (test_class, name): outcome
        for test_class, tests in by_class.items()
        for name, outcome in tests.items()
        if outcome.startswith("failed")
    }
    assert not failed, failed
    assert done.returncode == 0, done.stdout[-4000:]
    ddl_only_skips = {
        name: outcome for name, outcome in ddl.items() if outcome.startswith("skipped") and llama[name] == "passed"
    }
    assert not ddl_only_skips, ddl_only_skips
    passed = sum(outcome == "passed" for outcome in ddl.values())
    assert passed >= 80, (passed, re.findall(r"\d+ (?:passed|skipped)", done.stdout))
