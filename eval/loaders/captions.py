"""Flickr30K / COCO caption datasets (Karpathy test splits) in three on-disk layouts.

* ``karpathy``: the Karpathy split file (``dataset_flickr30k.json`` / ``dataset_coco.json``):
  ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw": ...}]}]}`` with the images
  under ``image_dir`` (Flickr30K: ``flickr30k-images/<filename>``; COCO: ``<filepath>/<filename>``).
* ``clip_benchmark``: a JSON list of ``{"image": relative path, "caption": [captions]}`` (already the
  test split), e.g. ``flickr30k_test_karpathy.json``.
* ``hf``: a Hugging Face dataset folder, parquet files (``**/*.parquet``, the hub layout of
  ``royokong/flickr30k_test`` / ``nlphuji/flickr30k``) or a ``save_to_disk`` arrow folder, with an
  image column (encoded bytes) and a caption column (a list of captions, or one string); rows are
  filtered on a ``split`` column when there is one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from e5v.errors import ConfigError
from eval.encode import ImageRef
from eval.loaders import DataFormatError, MissingDataError, MissingDatasetError, field, image_path, read_json

log = logging.getLogger(__name__)

FORMATS = ("auto", "karpathy", "clip_benchmark", "hf")
TEXT_COLUMNS = ("text", "caption", "captions", "sentences", "raw")


@dataclass
class CaptionData:
    images: list[ImageRef]
    image_ids: list[str]
    captions: list[str]
    caption_image: np.ndarray  # (n_captions,) index of each caption's image

    def __post_init__(self) -> None:
        if not self.images:
            raise DataFormatError("the dataset has no images in the requested split")
        if len(self.captions) != len(self.caption_image):
            raise DataFormatError("captions and caption->image map differ in length")

    @property
    def image_captions(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.images]
        for c, i in enumerate(self.caption_image.tolist()):
            out[i].append(c)
        return out


def _cut(caps: list[str], max_captions: int | None) -> list[str]:
    return caps if max_captions is None else caps[: int(max_captions)]


def _finish(
    images: list[ImageRef],
    ids: list[str],
    caps_per_image: list[list[str]],
    max_captions: int | None,
    src: Path,
    unique_ids: bool = True,
) -> CaptionData:
    if unique_ids:  # the same image twice would tie with itself in every ranking: a silently wrong score
        first: dict[str, int] = {}
        for i, image_id in enumerate(ids):
            if image_id in first:
                raise DataFormatError(
                    f"{src}: image {image_id!r} appears twice (entries {first[image_id]} and {i} of the split); "
                    "each image must be listed once with all its captions"
                )
            first[image_id] = i
    captions: list[str] = []
    owner: list[int] = []
    for i, caps in enumerate(caps_per_image):
        caps = _cut(caps, max_captions)
        if not caps:
            raise DataFormatError(f"{src}: image {ids[i]!r} has no captions")
        for c in caps:
            if not isinstance(c, str) or not c.strip():
                raise DataFormatError(f"{src}: image {ids[i]!r} has an empty or non-string caption {c!r}")
        captions.extend(caps)
        owner.extend([i] * len(caps))
    return CaptionData(images, ids, captions, np.asarray(owner, dtype=np.int64))


def load_karpathy(
    root: Path, annotation: str, image_dir: str, split: str, max_captions: int | None, dataset: str
) -> CaptionData:
    path = root / annotation
    data = read_json(path, dataset, f"Karpathy split file '{annotation}'")
    entries = field(data, "images", path, "(top level)", list)
    images, ids, caps = [], [], []
    for row, e in enumerate(entries):
        if field(e, "split", path, row, str) != split:
            continue
        fname = field(e, "filename", path, row, str)
        rel = str(Path(image_dir) / e.get("filepath", "") / fname)
        sents = field(e, "sentences", path, row, list)
        texts = [field(s, "raw", path, f"{row} sentence {j}", str) for j, s in enumerate(sents)]
        images.append(ImageRef(path=image_path(root, rel, path, row, dataset), label=fname))
        ids.append(fname)
        caps.append(texts)
    if not images:
        raise DataFormatError(f"{path}: no image has split '{split}' (splits are test/val/train/restval)")
    return _finish(images, ids, caps, max_captions, path)


def load_clip_benchmark(
    root: Path, annotation: str, image_dir: str, max_captions: int | None, dataset: str
) -> CaptionData:
    path = root / annotation
    data = read_json(path, dataset, f"annotation file '{annotation}'")
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of {{image, caption}} objects")
    images, ids, caps = [], [], []
    for row, e in enumerate(data):
        rel = field(e, "image", path, row, str)
        c = field(e, "caption", path, row, (list, str))
        images.append(ImageRef(path=image_path(root, str(Path(image_dir) / rel), path, row, dataset), label=rel))
        ids.append(rel)
        caps.append([c] if isinstance(c, str) else list(c))
    return _finish(images, ids, caps, max_captions, path)


def _hf_rows(root: Path, dataset: str, split: str) -> tuple[list[dict[str, Any]], Path]:
    parquet = sorted(root.rglob("*.parquet"))
    if parquet:
        import pyarrow.parquet as pq

        rows: list[dict[str, Any]] = []
        for f in parquet:
            # a "split" column (nlphuji/flickr30k) is filtered while reading: other splits' images stay on disk
            filters = [("split", "=", split)] if "split" in pq.read_schema(f).names else None
            rows.extend(pq.read_table(f, filters=filters).to_pylist())
        return rows, parquet[0]
    if (root / "dataset_info.json").is_file() or (root / "state.json").is_file():
        import datasets

        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.DatasetDict):
            raise DataFormatError(f"{root}: a DatasetDict; point root at one split's folder (e.g. {root}/test)")
        for name, feat in ds.features.items():
            if isinstance(feat, datasets.Image):
                ds = ds.cast_column(name, datasets.Image(decode=False))
        return ds.to_list(), root
    raise MissingDatasetError(dataset, root, "Hugging Face dataset (parquet files or a save_to_disk folder)")


def load_hf(
    root: Path, split: str, image_column: str, text_column: str | None, max_captions: int | None, dataset: str
) -> CaptionData:
    rows, src = _hf_rows(root, dataset, split)
    if not rows:
        raise DataFormatError(f"{src}: the dataset is empty")
    cols = set(rows[0])
    if image_column not in cols:
        raise DataFormatError(f"{src}: no image column '{image_column}' (columns: {sorted(cols)}); set image_column")
    tcol = text_column or next((c for c in TEXT_COLUMNS if c in cols), None)
    if tcol is None or tcol not in cols:
        raise DataFormatError(
            f"{src}: no caption column (tried {text_column or TEXT_COLUMNS}; columns: {sorted(cols)})"
        )
    if "split" in cols:
        rows = [r for r in rows if r["split"] == split]
        if not rows:
            raise DataFormatError(f"{src}: no row has split == '{split}'")
    images, ids, caps = [], [], []
    named = "filename" in cols or "img_id" in cols  # ids from the data, not made up from row numbers
    for row, r in enumerate(rows):
        im = r[image_column]
        if isinstance(im, dict) and im.get("bytes"):
            label = str(im.get("path") or f"{src.name}#{row}")
            ref = ImageRef(data=im["bytes"], label=label)
        elif isinstance(im, (bytes, bytearray)):
            label = f"{src.name}#{row}"
            ref = ImageRef(data=bytes(im), label=label)
        elif isinstance(im, dict) and im.get("path"):
            label = str(im["path"])
            ref = ImageRef(path=image_path(root, label, src, row, dataset), label=label)
        else:
            raise DataFormatError(f"{src}: row {row} column '{image_column}' holds no image bytes or path")
        c = r[tcol]
        if isinstance(c, str):
            c = [c]
        if not isinstance(c, list):
            raise DataFormatError(
                f"{src}: row {row} column '{tcol}' is a {type(c).__name__}, expected a list of captions"
            )
        images.append(ref)
        ids.append(str(r.get("filename") or r.get("img_id") or label))
        caps.append(list(c))
    return _finish(images, ids, caps, max_captions, src, unique_ids=named)


def resolve_format(root: Path, dataset: str, format: str = "auto", annotation: str | None = None) -> str:
    """The layout of ``root``: ``format`` itself, or for ``auto`` the annotation file's kind when it
    exists, else ``hf``. A missing ``root`` raises :class:`MissingDatasetError`."""
    if format not in FORMATS:
        raise ConfigError(f"{dataset}: format must be one of {FORMATS}, got {format!r}")
    if not root.is_dir():
        raise MissingDatasetError(dataset, root, "dataset folder")
    if format != "auto":
        return format
    if annotation and (root / annotation).is_file():
        data_head = (root / annotation).read_bytes()[:64].lstrip()
        return "clip_benchmark" if data_head.startswith(b"[") else "karpathy"
    return "hf"


def has_hf_data(root: Path) -> bool:
    """Whether ``root`` holds a Hugging Face dataset (parquet files or a save_to_disk folder), without reading it."""
    if (root / "dataset_info.json").is_file() or (root / "state.json").is_file():
        return True
    return next(root.rglob("*.parquet"), None) is not None


def load_captions(
    root: str | Path,
    dataset: str,
    format: str = "auto",
    annotation: str | None = None,
    image_dir: str = ".",
    split: str = "test",
    max_captions: int | None = None,
    image_column: str = "image",
    text_column: str | None = None,
) -> CaptionData:
    """Load a caption dataset's test split from ``root`` (see the module docstring for layouts)."""
    root = Path(root)
    format = resolve_format(root, dataset, format, annotation)
    log.info("%s: reading %s layout from %s", dataset, format, root)
    if format == "karpathy":
        return load_karpathy(root, annotation or f"dataset_{dataset}.json", image_dir, split, max_captions, dataset)
    if format == "clip_benchmark":
        return load_clip_benchmark(
            root, annotation or f"{dataset}_test_karpathy.json", image_dir, max_captions, dataset
        )
    try:
        return load_hf(root, split, image_column, text_column, max_captions, dataset)
    except MissingDataError:
        hint = f" or the annotation file {root / annotation}" if annotation else ""
        raise MissingDatasetError(dataset, root, f"Hugging Face dataset (parquet/arrow){hint}") from None
