"""Shared by Flickr30K and COCO: hub parquet snapshots moved into place, the Karpathy layout written from
other sources, and counting through (or beside) :mod:`eval.loaders.captions`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from e5v.data.atomic import atomic_write_text
from e5v.data.paths import safe_join
from eval.loaders import DataFormatError, MissingDataError
from eval.loaders.captions import TEXT_COLUMNS, load_captions
from scripts.data.common import PrepContext, fetch_snapshot
from scripts.data.manifest import SourceSpec, VerifyError


def move_snapshot(ctx: PrepContext, dataset: str, source: SourceSpec, out: Path, dl: Path) -> list[Path]:
    """Download the source's hub snapshot and move its matching files to ``out`` (same relative paths)."""
    moved = []
    for p in fetch_snapshot(ctx, dataset, source, dl):
        target = safe_join(out, p.relative_to(dl).as_posix(), where=f"hub snapshot of {source.repo_id}")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, target)
        moved.append(target)
    return moved


def write_karpathy(path: Path, dataset: str, entries: list[tuple[str, str | None, list[str]]]) -> None:
    """A Karpathy split file with only the test split: ``(filename, filepath or None, captions)`` per image."""
    images: list[dict[str, Any]] = []
    for filename, filepath, caps in entries:
        e: dict[str, Any] = {"filename": filename, "split": "test", "sentences": [{"raw": c} for c in caps]}
        if filepath:
            e["filepath"] = filepath
        images.append(e)
    atomic_write_text(path, json.dumps({"dataset": dataset, "images": images}) + "\n")


def _parquet_counts(out: Path, dataset: str, split: str, image_column: str) -> dict[str, int]:
    import pyarrow.parquet as pq

    files = sorted(out.rglob("*.parquet"))
    if not files:
        raise VerifyError(f"{dataset}: no parquet file under {out}")
    images = captions = first5 = 0
    for f in files:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        tcol = next((c for c in TEXT_COLUMNS if c in names), None)
        if image_column not in names or tcol is None:
            raise VerifyError(
                f"{f}: needs an image column '{image_column}' and a caption column (one of {TEXT_COLUMNS}); "
                f"found {names}"
            )
        cols = [image_column, tcol] + (["split"] if "split" in names else [])
        row = 0
        for batch in pf.iter_batches(batch_size=128, columns=cols):
            d = batch.to_pydict()
            for i in range(batch.num_rows):
                row += 1
                if "split" in d and d["split"][i] != split:
                    continue
                im, caps = d[image_column][i], d[tcol][i]
                if not (isinstance(im, dict) and (im.get("bytes") or im.get("path"))) and not isinstance(im, bytes):
                    raise VerifyError(f"{f}: row {row - 1} has no image in column '{image_column}'")
                caps = [caps] if isinstance(caps, str) else list(caps or [])
                if not caps or not all(isinstance(c, str) and c.strip() for c in caps):
                    raise VerifyError(f"{f}: row {row - 1} has an empty or missing caption in column '{tcol}'")
                images += 1
                captions += len(caps)
                first5 += min(5, len(caps))
    return {"images": images, "captions": captions, "captions_first5": first5}


def caption_counts(out: Path, dataset: str, annotation: str, image_dir: str, split: str = "test") -> dict[str, int]:
    """Counts of the test split: the Karpathy file through the real loader (every image file must exist),
    or the parquet files read column-wise (the loader would hold every image in memory)."""
    try:
        if (out / annotation).is_file():
            every = load_captions(out, dataset, annotation=annotation, image_dir=image_dir, split=split)
            first5 = load_captions(out, dataset, annotation=annotation, image_dir=image_dir, split=split, max_captions=5)
            return {"images": len(every.images), "captions": len(every.captions), "captions_first5": len(first5.captions)}
        return _parquet_counts(out, dataset, split, "image")
    except (MissingDataError, DataFormatError) as e:
        raise VerifyError(str(e)) from e
