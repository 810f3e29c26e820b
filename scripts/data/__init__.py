"""Data preparation: one module per dataset, a shared flow (:mod:`scripts.data.common`), the downloaders
(:mod:`scripts.data.fetch`) and the manifest (:mod:`scripts.data.manifest`). CLI: ``python -m scripts.prepare_data``."""

from __future__ import annotations

from scripts.data.cirr import Cirr
from scripts.data.coco import Coco
from scripts.data.common import Dataset
from scripts.data.fashioniq import FashionIQ
from scripts.data.flickr30k import Flickr30k
from scripts.data.mmeb import Mmeb
from scripts.data.nli import Nli
from scripts.data.senteval import SentEval

DATASETS: dict[str, type[Dataset]] = {
    c.name: c for c in (Nli, SentEval, Flickr30k, Coco, Cirr, FashionIQ, Mmeb)
}
ALIASES = {"sts": "senteval", "flickr": "flickr30k"}


def get(name: str) -> Dataset:
    key = ALIASES.get(name, name)
    if key not in DATASETS:
        raise KeyError(f"unknown dataset '{name}'; choose from {', '.join(DATASETS)} or all")
    return DATASETS[key]()


__all__ = ["ALIASES", "DATASETS", "get"]
