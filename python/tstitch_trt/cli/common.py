"""What every command shares: the parser classes, the one-line error contract, torch detection.

User errors print one line (`error: ...`) and exit 2; nothing half-written is left behind. Any other
exception is a bug: one line saying so and where the full traceback was written, exit 1. SIGTERM
unwinds like Ctrl-C, so staging directories and temporary outputs are removed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from tstitch_trt import __version__
from tstitch_trt.errors import UserError

INSTALL_BUILD = "pip install \"tstitch-trt[build]\""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so cleanup (staging directories, temp files) runs."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # one line, exit 2 (argparse's default prints the whole usage first)
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help shows its default (flags without one say nothing about it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in text or "default" in text:
            return text
        return text + " (default: %(default)s)"


def run_guarded(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run one command under the error contract above; returns the exit code."""
    previous = _install_sigterm()
    try:
        return command(args)
    except UserError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was left half-written", file=sys.stderr)
        return 130
    except Terminated:
        print("error: terminated (SIGTERM); nothing was left half-written", file=sys.stderr)
        return 143
    except Exception as e:  # a bug: one line here, the traceback in a file
        log = _write_crash_log(e)
        print(f"error: internal error ({type(e).__name__}: {one_line(str(e))[:200]}); this is a bug in "
              f"tstitch-trt {__version__}: the full traceback is in {log}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def one_line(text: str) -> str:
    return " ".join(text.split())


def _install_sigterm():  # -> previous handler or None
    def on_term(signum: int, frame: object) -> None:
        raise Terminated()

    try:
        return signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread (main() called from a worker): leave signals alone
        return None


def _write_crash_log(error: BaseException) -> Path:
    fd, name = tempfile.mkstemp(prefix=f"tstitch-trt-crash-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(f"tstitch-trt {__version__}, python {sys.version.split()[0]}\nargv: {sys.argv}\n\n")
        f.write("".join(traceback.format_exception(error)))
    return Path(name)


def has_torch() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def require_torch(what: str) -> None:
    if not has_torch():
        raise UserError(f"{what} needs PyTorch and the export tools, which are not installed: {INSTALL_BUILD}")
