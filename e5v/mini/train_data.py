"""The mini world's TRAINING data, in the on-disk formats of the real training sets.

* NLI triplets (:func:`write_mini_nli`): the SimCSE CSV layout (``sent0, sent1, hard_neg``) of
  ``nli_for_simcse.csv``: a caption, a paraphrase, a one-attribute contradiction (``data=mini_nli``);
* image-caption pairs (:func:`write_mini_pairs`): LLaVA-Pretrain's JSON + image folder layout of
  ``blip_laion_cc_sbu_558k.json`` (``data=mini_pairs``).

Scenes come from the TRAINING stream of :func:`e5v.mini.world.training_scenes`, disjoint from the
evaluation scenes of the same seed (:mod:`e5v.mini.eval_data`). Files are generated once and reused
while their content matches. :func:`mini_triplets` and :func:`mini_image_caption_pairs` (the
``_target_`` loaders of ``configs/data/mini_*.yaml``) generate and then read the data back through the
REAL loaders, :func:`e5v.data.nli.load_triplets` and :func:`e5v.data.pairs.load_image_caption_pairs`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from e5v.data.atomic import build_dir_once, write_generated
from e5v.data.nli import COLUMNS, Triplets, load_triplets
from e5v.data.pairs import ImageCaptionPairs, load_image_caption_pairs
from e5v.errors import DataError
from e5v.mini.world import nli_triplets, training_scenes

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- NLI triplets (SimCSE layout)
def write_mini_nli(path: str | Path, n_rows: int = 512, seed: int = 0) -> Path:
    """Generate the mini-world NLI CSV (sent0, sent1, hard_neg) unless it already exists with that content."""
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


# ---------------------------------------------------------------------- image-caption pairs (LLaVA-Pretrain)
MINI_PAIRS_VERSION = 1
MINI_MARKER = "e5v_mini_pairs.json"
_MINI_SIZES = ((64, 64), (96, 64), (64, 96))  # several aspect ratios: 1 to 2 anyres tiles, padded batches
_MINI_INSTRUCTIONS = (
    "<image>\nGive a brief description of the image.",
    "Describe the image concisely.\n<image>",
    "<image>\nRender a clear and concise summary of the photo.",
)


def mini_pair_rows(n_rows: int, seed: int = 0) -> list[tuple[dict[str, Any], Any]]:
    """(JSON row, scene) for the mini world's training pairs, deterministic from ``seed``."""
    out = []
    for i, scene in enumerate(training_scenes(n_rows, seed=seed)):
        rid = f"{i:09d}"
        row = {
            "id": rid,
            "image": f"{i // 1000:05d}/{rid}.jpg",
            "conversations": [
                {"from": "human", "value": _MINI_INSTRUCTIONS[i % len(_MINI_INSTRUCTIONS)]},
                {"from": "gpt", "value": scene.caption()},
            ],
        }
        out.append((row, scene))
    return out


def _render_images(folder: Path, rows: list[tuple[dict[str, Any], Any]], manifest: dict[str, Any]) -> None:
    for i, (row, scene) in enumerate(rows):
        w, h = _MINI_SIZES[i % len(_MINI_SIZES)]
        f = folder / row["image"]
        f.parent.mkdir(parents=True, exist_ok=True)
        scene.render(w, h).save(f, format="JPEG", quality=90)
    (folder / MINI_MARKER).write_text(json.dumps(manifest, indent=1) + "\n")


def write_mini_pairs(path: str | os.PathLike, image_root: str | os.PathLike, n_rows: int = 512, seed: int = 0) -> Path:
    """Write the mini pairs JSON at ``path`` and their images under ``image_root``, once.

    The images are built in a temporary sibling folder renamed into place (``build_dir_once``), with a
    marker recording (version, n_rows, seed); a folder built with other values is replaced. The JSON is
    written atomically after the images, and only when its content changes.
    """
    path, root = Path(path), Path(image_root)
    want = {"version": MINI_PAIRS_VERSION, "n_rows": int(n_rows), "seed": int(seed)}
    marker = root / MINI_MARKER
    if marker.is_file():
        have = json.loads(marker.read_text())
        if have != want:
            log.warning("%s holds mini pairs generated with %s; regenerating them for %s", root, have, want)
            old = Path(tempfile.mkdtemp(prefix=".stale-", dir=root.parent))
            try:
                root.rename(old / "images")
            except FileNotFoundError:  # another process moved it first
                pass
            shutil.rmtree(old, ignore_errors=True)
    elif root.exists() and any(root.iterdir()):
        raise DataError(f"{root} exists and is not a mini-pairs image folder (no {MINI_MARKER}); choose another "
                        "data.loader.image_root")
    elif root.exists():
        root.rmdir()  # an empty folder: build_dir_once renames the finished one onto this name
    rows = mini_pair_rows(int(n_rows), int(seed))
    build_dir_once(root, lambda tmp: _render_images(tmp, rows, want), MINI_MARKER)
    text = json.dumps([r for r, _ in rows], indent=1) + "\n"
    return write_generated(
        path, text, "mini_pairs",
        hint=f"To train on your own pairs use data=llava_pretrain_558k data.loader.path={path}; for generated "
        "mini pairs point data.loader.path at a new file.",
    )


def mini_image_caption_pairs(
    path: str | os.PathLike, image_root: str | os.PathLike, n_rows: int = 512, seed: int = 0, **kwargs: Any
) -> ImageCaptionPairs:
    """Generate (if needed) and load the mini world's image-caption pairs (LLaVA-Pretrain format)."""
    write_mini_pairs(path, image_root, n_rows=n_rows, seed=seed)
    return load_image_caption_pairs(path, image_root, **kwargs)
