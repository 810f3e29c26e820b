"""FashionIQ validation split, official annotation layout.

``<root>/captions/cap.<category>.val.json``: a list of ``{"candidate", "target", "captions": [2]}``.
``<root>/image_splits/split.<category>.val.json``: the list of gallery image names.
Images: ``<root>/<image_pattern>`` with ``{name}`` replaced (default ``images/{name}.png``; a
``.jpg`` twin is accepted).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from e5v.errors import ConfigError
from eval.encode import ImageRef
from eval.loaders import DataFormatError, MissingDatasetError, field, image_path, read_json

CATEGORIES = ("dress", "shirt", "toptee")
log = logging.getLogger(__name__)


@dataclass
class FiqQuery:
    candidate: str
    target: str
    captions: list[str]


@dataclass
class FiqData:
    category: str
    queries: list[FiqQuery]
    gallery_names: list[str]
    gallery: list[ImageRef]
    candidates: dict[str, ImageRef]
    duplicates: int = 0  # gallery names listed more than once in the split file (merged, logged)


def _image(root: Path, pattern: str, name: str, src: Path, row: int | str) -> Path:
    rel = pattern.format(name=name)
    p = image_path(root, rel, src, row, "fashioniq", check=False)
    if p.is_file():
        return p
    alt = p.with_suffix(".jpg" if p.suffix.lower() == ".png" else ".png")
    if alt.is_file():
        return alt
    raise MissingDatasetError("fashioniq", p, f"image '{rel}' (named in {src}, row {row})")


def load_fashioniq(root: str | Path, category: str, image_pattern: str = "images/{name}.png") -> FiqData:
    root = Path(root)
    if category not in CATEGORIES:
        raise ConfigError(f"fashioniq: category must be one of {CATEGORIES}, got {category!r}")
    if not root.is_dir():
        raise MissingDatasetError("fashioniq", root, "dataset folder")
    cap_path = root / "captions" / f"cap.{category}.val.json"
    split_path = root / "image_splits" / f"split.{category}.val.json"
    caps = read_json(cap_path, "fashioniq", f"caption file for {category}")
    names = read_json(split_path, "fashioniq", f"image split file for {category}")
    if not isinstance(caps, list) or not caps:
        raise DataFormatError(f"{cap_path}: expected a non-empty JSON list of query objects")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataFormatError(f"{split_path}: expected a non-empty JSON list of image names")
    gallery_names = list(dict.fromkeys(names))
    duplicates = len(names) - len(gallery_names)
    if duplicates:
        log.warning("%s: %d duplicate image name(s) merged (each image is ranked once)", split_path, duplicates)
    gallery = [
        ImageRef(path=_image(root, image_pattern, n, split_path, i), label=n) for i, n in enumerate(gallery_names)
    ]
    known = set(gallery_names)
    queries = []
    candidates: dict[str, ImageRef] = {}
    for row, q in enumerate(caps):
        cand = field(q, "candidate", cap_path, row, str)
        tgt = field(q, "target", cap_path, row, str)
        texts = field(q, "captions", cap_path, row, list)
        if len(texts) != 2 or not all(isinstance(t, str) for t in texts):
            raise DataFormatError(f"{cap_path}: row {row} 'captions' must hold exactly 2 strings, got {texts!r}")
        if tgt not in known:
            raise DataFormatError(f"{cap_path}: row {row} target {tgt!r} is not in {split_path}")
        if cand not in candidates:
            candidates[cand] = ImageRef(path=_image(root, image_pattern, cand, cap_path, row), label=cand)
        queries.append(FiqQuery(cand, tgt, list(texts)))
    return FiqData(category, queries, gallery_names, gallery, candidates, duplicates)
