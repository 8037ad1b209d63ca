"""What the `ddl` subcommands (`train`, `compare`, `audit`, `bench`, `tokenizer`) share on the
command line: how a refused input ends a command, and the check of `--preset` / `--variants`.

The package refuses bad input by raising `ValueError` with a message that names the flag and what
it allows (arguments, files, data, model fields); `reports_input_errors` turns that into one line on
stderr and exit status 2 instead of a traceback. Argument-parser errors keep argparse's own
handling (usage line, `SystemExit(2)`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from .models.ddl.configuration_ddl import PRESET_SIZES, PRESET_VARIANTS

# argparse's exit status for arguments it rejects; the commands use it for every input they refuse.
INPUT_ERROR_EXIT_STATUS = 2


def reports_input_errors(command: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate the `main(argv) -> int` of `ddl COMMAND`: a `ValueError` it raises is printed as
    `ddl COMMAND: error: MESSAGE` on stderr and `main` returns `INPUT_ERROR_EXIT_STATUS`."""

    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def main_reporting_input_errors(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except ValueError as error:
                print(f"ddl {command}: error: {error}", file=sys.stderr)
                return INPUT_ERROR_EXIT_STATUS

        return main_reporting_input_errors

    return decorate


def check_preset_arguments(preset: str, variants: list[str] | tuple[str, ...] = ()) -> None:
    """The check of `--preset` and `--variants` shared by `ddl bench` and `ddl compare`: known names,
    no variant twice (its results would be reported twice under one name)."""
    unknown = [name for name in variants if name not in PRESET_VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown variant(s) {unknown}; allowed: {list(PRESET_VARIANTS)}")
    if len(set(variants)) != len(variants):
        raise ValueError(f"--variants lists a variant twice: {list(variants)}")
    if preset not in PRESET_SIZES:
        raise ValueError(f"--preset {preset!r} is unknown; allowed presets: {list(PRESET_SIZES)}")


__all__ = ["INPUT_ERROR_EXIT_STATUS", "reports_input_errors", "check_preset_arguments"]
