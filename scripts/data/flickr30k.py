"""Flickr30K Karpathy test split (1,000 images, 5,000 captions) into ``<root>/flickr30k/``.

Sources (``--source``):

* ``royokong`` (default): the release's re-upload ``royokong/flickr30k_test``, parquet files with columns
  ``image`` (encoded bytes) and ``text`` (5 captions), kept as downloaded (the loader's HF layout).
* ``nlphuji``: ``nlphuji/flickr30k``'s ``flickr_annotations_30k.csv`` (``raw`` = JSON list of captions,
  ``split``, ``filename``) and ``flickr30k-images.zip``; the test rows become ``dataset_flickr30k.json``
  (Karpathy layout) and only their 1,000 images are extracted to ``flickr30k-images/``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from scripts.data.archives import extract_zip
from scripts.data.captions import caption_counts, move_snapshot, write_karpathy
from scripts.data.common import Dataset, PrepContext, fetch_hub_file
from scripts.data.manifest import DatasetSpec, SourceSpec, VerifyError

ANNOTATION = "dataset_flickr30k.json"
IMAGE_DIR = "flickr30k-images"
CSV = "flickr_annotations_30k.csv"
ZIP = "flickr30k-images.zip"


def read_nlphuji_csv(path: Path, split: str = "test") -> list[tuple[str, None, list[str]]]:
    """``(filename, None, captions)`` of the rows of ``split``, in file order."""
    out: list[tuple[str, None, list[str]]] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("raw", "split", "filename") if c not in (reader.fieldnames or [])]
        if missing:
            raise VerifyError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            if row["split"] != split:
                continue
            try:
                caps = json.loads(row["raw"])
            except json.JSONDecodeError as e:
                raise VerifyError(f"{path}:{line}: column 'raw' is not a JSON list of captions ({e})") from e
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise VerifyError(f"{path}:{line}: column 'raw' must be a JSON list of strings")
            out.append((row["filename"], None, caps))
    if not out:
        raise VerifyError(f"{path}: no row has split == '{split}'")
    return out


class Flickr30k(Dataset):
    name = "flickr30k"

    def build(self, ctx: PrepContext, spec: DatasetSpec, source: SourceSpec, out: Path, dl: Path) -> None:
        if source.kind == "hub_snapshot":
            move_snapshot(ctx, self.name, source, out, dl)
            return
        entries = read_nlphuji_csv(fetch_hub_file(ctx, self.name, source, CSV, dl))
        wanted = {e[0] for e in entries}
        archive = fetch_hub_file(ctx, self.name, source, ZIP, dl)
        n = extract_zip(archive, out / IMAGE_DIR, lambda m: Path(m).name if Path(m).name in wanted else None)
        ctx.say(self.name, f"extracted {n} test images from {ZIP}")
        write_karpathy(out / ANNOTATION, self.name, entries)

    def verify(self, ctx: PrepContext, spec: DatasetSpec, out: Path) -> dict[str, int]:
        return caption_counts(out, self.name, ANNOTATION, IMAGE_DIR)
