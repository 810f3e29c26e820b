"""MS-COCO Karpathy 5K test split (5,000 images; 25,010 captions, the release keeps the first 5 = 25,000)
into ``<root>/coco/``.

Sources (``--source``):

* ``royokong`` (default): the release's re-upload ``royokong/coco_test`` (parquet: ``image``, ``text``),
  kept as downloaded (the loader's HF layout; ``benchmark.coco.max_captions: 5`` cuts to 25,000).
* ``karpathy``: CLIP_benchmark's annotation file ``coco_test_karpathy.json`` (COCO format: ``images`` with
  ``id``/``file_name``, ``annotations`` with ``image_id``/``caption``) and the official ``val2014.zip``; the
  annotation becomes ``dataset_coco.json`` (Karpathy layout, captions in file order) and only the 5,000
  test images are extracted to ``val2014/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scripts.data.archives import extract_zip
from scripts.data.captions import caption_counts, move_snapshot, write_karpathy
from scripts.data.common import Dataset, PrepContext, fetch_url, read_json
from scripts.data.manifest import DatasetSpec, SourceSpec, VerifyError

ANNOTATION = "dataset_coco.json"
SOURCE_JSON = "coco_test_karpathy.json"
ZIP = "val2014.zip"
IMAGE_DIR = "val2014"


def coco_format_entries(data: Any, path: Path) -> list[tuple[str, str, list[str]]]:
    """``(filename, "val2014", captions)`` per image of a COCO-format caption file, in its image order."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
        data.get("annotations"), list
    ):
        raise VerifyError(f"{path}: expected a COCO caption file with 'images' and 'annotations' lists")
    caps: dict[Any, list[str]] = {}
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
            raise VerifyError(f"{path}: annotations[{i}] needs 'image_id' and a string 'caption'")
        caps.setdefault(a["image_id"], []).append(a["caption"].strip())
    out = []
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise VerifyError(f"{path}: images[{i}] needs 'id' and a string 'file_name'")
        if im["id"] not in caps:
            raise VerifyError(f"{path}: images[{i}] ({im['file_name']}) has no caption")
        out.append((Path(im["file_name"]).name, IMAGE_DIR, caps[im["id"]]))
    return out


class Coco(Dataset):
    name = "coco"

    def build(self, ctx: PrepContext, spec: DatasetSpec, source: SourceSpec, out: Path, dl: Path) -> None:
        if source.kind == "hub_snapshot":
            move_snapshot(ctx, self.name, source, out, dl)
            return
        ann = fetch_url(ctx, self.name, source, SOURCE_JSON, dl)
        entries = coco_format_entries(read_json(ann, self.name), ann)
        wanted = {e[0] for e in entries}
        archive = fetch_url(ctx, self.name, source, ZIP, dl)
        n = extract_zip(
            archive, out / IMAGE_DIR, lambda m: Path(m).name if Path(m).name in wanted else None
        )
        ctx.say(self.name, f"extracted {n} test images from {ZIP}")
        write_karpathy(out / ANNOTATION, self.name, entries)

    def verify(self, ctx: PrepContext, spec: DatasetSpec, out: Path) -> dict[str, int]:
        return caption_counts(out, self.name, ANNOTATION, ".")
