"""CIRR (composed image retrieval on real-life images), official annotation layout (rc2).

``<root>/captions/cap.rc2.<split>.json``: a list of ``{"pairid", "reference", "target_hard",
"target_soft", "caption", "img_set": {"id", "members", ...}}`` (test1 has no targets).
``<root>/image_splits/split.rc2.<split>.json``: ``{image name: relative path}``, the paths relative
to ``image_dir`` (by default the CIRR root, where the NLVR2 images sit as ``dev/``, ``test1/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from e5v.errors import ConfigError
from eval.encode import ImageRef
from eval.loaders import DataFormatError, MissingDatasetError, field, image_path, read_json

SPLITS = ("val", "test1")
_FILE_SPLIT = {"val": "val", "test1": "test1"}


@dataclass
class CirrQuery:
    pairid: int
    reference: str
    caption: str
    target: str | None
    members: list[str]


@dataclass
class CirrData:
    split: str
    queries: list[CirrQuery]
    gallery_names: list[str]
    gallery: list[ImageRef]

    def index_of(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.gallery_names)}


def load_cirr(root: str | Path, split: str = "val", image_dir: str = ".", check_images: bool = True) -> CirrData:
    root = Path(root)
    if split not in SPLITS:
        raise ConfigError(f"cirr: split must be one of {SPLITS}, got {split!r}")
    if not root.is_dir():
        raise MissingDatasetError("cirr", root, "dataset folder")
    cap_path = root / "captions" / f"cap.rc2.{_FILE_SPLIT[split]}.json"
    split_path = root / "image_splits" / f"split.rc2.{_FILE_SPLIT[split]}.json"
    caps = read_json(cap_path, "cirr", f"caption file for split {split}")
    names = read_json(split_path, "cirr", f"image split file for split {split}")
    if not isinstance(caps, list):
        raise DataFormatError(f"{cap_path}: expected a JSON list of query objects")
    if not isinstance(names, dict) or not names:
        raise DataFormatError(f"{split_path}: expected a non-empty JSON object {{image name: relative path}}")
    img_root = root / image_dir
    gallery_names = sorted(names)
    gallery = []
    for name in gallery_names:
        rel = names[name]
        if not isinstance(rel, str):
            raise DataFormatError(f"{split_path}: key '{name}' maps to a {type(rel).__name__}, expected a path")
        gallery.append(
            ImageRef(path=image_path(img_root, rel, split_path, name, "cirr", check=check_images), label=name)
        )
    known = set(gallery_names)
    queries = []
    pair_rows: dict[int, int] = {}
    for row, q in enumerate(caps):
        ref = field(q, "reference", cap_path, row, str)
        caption = field(q, "caption", cap_path, row, str)
        img_set = field(q, "img_set", cap_path, row, dict)
        members = field(img_set, "members", cap_path, f"{row} img_set", list)
        target = None
        if split != "test1":
            target = field(q, "target_hard", cap_path, row, str)
            if target not in known:
                raise DataFormatError(f"{cap_path}: row {row} target_hard {target!r} is not in {split_path}")
        if ref not in known:
            raise DataFormatError(f"{cap_path}: row {row} reference {ref!r} is not in {split_path}")
        unknown = [m for m in members if m not in known]
        if unknown:
            raise DataFormatError(f"{cap_path}: row {row} img_set member(s) {unknown[:3]} are not in {split_path}")
        pairid = int(field(q, "pairid", cap_path, row, int))
        if pairid in pair_rows:  # the submission files are keyed by pairid: one would overwrite the other
            raise DataFormatError(f"{cap_path}: row {row} repeats pairid {pairid} (first at row {pair_rows[pairid]})")
        pair_rows[pairid] = row
        queries.append(CirrQuery(pairid, ref, caption, target, list(members)))
    if not queries:
        raise DataFormatError(f"{cap_path}: no queries")
    return CirrData(split, queries, gallery_names, gallery)
