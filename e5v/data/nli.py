"""NLI triplets (SimCSE layout: sent0 = anchor, sent1 = entailment, hard_neg = contradiction) through
Hugging Face ``datasets``, with row validation, deterministic order and a world-size-free position.

The order of rows depends only on the seed and the epoch, and a global step maps to a fixed slice of
that order, so a resumed run (or a run on another number of processes) sees exactly the same batches.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from e5v.errors import ConfigError, DataError, MissingDataError

log = logging.getLogger(__name__)

COLUMNS = ("sent0", "sent1", "hard_neg")
ON_BAD_ROW = ("skip", "error")
# Longer sentences are bad rows: training tokenizes without truncation, so one runaway row (a whole
# document pasted into a cell) would pad its whole micro batch to its length. NLI sentences are < 500.
MAX_CHARS = 4096




def check_utf8(path: Path) -> None:
    """Raise :class:`DataError` naming the first line of ``path`` that is not valid UTF-8."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: line {n}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                    "re-save the file as UTF-8"
                ) from e


def _header_of(path: Path) -> list[str]:
    check_utf8(path)
    with path.open(newline="", encoding="utf-8") as f:
        return next(csv.reader(f), [])


def check_columns(path: str | Path, columns: tuple[str, ...] = COLUMNS, hard_negatives: bool = True) -> None:
    """Fail before any model is loaded if the CSV lacks a required column."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(
            f"NLI file {path} not found. Prepare it with `make data-nli` (python -m scripts.prepare_data nli "
            "--data-root <paths.data_dir>), or download nli_for_simcse.csv from the hub dataset "
            "princeton-nlp/datasets-for-simcse to that path (or set data.loader.path=null "
            "data.loader.hub_id=princeton-nlp/datasets-for-simcse data.loader.hub_file=nli_for_simcse.csv), "
            "or point data.loader.path at your own CSV with columns " + ", ".join(columns)
        )
    header = _header_of(path)
    need = columns if hard_negatives else columns[:2]
    missing = [c for c in need if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {header}. Expected columns {list(need)}")


@dataclass
class Triplets:
    """Validated rows, column-wise."""

    anchors: list[str]
    positives: list[str]
    negatives: list[str] | None
    source: str
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.anchors)


def load_triplets(
    path: str | None = None,
    hub_id: str | None = None,
    hub_file: str | None = None,
    columns: tuple[str, ...] | list[str] = COLUMNS,
    hard_negatives: bool = True,
    on_bad_row: str = "skip",
    limit: int | None = None,
    cache_dir: str | None = None,
    max_chars: int | None = MAX_CHARS,
) -> Triplets:
    """Load a local CSV (``path``) or a file of a hub dataset (``hub_id`` + ``hub_file``) with ``datasets``.

    A row is bad when a cell is missing, empty or whitespace only, or longer than ``max_chars``
    characters (None: no limit). ``on_bad_row=skip`` drops bad rows and counts them by reason in
    ``Triplets.skipped`` (logged, and recorded by training in ``train_info.json``); ``error`` stops
    at the first one, naming the file, row and column.
    """
    import datasets

    if on_bad_row not in ON_BAD_ROW:
        raise ConfigError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    columns = tuple(columns)
    if path:
        check_columns(path, columns, hard_negatives)
        ds = datasets.load_dataset("csv", data_files=str(path), split="train", cache_dir=cache_dir)
        source = str(path)
    elif hub_id:
        ds = datasets.load_dataset(hub_id, data_files=hub_file, split="train", cache_dir=cache_dir)
        source = f"{hub_id}/{hub_file or ''}"
        missing = [c for c in (columns if hard_negatives else columns[:2]) if c not in ds.column_names]
        if missing:
            raise DataError(f"{source}: missing column(s) {missing}; found {ds.column_names}")
    else:
        raise DataError("set data.path (local CSV) or data.hub_id (+ data.hub_file)")
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    cols = [ds[c] for c in (columns if hard_negatives else columns[:2])]
    kept: list[list[str]] = [[] for _ in cols]
    skipped = {"missing": 0, "empty": 0}  # + "too_long" when any
    for i, row in enumerate(zip(*cols)):
        bad = None
        for name, value in zip(columns, row):
            if value is None:
                bad = ("missing", f"column '{name}' is missing")
            elif not isinstance(value, str):
                value = str(value)
            if bad is None and not str(value).strip():
                bad = ("empty", f"column '{name}' is empty")
            if bad is None and max_chars is not None and len(str(value)) > max_chars:
                bad = ("too_long", f"column '{name}' has {len(str(value))} characters (max_chars={max_chars})")
            if bad:
                break
        if bad:
            if on_bad_row == "error":
                # +2: header line and 1-based numbering
                raise DataError(f"{source}: row {i + 2}: {bad[1]} (set data.loader.on_bad_row=skip to skip such rows)")
            skipped[bad[0]] = skipped.get(bad[0], 0) + 1
            continue
        for k, value in enumerate(row):
            kept[k].append(str(value))
    n_skipped = sum(skipped.values())
    if n_skipped:
        log.warning("%s: skipped %d bad row(s) (%s)", source, n_skipped, skipped)
    if not kept[0]:
        raise DataError(f"{source}: no usable rows")
    return Triplets(kept[0], kept[1], kept[2] if hard_negatives else None, source, skipped)


class StepSampler:
    """Maps a global step to the rows of its global batch (drop-last per epoch, reshuffled each epoch)."""

    def __init__(self, n_rows: int, global_batch: int, seed: int):
        if n_rows < global_batch:
            raise DataError(f"only {n_rows} rows but the global batch is {global_batch}; lower trainer.global_batch")
        self.n_rows, self.global_batch, self.seed = n_rows, global_batch, seed
        self.steps_per_epoch = n_rows // global_batch
        self._perm: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_rows))
        return self._perm[1]

    def rows(self, step: int, rank: int = 0, world: int = 1) -> np.ndarray:
        """Row indices for this rank's share of global batch ``step`` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        batch = self.permutation(epoch)[k * self.global_batch : (k + 1) * self.global_batch]
        local = self.global_batch // world
        return batch[rank * local : (rank + 1) * local]

    def position(self, step: int) -> dict[str, Any]:
        epoch, k = divmod(step, self.steps_per_epoch)
        return {"step": step, "epoch": epoch, "batch_in_epoch": k, "steps_per_epoch": self.steps_per_epoch}


def write_mini_nli(path: str | Path, n_rows: int = 512, seed: int = 0) -> Path:
    """Generate the mini-world NLI CSV (sent0, sent1, hard_neg) unless it already exists with that content."""
    import io

    from e5v.data.atomic import write_generated
    from e5v.data.mini_world import nli_triplets

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    w.writerows(nli_triplets(n_rows, seed=seed))
    return write_generated(
        path, buf.getvalue(), "mini_nli",
        hint=f"To train on your own CSV use data=nli data.loader.path={path}; for generated mini data point "
        "data.loader.path at a new file.",
    )


def mini_triplets(path: str | Path, n_rows: int = 512, seed: int = 0, **kwargs: Any) -> Triplets:
    """Generate (if needed) and load the mini-world NLI CSV."""
    write_mini_nli(path, n_rows=n_rows, seed=seed)
    return load_triplets(path=str(path), **kwargs)
