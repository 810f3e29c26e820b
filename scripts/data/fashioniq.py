"""FashionIQ val (dress, shirt, toptee) into ``<root>/fashioniq/``: annotations from the official
repository (``captions/cap.<cat>.val.json``, ``image_splits/split.<cat>.val.json``, CDLA), images from the
release's re-upload ``royokong/fashioniq_val_imgs`` (parquet rows ``img`` + ``id`` + ``category``) written as
``images/<id>.png`` (``.jpg`` when the bytes are JPEG; the loader accepts both).

In place and file by file: images already present (e.g. from another source) are kept, and only the
missing ones are taken from the hub snapshot.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from e5v.data.atomic import atomic_write
from e5v.data.paths import UnsafePathError, safe_join
from eval.loaders import DataFormatError, MissingDataError
from eval.loaders.fashioniq import CATEGORIES, load_fashioniq
from scripts.data.common import Dataset, PrepContext, fetch_snapshot, place_url_files, read_json
from scripts.data.manifest import DatasetSpec, SourceSpec, VerifyError

IMAGE_DIR = "images"
IMAGE_COLUMNS = ("img", "image")
NAME_COLUMNS = ("id", "name", "image_id", "asin")


def wanted_names(out: Path) -> list[str]:
    """Every image the val annotations name (gallery, candidates, targets), in first-seen order."""
    names: dict[str, None] = {}
    for cat in CATEGORIES:
        split = read_json(out / "image_splits" / f"split.{cat}.val.json", "fashioniq")
        caps = read_json(out / "captions" / f"cap.{cat}.val.json", "fashioniq")
        if not isinstance(split, list) or not isinstance(caps, list):
            raise VerifyError(f"fashioniq: {cat} annotations must be JSON lists; delete them and run again")
        names.update(dict.fromkeys(str(n) for n in split))
        for q in caps:
            if isinstance(q, dict):
                names.update(dict.fromkeys(str(q[k]) for k in ("candidate", "target") if k in q))
    return list(names)


def has_image(images: Path, name: str) -> bool:
    return (images / f"{name}.png").is_file() or (images / f"{name}.jpg").is_file()


def image_bytes(value: Any) -> bytes | None:
    if isinstance(value, dict):
        value = value.get("bytes")
    return bytes(value) if isinstance(value, (bytes, bytearray)) and value else None


def write_image(images: Path, name: str, data: bytes) -> None:
    """PNG and JPEG bytes are written as they are; anything else is converted to PNG."""
    if data.startswith(b"\x89PNG"):
        ext = ".png"
    elif data.startswith(b"\xff\xd8"):
        ext = ".jpg"
    else:
        from PIL import Image

        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="PNG")
        data, ext = buf.getvalue(), ".png"
    try:
        target = safe_join(images, f"{name}{ext}", where="hub image id")
    except UnsafePathError as e:
        raise VerifyError(str(e)) from e
    atomic_write(target, lambda f: f.write(data))


def extract_images(files: list[Path], wanted: set[str], images: Path) -> int:
    """Write the rows of the parquet ``files`` whose name is in ``wanted``; returns how many."""
    import pyarrow.parquet as pq

    n = 0
    for f in files:
        pf = pq.ParquetFile(f)
        cols = pf.schema_arrow.names
        icol = next((c for c in IMAGE_COLUMNS if c in cols), None)
        ncol = next((c for c in NAME_COLUMNS if c in cols), None)
        if icol is None or ncol is None:
            raise VerifyError(f"{f}: needs an image column {IMAGE_COLUMNS} and a name column {NAME_COLUMNS}; found {cols}")
        for batch in pf.iter_batches(batch_size=64, columns=[icol, ncol]):
            d = batch.to_pydict()
            for value, name in zip(d[icol], d[ncol]):
                name = str(name)
                data = image_bytes(value) if name in wanted else None
                if data is not None:
                    write_image(images, name, data)
                    wanted.discard(name)
                    n += 1
    return n


class FashionIQ(Dataset):
    name = "fashioniq"
    in_place = True

    def build(self, ctx: PrepContext, spec: DatasetSpec, source: SourceSpec, out: Path, dl: Path) -> None:
        place_url_files(ctx, self.name, source, out, dl)
        images = out / IMAGE_DIR
        missing = {n for n in wanted_names(out) if not has_image(images, n)}
        if not missing:
            ctx.say(self.name, "every image is already in place")
            return
        ctx.say(self.name, f"{len(missing):,} images to fetch")
        files = [p for p in fetch_snapshot(ctx, self.name, source, dl) if p.suffix == ".parquet"]
        n = extract_images(files, missing, images)
        ctx.say(self.name, f"wrote {n:,} images to {images}")

    def verify(self, ctx: PrepContext, spec: DatasetSpec, out: Path) -> dict[str, int]:
        images = out / IMAGE_DIR
        missing = [n for n in wanted_names(out) if not has_image(images, n)]
        if missing:
            raise VerifyError(
                f"fashioniq: {len(missing):,} images named in the val annotations are not in {images} "
                f"(e.g. {missing[:3]}); the image source lacks them. Put them there as <name>.png or .jpg "
                "(e.g. from the fashion-iq-metadata image lists) and run again"
            )
        counts = {}
        try:
            for cat in CATEGORIES:
                d = load_fashioniq(out, cat)
                counts[f"{cat}_queries"] = len(d.queries)
                counts[f"{cat}_images"] = len(d.gallery)
        except (MissingDataError, DataFormatError) as e:
            raise VerifyError(str(e)) from e
        return counts
