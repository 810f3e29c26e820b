"""Mini MMEB-train: the mini world's stage-2 TRAINING subsets in the real ``TIGER-Lab/MMEB-train`` layout.

The layout is the one :func:`e5v.data.contrastive.load_mmeb_train` reads (facts and sources in
:mod:`e5v.data.contrastive`): one folder per subset holding ``original-00000-of-00001.parquet`` with six string
columns ``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path``, ``neg_text``, ``neg_image_path`` (``""``
for no image / no negative), texts with the ``<|image_1|>`` placeholder first when the item has an image and
the instruction inside the text. Images are PNG files under ``<root>/images/`` at the path the parquet names.

Five subsets, one per meta-task (two for retrieval), each named as the MMEB-mini task it trains for, as the real
subsets are named as the MMEB-eval tasks they train for, with MMEB-train's instruction wording:

================  ==============  ==================  =====================================================
subset            meta-task       mirrors             query -> positive (negative)
================  ==============  ==================  =====================================================
MiniShape         classification  ImageNet_1K         image -> its objects' shape (another shape)
MiniColour-VQA    vqa             OK-VQA              image + "What colour is the <shape>?" -> colour (another)
MiniScene_t2i     retrieval       MSCOCO_t2i          caption -> image (none)
MiniScene_i2t     retrieval       MSCOCO_i2t          image -> caption (none)
MiniGrounding     grounding       MSCOCO              image + "labeled as <shape>" -> its crop (none)
================  ==============  ==================  =====================================================

Disjoint from every mini evaluation set: scenes come from the TRAINING stream
(:func:`e5v.mini.world.training_scenes`: never one of the caption-retrieval evaluation scenes) and show exactly
TWO objects (CIRR / FashionIQ evaluation images show one, MMEB-mini's scenes three); no scene is used twice.
Deterministic from the seed; built aside and renamed into place with a marker (:data:`MARKER`) recording
version, seed and size; a folder without the marker (a user's data) is never written to.

Run: ``python -m e5v.mini.stage2_data --out data/mini_train/mmeb_train [--seed 0] [--rows 256]``;
``data=mini_mmeb_train`` generates it on first use (:func:`mini_mmeb_train`).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from e5v.data.atomic import ensure_generated_dir
from e5v.data.contrastive import MMEB_TRAIN_COLUMNS, load_mmeb_train
from e5v.errors import ConfigError
from e5v.mini.world import COLOURS, POSITIONS, SHAPES, Obj, Scene, training_scenes

log = logging.getLogger(__name__)

VERSION = 1
MARKER = "mini_mmeb_train.json"
PARQUET = "original-00000-of-00001.parquet"
IMAGE_DIR = "images"
IMAGE_TOKEN = "<|image_1|>"
PX = 64
CROP = 0.42
SUBSETS: dict[str, dict[str, str]] = {
    "MiniShape": {"meta": "classification", "mirrors": "ImageNet_1K"},
    "MiniColour-VQA": {"meta": "vqa", "mirrors": "OK-VQA"},
    "MiniScene_t2i": {"meta": "retrieval", "mirrors": "MSCOCO_t2i"},
    "MiniScene_i2t": {"meta": "retrieval", "mirrors": "MSCOCO_i2t"},
    "MiniGrounding": {"meta": "grounding", "mirrors": "MSCOCO"},
}
DEFAULT_ROWS = 256


def _img(text: str) -> str:
    return f"{IMAGE_TOKEN}\n{text}"


def _crop(img: Any, o: Obj) -> Any:
    cx, cy = POSITIONS[o.position]
    half = CROP * PX / 2
    x0 = min(max(cx * PX - half, 0), PX - 2 * half)
    y0 = min(max(cy * PX - half, 0), PX - 2 * half)
    return img.crop((round(x0), round(y0), round(x0 + 2 * half), round(y0 + 2 * half)))


class _Pool:
    """Two-object training scenes, each handed out once."""

    def __init__(self, n_rows: int, seed: int) -> None:
        self.seed, self.want = seed, 12 * n_rows + 400
        self.scenes = [s for s in training_scenes(self.want, seed=seed) if len(s.objects) == 2]
        self.next = 0

    def take(self, ok: Callable[[Scene], bool]) -> Scene:
        while True:
            while self.next < len(self.scenes):
                s = self.scenes[self.next]
                self.next += 1
                if ok(s):
                    return s
            self.want *= 2  # pragma: no cover - the first draw has room for the default sizes
            more = [s for s in training_scenes(self.want, seed=self.seed) if len(s.objects) == 2]
            self.scenes = self.scenes + more[len(self.scenes):]


def _save_png(root: Path, rel: str, img: Any) -> str:
    path = root / IMAGE_DIR / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return rel


def subset_rows(root: Path, subset: str, pool: _Pool, rng: random.Random, n: int) -> list[dict[str, str]]:
    """Write one subset's images under ``root/images`` and return its rows (column -> string)."""
    rows = []
    for i in range(n):
        rel = f"{subset}/Train/{i:05d}.png"
        if subset == "MiniShape":
            s = pool.take(lambda sc: sc.objects[0].shape == sc.objects[1].shape)
            gt = s.objects[0].shape
            row = {"qry": _img("Represent the given image for classification"), "qry_image_path":
                   _save_png(root, rel, s.render(PX, PX)), "pos_text": gt, "pos_image_path": "",
                   "neg_text": rng.choice([x for x in SHAPES if x != gt]), "neg_image_path": ""}
        elif subset == "MiniColour-VQA":
            s = pool.take(lambda sc: sc.objects[0].shape != sc.objects[1].shape)
            o = s.objects[rng.randrange(2)]
            row = {"qry": _img(f"Represent the given image with the following question: What colour is the {o.shape}?"),
                   "qry_image_path": _save_png(root, rel, s.render(PX, PX)), "pos_text": o.colour,
                   "pos_image_path": "", "neg_text": rng.choice([c for c in sorted(COLOURS) if c != o.colour]),
                   "neg_image_path": ""}
        elif subset == "MiniScene_t2i":
            s = pool.take(lambda sc: True)
            row = {"qry": f"Find me an everyday image that matches the given caption: {s.caption()}",
                   "qry_image_path": "", "pos_text": _img("Represent the given image."),
                   "pos_image_path": _save_png(root, rel, s.render(PX, PX)), "neg_text": "", "neg_image_path": ""}
        elif subset == "MiniScene_i2t":
            s = pool.take(lambda sc: True)
            row = {"qry": _img("Find an image caption describing the given everyday image."),
                   "qry_image_path": _save_png(root, rel, s.render(PX, PX)), "pos_text": s.caption(),
                   "pos_image_path": "", "neg_text": "", "neg_image_path": ""}
        elif subset == "MiniGrounding":
            s = pool.take(lambda sc: sc.objects[0].shape != sc.objects[1].shape)
            o = s.objects[rng.randrange(2)]
            img = s.render(PX, PX)
            row = {"qry": _img(f'Select the portion of the image that isolates the object labeled as "{o.shape}"'),
                   "qry_image_path": _save_png(root, rel, img),
                   "pos_text": _img("Represent the given cropped image of the object"),
                   "pos_image_path": _save_png(root, f"{subset}/Train/{i:05d}_crop.png", _crop(img, o)),
                   "neg_text": "", "neg_image_path": ""}
        else:
            raise ConfigError(f"unknown mini MMEB-train subset {subset!r}; known: {list(SUBSETS)}")
        rows.append(row)
    return rows


def generate(out: str | Path, n_rows: int = DEFAULT_ROWS, seed: int = 0) -> Path:
    """Write every subset into ``out`` (a new or empty folder): parquets, images, marker."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    pool = _Pool(n_rows, seed)
    schema = pa.schema([(c, pa.string()) for c in MMEB_TRAIN_COLUMNS])
    for subset in SUBSETS:
        rng = random.Random(f"mini-mmeb-train/{seed}/{subset}")
        rows = subset_rows(out, subset, pool, rng, n_rows)
        (out / subset).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / subset / PARQUET)
    (out / MARKER).write_text(json.dumps(_want(n_rows, seed), indent=1) + "\n", encoding="utf-8")
    return out


def _want(n_rows: int, seed: int) -> dict[str, Any]:
    return {"version": VERSION, "seed": int(seed), "n_rows": int(n_rows), "subsets": SUBSETS}


def ensure(out: str | Path, n_rows: int = DEFAULT_ROWS, seed: int = 0) -> Path:
    """The mini MMEB-train data in ``out``, generated on first use, reused while its marker matches and
    regenerated when it records other values; a non-empty folder without the marker is never written to."""
    if int(n_rows) < 1:
        raise ConfigError(f"n_rows={n_rows}: each mini MMEB-train subset needs at least one row")
    return ensure_generated_dir(out, MARKER, _want(n_rows, seed),
                                lambda tmp: generate(tmp, n_rows=int(n_rows), seed=int(seed)),
                                "mini MMEB-train data", "point data.loader.root at another folder",
                                ".mini-mmeb-train-", ("version", "seed", "n_rows"))


def mini_mmeb_train(root: str | Path, subsets: list[str] | None = None, n_rows: int = DEFAULT_ROWS, seed: int = 0,
                    weights: list[float] | dict[str, float] | None = None, sub_batch: int | None = None,
                    mined: str | Path | None = None, mined_k: int | None = None, **kw: Any) -> Any:
    """Generate (if needed) and load the mini MMEB-train subsets as a :class:`e5v.data.mixture.Mixture`, each
    through the REAL loader :func:`e5v.data.contrastive.load_mmeb_train` (``kw``: its options)."""
    from e5v.data.mixture import Mixture

    root = ensure(root, n_rows=n_rows, seed=seed)
    names = list(subsets) if subsets else list(SUBSETS)
    unknown = [s for s in names if s not in SUBSETS]
    if unknown:
        raise ConfigError(f"unknown mini MMEB-train subset(s) {unknown}; known: {list(SUBSETS)}")
    rows = [load_mmeb_train(Path(root) / s, Path(root) / IMAGE_DIR, mined=mined, mined_k=mined_k, **kw)
            for s in names]
    return Mixture(rows, weights=weights, sub_batch=sub_batch)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Generate mini MMEB-train (the real MMEB-train layout, 5 subsets).")
    ap.add_argument("--out", type=Path, required=True, help="folder to create (e.g. data/mini_train/mmeb_train)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="rows per subset")
    args = ap.parse_args(argv)
    path = ensure(args.out, n_rows=args.rows, seed=args.seed)
    print(f"mini MMEB-train in {path}: {', '.join(SUBSETS)}")


if __name__ == "__main__":
    main()
