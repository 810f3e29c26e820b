"""Image-caption pairs in LLaVA-Pretrain's on-disk format (the paper's Table 7 multimodal training).

The format (``blip_laion_cc_sbu_558k.json`` of the hub dataset ``liuhaotian/LLaVA-Pretrain`` plus the
folder its ``images.zip`` unpacks to) is a JSON list of rows::

    {"id": "004539375",
     "image": "00453/004539375.jpg",                      # relative to the image root
     "conversations": [{"from": "human", "value": "<image>\\nRender a clear and concise summary of the photo."},
                       {"from": "gpt", "value": "select luxury furniture 3 - inch gel memory foam mattress topper"}]}

A pair is (image, caption): the anchor is the image, the positive the text of the first ``gpt`` turn
(the human turn, an instruction, is not used); there are no hard negatives. Image paths are resolved
inside the image root (:func:`e5v.data.paths.safe_join`: absolute paths, ``..`` and symlinks that
leave it are refused, whatever ``on_bad_row`` says).

:func:`mini_image_caption_pairs` writes the mini world's pairs in the same format (scenes from the
TRAINING stream of :func:`e5v.data.mini_world.training_scenes`, disjoint from the evaluation scenes).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e5v.data.nli import ON_BAD_ROW
from e5v.data.paths import UnsafePathError, safe_join
from e5v.errors import ConfigError, DataError, MissingDataError

log = logging.getLogger(__name__)

# Captions are cut to the prompt's train_max_tokens anyway; longer cells are runaway rows.
MAX_CHARS = 4096
SKIP_REASONS = ("malformed", "missing_image", "image_not_found", "missing_caption", "empty_caption", "too_long")
HUB_ID, HUB_JSON, HUB_IMAGES = "liuhaotian/LLaVA-Pretrain", "blip_laion_cc_sbu_558k.json", "images.zip"


@dataclass
class ImageCaptionPairs:
    """Validated pairs, column-wise: ``anchors`` are resolved image paths, ``positives`` captions."""

    anchors: list[str]
    positives: list[str]
    source: str
    image_root: str
    ids: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    negatives: None = None
    anchor_kind: str = "image"

    def __len__(self) -> int:
        return len(self.anchors)


def _first_gpt_turn(conversations: Any) -> tuple[str | None, str | None]:
    """(caption, None) or (None, problem) from a row's ``conversations`` list."""
    if not isinstance(conversations, list):
        return None, "key 'conversations' is missing or not a list"
    for turn in conversations:
        if isinstance(turn, dict) and turn.get("from") == "gpt":
            value = turn.get("value")
            if not isinstance(value, str):
                return None, "key 'conversations' has a 'gpt' turn without a string 'value'"
            return value, None
    return None, "key 'conversations' has no turn from 'gpt' (the caption)"


def load_image_caption_pairs(
    path: str | os.PathLike,
    image_root: str | os.PathLike,
    limit: int | None = None,
    on_bad_row: str = "skip",
    check_files: bool = True,
    max_chars: int | None = MAX_CHARS,
) -> ImageCaptionPairs:
    """Load LLaVA-Pretrain style pairs from ``path`` (JSON list) with images under ``image_root``.

    A row is bad when it is not an object (``malformed``), has no usable ``image`` string
    (``missing_image``), names an image file that does not exist (``image_not_found``; checked only
    with ``check_files``), has no ``gpt`` turn (``missing_caption``), an empty or whitespace caption
    (``empty_caption``) or one longer than ``max_chars`` (``too_long``). ``on_bad_row=skip`` drops bad
    rows and counts them by reason in ``skipped`` (training records it in ``train_info.json``);
    ``error`` stops at the first one, naming the file, the row (0-based index in the JSON list) and
    the key. An image path that escapes ``image_root`` always raises
    :class:`~e5v.data.paths.UnsafePathError`. ``limit`` keeps the first rows of the file (before
    filtering). Captions are stripped of surrounding whitespace.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ConfigError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    path, root = Path(path), Path(image_root)
    if not path.is_file():
        raise MissingDataError(
            f"image-caption file {path} not found. For the paper's 558K pairs download {HUB_JSON} and "
            f"{HUB_IMAGES} from the hub dataset {HUB_ID} (unzip the images into data.loader.image_root; "
            "docs/data.md), use data=mini_pairs for the generated mini world, or point data.loader.path at "
            "your own JSON in the same format"
        )
    if not root.is_dir():
        raise MissingDataError(
            f"image root {root} not found (it holds the images that {path.name}'s 'image' paths are relative to); "
            f"unzip {HUB_IMAGES} of {HUB_ID} there or set data.loader.image_root"
        )
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e}); re-save the file as UTF-8") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(rows, list):
        raise DataError(
            f"{path}: expected a JSON list of rows ({{'id', 'image', 'conversations'}}), got a {type(rows).__name__}"
        )
    if limit:
        rows = rows[: int(limit)]
    anchors: list[str] = []
    positives: list[str] = []
    ids: list[str] = []
    skipped = {"missing_image": 0, "image_not_found": 0, "missing_caption": 0, "empty_caption": 0}
    for i, row in enumerate(rows):
        bad: tuple[str, str] | None = None
        image = caption = None
        if not isinstance(row, dict):
            bad = ("malformed", f"is a {type(row).__name__}, not an object")
        else:
            rel = row.get("image")
            if not isinstance(rel, str) or not rel.strip():
                bad = ("missing_image", "key 'image' is missing or empty (a text-only row?)")
            else:
                try:
                    image = safe_join(root, rel, where=f"{path}: row {i}, key 'image'")
                except UnsafePathError as e:
                    raise UnsafePathError(f"{e}; fix or remove that row") from None
                if check_files and not image.is_file():
                    bad = ("image_not_found", f"key 'image': file {image} not found")
            if bad is None:
                caption, problem = _first_gpt_turn(row.get("conversations"))
                if problem is not None:
                    bad = ("missing_caption", problem)
                elif not caption.strip():
                    bad = ("empty_caption", "key 'conversations': the 'gpt' caption is empty")
                elif max_chars is not None and len(caption) > max_chars:
                    bad = ("too_long", f"key 'conversations': the caption has {len(caption)} characters "
                                       f"(max_chars={max_chars})")
        if bad is not None:
            if on_bad_row == "error":
                rid = row.get("id") if isinstance(row, dict) else None
                ident = f" (id {rid!r})" if rid is not None else ""
                raise DataError(
                    f"{path}: row {i}{ident}: {bad[1]} (set data.loader.on_bad_row=skip to skip such rows, "
                    "or fix the row)"
                )
            skipped[bad[0]] = skipped.get(bad[0], 0) + 1
            continue
        assert image is not None and caption is not None
        anchors.append(str(image))
        positives.append(caption.strip())
        ids.append(str(row.get("id", i)))
    n_skipped = sum(skipped.values())
    if n_skipped:
        log.warning("%s: skipped %d bad row(s) (%s)", path, n_skipped, skipped)
    if not anchors:
        raise DataError(f"{path}: no usable rows (skipped: {skipped})")
    return ImageCaptionPairs(anchors, positives, str(path), str(root), ids, skipped)


# ---------------------------------------------------------------------- the mini world in this format
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
    from e5v.data.mini_world import training_scenes

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
    from e5v.data.atomic import build_dir_once, write_generated

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
