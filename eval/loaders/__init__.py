"""Readers for the official on-disk formats of the evaluation datasets.

Every reader takes a data root and fails with :class:`MissingDatasetError` (an
:class:`e5v.errors.MissingDataError`: the expected path and the command that prepares it) or
:class:`DataFormatError` (:class:`e5v.errors.DataError`, as in training: the file, row and key at fault).
Image paths read from annotation files are joined with :func:`e5v.data.paths.safe_join`, so they
cannot escape the data root.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from e5v.data.paths import UnsafePathError, safe_join
from e5v.errors import DataError, MissingDataError

DOCS = "docs/evaluation.md"


class MissingDatasetError(MissingDataError):
    """A benchmark's dataset file or folder is not where the config says; the message names the ``make``
    target that prepares it: ``make_target``, by default ``data-<dataset>``; ``""`` when none does (the
    message then only says to point ``root`` at a copy)."""

    def __init__(self, dataset: str, path: Path | str, what: str, make_target: str | None = None) -> None:
        target = f"data-{dataset.replace('_', '-')}" if make_target is None else make_target
        self.dataset, self.path, self.what, self.make_target = dataset, Path(path), what, target
        hint = (
            f"Prepare it with `make {target}` (see {DOCS}, section '{dataset}'), or point the benchmark's "
            "`root` at your copy." if target else "Point the benchmark's `root` at your copy of the data."
        )
        super().__init__(f"{dataset}: {what} not found at {path}. {hint}")

    def retarget(self, make_target: str | None) -> MissingDatasetError:
        """The same error with the hint of the benchmark that reads the data (``None``: no ``make`` target),
        whatever the loader that raised it assumed."""
        target = make_target or ""
        if target == self.make_target:
            return self
        return MissingDatasetError(self.dataset, self.path, self.what, target)


DataFormatError = DataError  # an annotation file exists but is malformed: the same class as in training


class MissingBenchmarkData(MissingDatasetError):
    """Several selected benchmarks' data checked before the model loads: one message, a line per problem."""

    def __init__(self, problems: dict[str, Exception], present: list[str]) -> None:
        self.problems, self.present = problems, present
        first = next(iter(problems.values()))
        self.dataset, self.path = getattr(first, "dataset", ""), getattr(first, "path", Path())
        self.what, self.make_target = getattr(first, "what", ""), getattr(first, "make_target", "")
        lines = [f"data for {len(problems)} of {len(problems) + len(present)} selected benchmark(s) is missing "
                 "or unusable; nothing was run:"]
        for name, err in problems.items():  # the loaders' messages mostly start with the data set's name
            lines.append(f"  - {err}" if str(err).startswith(f"{name}: ") else f"  - {name}: {err}")
        if present:
            lines.append(f"  (to run only the others now: benchmarks=[{','.join(present)}])")
        FileNotFoundError.__init__(self, "\n".join(lines))


def require(path: Path, dataset: str, what: str, make_target: str | None = None) -> Path:
    if not path.exists():
        raise MissingDatasetError(dataset, path, what, make_target)
    return path


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:  # json.loads would silently keep the last one
            raise _DuplicateKey(k)
        out[k] = v
    return out


def read_json(path: Path, dataset: str, what: str, make_target: str | None = None) -> Any:
    """Parse a JSON annotation file; invalid JSON, non-UTF-8 bytes or a key repeated inside one object
    raise :class:`DataFormatError` naming the file (and the key)."""
    require(path, dataset, what, make_target)
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as e:
        raise DataFormatError(f"{path}: key {e.args[0]!r} appears twice in one object (duplicate id)") from None
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}: not valid JSON ({e}); re-download the file") from e
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not UTF-8 ({e})") from e


def field(record: Any, key: str, path: Path, row: int | str, kind: type | tuple[type, ...] | None = None) -> Any:
    """``record[key]`` with an error naming the file, row and key when it is absent or mistyped."""
    if not isinstance(record, dict):
        raise DataFormatError(f"{path}: row {row} is a {type(record).__name__}, expected an object")
    if key not in record:
        raise DataFormatError(f"{path}: row {row} has no key '{key}' (keys: {sorted(record)[:8]})")
    value = record[key]
    if kind is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataFormatError(f"{path}: row {row} key '{key}' is a {type(value).__name__}, expected {names}")
    return value


def image_path(root: Path, relative: str, source: Path, row: int | str, dataset: str, check: bool = True) -> Path:
    """``root/relative`` inside the data root; a missing file is reported with its annotation row."""
    try:
        p = safe_join(root, relative, where=f"{source}, row {row}")
    except UnsafePathError as e:
        raise DataFormatError(str(e)) from e
    if check and not p.is_file():
        raise MissingDatasetError(dataset, p, f"image '{relative}' (named in {source}, row {row})")
    return p


__all__ = [
    "DataError", "DataFormatError", "MissingBenchmarkData", "MissingDataError", "MissingDatasetError", "field",
    "image_path", "read_json", "require",
]
