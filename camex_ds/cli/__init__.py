"""What every command-line entry point does with failures: a user error is one `error:` line and exit 2,
Ctrl-C is one line and exit 130; neither prints a traceback."""
from __future__ import annotations

import argparse
import sys
from typing import Callable


def run_cli(body: Callable[[], int], user_errors: tuple[type[BaseException], ...], prefix: str = "",
            interrupted: str = "interrupted") -> int:
    """`body()`'s exit code; `prefix` (e.g. the program's name) starts both messages."""
    try:
        return body()
    except user_errors as e:
        print(f"{prefix}error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prefix}{interrupted}", file=sys.stderr)
        return 130


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """`--model`, `--dtype`, `--device`: how the tools that read a consolidated model load it."""
    ap.add_argument("--model", required=True, metavar="OUT", help="consolidated model folder")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), help="compute dtype (default: the stored one)")
    ap.add_argument("--device", default="cpu", help="torch device (%(default)s)")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad flag is one `PROG: error: ...` line and exit 2, like every other user error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
