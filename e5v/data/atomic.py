"""Atomic file writes: a killed process never leaves a half-written file under the final name.

A write that fails (disk full, quota, I/O error) removes its temporary file, leaves whatever was at
``path`` before untouched, and raises an ``OSError`` with the same errno whose message names ``path``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from e5v.errors import E5VError


def _umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status), else by set-and-restore."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 minus the umask (mkstemp's is 0o600)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode ``mkdir()`` would give a new folder: 0o777 minus the umask (mkdtemp's is 0o700)."""
    return 0o777 & ~_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary file in the same directory, fsync, then rename onto ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _naming(e, path) from e
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())  # teammates read what `open()` would have let them read
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _naming(e, path) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _naming(err: OSError, path: Path) -> OSError:
    """The same kind of error (errno kept, so ``ENOSPC`` stays ``ENOSPC``), saying what was not written."""
    message = f"{err.strerror or err}: could not write {path} (the previous file, if any, is intact)"
    return OSError(err.errno, message) if err.errno else OSError(message)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def build_dir_once(target: str | os.PathLike, build: Callable[[Path], object], marker: str) -> Path:
    """Return ``target``, building it first if ``target/marker`` is missing.

    ``build(tmp)`` fills a temporary sibling directory, which is then renamed onto ``target``: readers
    never see a half-built directory, and when two processes race, the loser's identical copy is dropped.
    """
    target = Path(target)
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        tmp.chmod(dir_mode())
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target



def rebuild_dir(target: str | os.PathLike, build: Callable[[Path], object], stale: bool,
                prefix: str = ".building-") -> Path:
    """Build ``target`` anew: ``build(tmp)`` fills a temporary sibling directory, which then replaces a
    ``stale`` ``target`` (removed) or an empty / missing one. A failed build leaves ``target`` as it was.
    The caller decides ``stale`` (and refuses a folder it did not write)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        tmp.chmod(dir_mode())  # mkdtemp's 0700 would hide the data from teammates
        build(tmp)
        if stale:
            shutil.rmtree(target)
        elif target.exists():
            target.rmdir()
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

class NotGeneratedError(E5VError, FileExistsError):
    """A generator was pointed at a file it did not write (or that was edited since)."""


def ensure_generated_dir(target: str | os.PathLike, marker: str, want: dict, build: Callable[[Path], object],
                         what: str, fix: str, prefix: str, summary: tuple[str, ...]) -> Path:
    """A generated folder (the mini data) in ``target``: reused while its ``marker`` file (JSON) equals ``want``,
    rebuilt (:func:`rebuild_dir`) when it records other values (a warning names ``summary`` of both), built when
    absent or empty. A non-empty folder without the marker is somebody's data: never written to (DataError naming
    ``what`` and ``fix``). ``build(tmp)`` must write the marker."""
    import json
    import logging

    from e5v.errors import DataError

    target = Path(target)
    stale = False
    if (target / marker).is_file():
        try:
            have = json.loads((target / marker).read_text(encoding="utf-8"))
        except ValueError:
            have = None
        if have == want:
            return target
        logging.getLogger(__name__).warning(
            "%s holds %s generated with %s; regenerating it for %s", target, what,
            have and {k: have.get(k) for k in summary}, {k: want.get(k) for k in summary})
        stale = True
    elif target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DataError(f"{target} exists and is not generated {what} (no {marker}); it is left untouched: {fix}")
    return rebuild_dir(target, build, stale, prefix=prefix)


def generated_marker(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.generated.json")


def write_generated(path: str | os.PathLike, text: str, generator: str, hint: str = "") -> Path:
    """Write generated ``text`` at ``path``, never over a file this generator did not write.

    Beside the file, a marker ``.<name>.generated.json`` records the generator and the sha256 of what
    it wrote. An existing file is rewritten only when the marker says this generator wrote exactly its
    current content (so new parameters regenerate it); a file with the same content is left alone; any
    other file (the user's own data, or generated data edited by hand) raises :class:`NotGeneratedError`
    naming it, and is not touched.
    """
    import hashlib
    import json

    path = Path(path)
    data = text.encode("utf-8")
    marker = generated_marker(path)
    new_sha = hashlib.sha256(data).hexdigest()
    old_sha = None
    if path.exists():
        current = path.read_bytes() if path.is_file() else None
        if current == data:
            return path
        if current is not None and marker.is_file():
            try:
                m = json.loads(marker.read_text(encoding="utf-8"))
                sha = hashlib.sha256(current).hexdigest()
                if m.get("generator") == generator and sha in m.get("sha256", []):
                    old_sha = sha
            except (OSError, ValueError, AttributeError, TypeError):
                old_sha = None
        if old_sha is None:
            raise NotGeneratedError(
                f"{path} exists and was not written by the {generator} generator (or was edited since); "
                f"refusing to overwrite it.{(' ' + hint) if hint else ''}"
            )

    def mark(shas: list[str]) -> None:
        atomic_write_text(marker, json.dumps({"generator": generator, "sha256": shas}) + "\n")

    mark([s for s in (old_sha, new_sha) if s])  # a kill between the two writes still leaves the file ours
    atomic_write(path, lambda f: f.write(data))
    mark([new_sha])
    return path
