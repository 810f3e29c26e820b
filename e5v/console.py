"""What the console shows, and the run's log file that keeps everything (e5v-train, e5v-eval, the demo).

An entry point calls :func:`setup` once it knows its run folder. Quiet (the default):

* the console gets the program's own messages (``e5v.*``, ``eval.*``, ``scripts.*`` at ``level``), every
  warning and error from anyone that is not known noise (:data:`KNOWN_NOISE`), progress bars drawn with
  :func:`progress` and lines written with :func:`echo`;
* the log file gets every log record (known noise included), Python warnings, and everything written to
  stdout/stderr inside :func:`captured` blocks: the third-party chatter of W&B's start and finish,
  DeepSpeed's start (its op build with gcc/ninja runs in a subprocess: captured at the file-descriptor
  level) and model loading.

``verbose=True`` (``-v`` on the demo, ``verbose=true`` on e5v-train / e5v-eval) shows everything on the
console, as before; the log file still gets every log record (what third parties print goes to the
console only). Without :func:`setup` (the library used
from Python, the tests) nothing here changes any output: :func:`captured` passes through, :func:`echo`
prints, :func:`progress` is a plain tqdm bar.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

# Our own loggers: their INFO lines are the program's progress; other libraries' INFO is detail (log file).
OWN = ("e5v", "eval", "scripts", "__main__")
# Third-party lines that say nothing to act on, kept out of the console (they stay in the log file):
# (logger name or prefix, message pattern, why it is noise).
KNOWN_NOISE: tuple[tuple[str, str, str], ...] = (
    ("DeepSpeed", r"Setting accelerator to CPU",
     "DeepSpeed's notice on every CPU start; the demo and the tiny experiments run on the CPU on purpose"),
    ("py.warnings", r"`is_gradient_checkpointing` is deprecated",
     "peft probes transformers' deprecated property (getattr) when it wraps or loads an adapter"),
)
# Emitted by transformers when a tokenizer call is longer than the model's maximum. The Embedder tokenizes
# whole prompts first and then shortens the text itself (template kept) with its own warning naming the
# inputs, so inside :func:`expected_long_inputs` this one is noise. Training does not truncate: there the
# warning stays on the console.
LONG_INPUT = ("transformers", r"will result in indexing errors")

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_expect_long = contextvars.ContextVar("e5v_expect_long_inputs", default=False)


@dataclass
class Session:
    log_file: Path
    verbose: bool
    level: int
    out: IO[str]  # the terminal's stdout and stderr (duplicated: unaffected by captured())
    err: IO[str]
    handlers: list[logging.Handler] = field(default_factory=list)
    saved: dict[str, Any] = field(default_factory=dict)
    depth: int = 0


_session: Session | None = None


def _own(name: str) -> bool:
    return any(name == o or name.startswith(o + ".") for o in OWN)


def is_noise(record: logging.LogRecord) -> bool:
    """Whether ``record`` is known third-party noise (:data:`KNOWN_NOISE`, or a long-input warning the
    Embedder handles itself)."""
    if getattr(record, "e5v_noise", False):
        return True
    msg = record.getMessage()
    return any((record.name == n or record.name.startswith(n + ".")) and re.search(p, msg) for n, p, _ in KNOWN_NOISE)


class _ConsoleFilter(logging.Filter):
    def __init__(self, verbose: bool, level: int) -> None:
        super().__init__()
        self.verbose, self.level = verbose, level

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose:
            return record.levelno >= logging.INFO
        if is_noise(record):
            return record.levelno >= logging.ERROR  # an error is never noise
        return record.levelno >= (self.level if _own(record.name) else logging.WARNING)


class _ConsoleFormatter(logging.Formatter):
    """Our INFO lines as they are; warnings and errors with their level and source."""

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname} {record.name}: {msg}"
        return msg


class _ToRoot(logging.Filter):
    """On a third-party logger (or handler) that prints on its own: hand the record to the root logger's
    handlers (the console's rules and the log file) instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _session is None:
            return True
        for h in logging.getLogger().handlers:
            if record.levelno >= h.level:
                h.handle(record)
        return False


class _LongInput(logging.Filter):
    """transformers' long-input warning inside :func:`expected_long_inputs`: marked as noise (log file only
    in a session, dropped otherwise: the Embedder reports its own truncation)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _expect_long.get() and re.search(LONG_INPUT[1], record.getMessage()):
            record.e5v_noise = True
            return _session is not None
        return True


_TO_ROOT = _ToRoot()
_LONG = _LongInput()


@contextlib.contextmanager
def expected_long_inputs() -> Iterator[None]:
    """The caller tokenizes inputs that may exceed the model's maximum and truncates them itself."""
    lg = logging.getLogger("transformers.tokenization_utils_base")
    if _LONG not in lg.filters:
        lg.addFilter(_LONG)
    token = _expect_long.set(True)
    try:
        yield
    finally:
        _expect_long.reset(token)


def setup(log_file: str | Path, verbose: bool = False, level: int = logging.INFO) -> Session:
    """Route this process's output: the console as described above, everything into ``log_file`` (appended).
    ``level``: the lowest level of our own messages on the console (the demo uses WARNING: it prints its own
    stage lines). Calling it again (a Hydra multirun's next job) closes the previous session first."""
    global _session
    close()
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    err = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    s = Session(path, bool(verbose), int(level), out, err)
    root = logging.getLogger()
    s.saved = {"root_handlers": list(root.handlers), "root_level": root.level,
               "capture_warnings": bool(getattr(logging, "_warnings_showwarning", None))}
    for h in list(root.handlers):  # Hydra's or basicConfig's console handler: replaced by ours
        root.removeHandler(h)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    console = logging.StreamHandler(err)
    console.setLevel(logging.INFO)
    console.addFilter(_ConsoleFilter(s.verbose, s.level))
    console.setFormatter(_ConsoleFormatter())
    s.handlers = [file_handler, console]
    for h in s.handlers:
        root.addHandler(h)
    root.setLevel(logging.INFO)
    for name in OWN:  # a logger lowered by an earlier run (eval's non-main ranks) must not stay lowered
        logging.getLogger(name).setLevel(logging.NOTSET)
    logging.captureWarnings(True)  # Python warnings as records (py.warnings): the same rules, and the file
    _session = s
    _route_third_party(s)
    return s


def _route_third_party(s: Session) -> None:
    """Loggers that print through their own handler go through ours; third-party progress bars are off
    unless verbose (a bar in a log file is noise)."""
    ds = logging.getLogger("DeepSpeed")  # created with its own stdout handler when deepspeed is imported
    if _TO_ROOT not in ds.filters:
        ds.addFilter(_TO_ROOT)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        hf_logging = None
    if hf_logging is not None:
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        s.saved["transformers"] = True
    lg = logging.getLogger("transformers.tokenization_utils_base")
    if _LONG not in lg.filters:
        lg.addFilter(_LONG)
    if not s.verbose:
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"  # read when datasets is imported
        if hf_logging is not None:
            hf_logging.disable_progress_bar()
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()


def setup_run(run_dir: str | Path, name: str, verbose: bool = False, rank: int = 0) -> Session:
    """:func:`setup` for a Hydra app's run folder: ``<run_dir>/<name>.log`` on rank 0 (our INFO lines on the
    console), ``<name>.rank<N>.log`` on the others (only warnings and errors on the console)."""
    path = Path(run_dir) / (f"{name}.log" if rank == 0 else f"{name}.rank{rank}.log")
    s = setup(path, verbose=verbose, level=logging.INFO if rank == 0 else logging.WARNING)
    if rank == 0 and not verbose:
        logging.getLogger("e5v.console").info("log: %s (verbose=true shows third-party output here too)", path)
    return s


def close() -> None:
    """End the session: the previous handlers and warning routing come back; no-op without a session."""
    global _session
    s, _session = _session, None
    if s is None:
        return
    root = logging.getLogger()
    for h in s.handlers:
        root.removeHandler(h)
        h.close()
    for h in s.saved.get("root_handlers", []):
        root.addHandler(h)
    root.setLevel(s.saved.get("root_level", logging.WARNING))
    logging.captureWarnings(bool(s.saved.get("capture_warnings")))
    if s.saved.get("transformers"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_propagation()
        hf_logging.enable_default_handler()
        hf_logging.enable_progress_bar()
    for f in (s.out, s.err):
        with contextlib.suppress(OSError):
            f.close()


def active() -> Session | None:
    return _session


def log_file() -> Path | None:
    """The session's log file; None without a session."""
    return _session.log_file if _session is not None else None


def stream() -> IO[str]:
    """Where progress bars go: the terminal's stderr (also inside :func:`captured`)."""
    return _session.err if _session is not None else sys.stderr


def echo(*parts: Any, sep: str = " ", end: str = "\n") -> None:
    """``print`` to the terminal's stdout (also inside :func:`captured`); a copy goes to the log file."""
    text = sep.join(str(p) for p in parts)
    s = _session
    if s is None:
        print(text, end=end, flush=True)
        return
    s.out.write(text + end)
    s.out.flush()
    with open(s.log_file, "a", encoding="utf-8") as f:
        f.write(text + end)


def progress(iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm bar on the terminal's stderr (``kwargs`` as tqdm's)."""
    from tqdm.auto import tqdm

    kwargs.setdefault("file", stream())
    return tqdm(iterable, **kwargs)


@contextlib.contextmanager
def captured(what: str) -> Iterator[None]:
    """Inside a quiet session, whatever is written to stdout/stderr (Python, C code, subprocesses) goes to the
    log file, under a ``---- what ----`` line; our own log records and :func:`echo` / :func:`progress` still
    reach the terminal. Passes through when verbose or without a session."""
    s = _session
    if s is None or s.verbose or s.depth:
        yield
        return
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            f.flush()
    for h in s.handlers:
        h.flush()
    fd = os.open(s.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, f"---- output of {what} ----\n".encode())
    saved = (os.dup(1), os.dup(2))
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    s.depth += 1
    try:
        yield
    finally:
        s.depth -= 1
        for f in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                f.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for d in (*saved, fd):
            os.close(d)


__all__ = ["KNOWN_NOISE", "Session", "active", "captured", "close", "echo", "expected_long_inputs", "is_noise",
           "log_file", "progress", "setup", "setup_run", "stream"]
