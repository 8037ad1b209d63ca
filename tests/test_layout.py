"""The model folder travels as remote code: its files import only torch, transformers, the standard
library and each other.

transformers' remote-code loader copies the modeling file and the sibling files it imports with
single-dot relative imports (`from .delta_ops import x`), following imports anywhere in a file,
inside functions and `TYPE_CHECKING` blocks too. Anything else fails for a user without ddl_hf.
"""

import ast
import sys
from pathlib import Path

import pytest

import ddl_hf

MODEL_FOLDER = Path(ddl_hf.__file__).parent / "models" / "ddl"
ALLOWED_PACKAGES = {"torch", "transformers", "__future__"}


def import_problems(source: str, siblings: set[str]) -> list[str]:
    """Every import of `source` that remote code cannot satisfy, as 'line N: ...'."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom):
            if node.level != 1 or node.module is None or "." in node.module or node.module not in siblings:
                dots = "." * node.level
                problems.append(f"line {node.lineno}: from {dots}{node.module or ''} import ... is not a sibling file")
            continue
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top not in ALLOWED_PACKAGES and top not in sys.stdlib_module_names:
                problems.append(f"line {node.lineno}: import of {name}")
    return problems


def model_files() -> list[Path]:
    return sorted(path for path in MODEL_FOLDER.glob("*.py") if path.name != "__init__.py")


def test_the_model_folder_holds_the_remote_code_files():
    names = {path.name for path in model_files()}
    assert {
        "configuration_ddl.py",
        "modeling_ddl.py",
        "modeling_ddl_heads.py",
        "modeling_outputs_ddl.py",
        "delta_layers.py",
        "delta_ops.py",
        "input_checks.py",
        "checkpoint_checks.py",
    } <= names


@pytest.mark.parametrize("path", model_files(), ids=lambda path: path.name)
def test_model_file_imports_only_torch_transformers_stdlib_and_siblings(path):
    siblings = {other.stem for other in model_files()}
    assert import_problems(path.read_text(), siblings) == []


def test_the_checker_finds_imports_hidden_in_functions_and_type_checking_blocks():
    source = """
from typing import TYPE_CHECKING
import torch
from .delta_ops import delta_update
if TYPE_CHECKING:
    from ddl_hf.data import DataArguments
def load():
    import numpy
    from . import delta_ops
    from ..train import main
    from .sub.ops import kernel
    from .missing import thing
"""
    problems = import_problems(source, siblings={"delta_ops"})
    assert sorted(int(problem.split(":")[0].removeprefix("line ")) for problem in problems) == [6, 8, 9, 10, 11, 12]
