"""One-line errors for the command-line tools (e5v-encode, e5v-merge, e5v-train, e5v-eval).

A mistake the user can fix (a missing file, a bad image, a config value out of range, an unknown model
name) is printed as ``PROG: error: <message>`` (plus, when the message carries one, a ``hint:`` line)
on stderr, exit status 1, and no traceback. Anything else is a bug: its traceback is kept.
``E5V_FULL_ERROR=1`` (or ``HYDRA_FULL_ERROR=1``) shows the full traceback for every error.

Expected errors are:
* the project's own errors: every :class:`e5v.errors.E5VError` (:class:`UserError` is one), and the
  third-party ones in :data:`EXPECTED_NAMES` (matched by name so that this module imports nothing heavy);
* OS-level file errors that name a file (``FileNotFoundError``, ``PermissionError``, disk full, ...);
* ``ValueError`` / ``RuntimeError`` / ``LookupError`` raised by this project's own code (the raising
  frame is under ``e5v/`` or ``eval/``): those are the validation messages written for the user. The
  same types raised inside torch or transformers keep their traceback.
* ``SystemExit("message")`` raised by a CLI: the message gets the ``PROG: error:`` prefix.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from e5v.errors import E5VError

F = TypeVar("F", bound=Callable[..., Any])

_PACKAGES = tuple(str(Path(__file__).resolve().parents[2] / name) + os.sep for name in ("e5v", "eval"))

EXPECTED_NAMES = frozenset({"MissingMandatoryValue"})  # omegaconf: a ``???`` value left unset
_FILE_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


class UserError(E5VError):
    """A mistake the user can fix; its message (one line, optionally ``\\nhint: ...``) is the whole report."""


def full_error() -> bool:
    return any(os.environ.get(k, "") not in ("", "0") for k in ("E5V_FULL_ERROR", "HYDRA_FULL_ERROR"))


def _raised_here(err: BaseException) -> bool:
    """True when the innermost frame of ``err``'s traceback is in this project's code."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGES)


def is_expected(err: BaseException) -> bool:
    """Whether ``err`` is a user-fixable mistake (one-line report) rather than a bug (traceback)."""
    if isinstance(err, E5VError):
        return True
    if any(c.__name__ in EXPECTED_NAMES for c in type(err).__mro__):
        return True
    if isinstance(err, _FILE_ERRORS) and (err.filename is not None or _raised_here(err)):
        return True
    if isinstance(err, OSError) and err.errno is not None and err.filename is not None:
        return True  # disk full, quota, read-only file system ... on a named file
    return isinstance(err, (ValueError, RuntimeError, LookupError, OSError)) and _raised_here(err)


def message(err: BaseException) -> str:
    """The user-facing text of ``err`` (without the program prefix)."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None and not _raised_here(err):
        text = f"{err.filename}: {err.strerror}"
    elif isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]  # str(KeyError) would quote it
    else:
        text = str(err).strip()
    return text or type(err).__name__


def format_error(prog: str, text: str) -> str:
    """``PROG: error: first line`` and any further lines (hints) indented below it."""
    first, *rest = [line for line in str(text).strip().splitlines() if line.strip()] or ["error"]
    return "\n".join([f"{prog}: error: {first}", *(f"  {line.strip()}" for line in rest)])


@contextmanager
def cli_errors(prog: str) -> Iterator[None]:
    """Turn expected errors raised inside the block into ``SystemExit("PROG: error: ...")`` (exit status 1,
    no traceback). In-process callers (tests) catch the ``SystemExit`` and read the message from it."""
    try:
        yield
    except SystemExit as e:
        if isinstance(e.code, str) and not e.code.startswith(f"{prog}: "):
            raise SystemExit(format_error(prog, e.code)) from None
        raise
    except Exception as e:
        if full_error() or not is_expected(e):
            raise
        raise SystemExit(format_error(prog, message(e))) from None


def cli_main(prog: str) -> Callable[[F], F]:
    """Decorator form of :func:`cli_errors` for a ``main(argv)`` function."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            with cli_errors(prog):
                return fn(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap


def print_help_preface(doc: str | None, argv: list[str] | None = None) -> None:
    """For Hydra apps: print the module docstring (description + examples) before Hydra's ``--help``."""
    args = sys.argv[1:] if argv is None else argv
    if doc and any(a in ("--help", "-h") for a in args):
        print(doc.strip() + "\n\nOverrides are key=value; the composed config follows.\n")
        sys.stdout.flush()
