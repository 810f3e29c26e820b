"""General contrastive rows: a query, one or more positives and optional hard negatives, each any of text,
image or image + text with an optional task instruction. Every training dataset is one of these:

* NLI triplets (E5-V's stage 1): text query, text positive, text hard negative, rendered with the ``train``
  template (``templates = {"text": "train"}``);
* image-caption pairs (the paper's Table 7): image query (``image`` body), caption positive (``train``);
* MMEB-train (``TIGER-Lab/MMEB-train``: ``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path``,
  ``neg_text``, ``neg_image_path``) and JSONL rows: rendered as the MMEB evaluation renders items
  (``mmeb_text`` / ``mmeb_image`` / ``mmeb_pair`` bodies of the prompt's ``mmeb:`` node), so stage 2 trains
  on exactly the prompts it is evaluated with.

``templates`` maps an item's kind (``text``, ``image``, ``pair``) to the prompt body it is rendered with;
``train`` means :meth:`e5v.prompts.PromptSet.render_train` (cut to ``train_max_tokens``, faithful mode).

Loaders (each returns :class:`ContrastiveRows`; bad rows skipped and counted by reason, or one
:class:`~e5v.errors.DataError` naming file, row and column; image paths resolved inside their root with
:func:`e5v.data.paths.safe_join`, an escape always raising :class:`~e5v.data.paths.UnsafePathError`):

* :func:`load_mmeb_train`: the real ``TIGER-Lab/MMEB-train`` layout (below);
* :func:`load_jsonl_rows`: one JSON object a line (``query`` / ``positives`` / ``negatives`` items);
* :func:`as_rows`: NLI triplets and image-caption pairs as rows; :func:`attach_mined`: mined hard negatives
  (``<folder>/<dataset name>.jsonl`` + ``provenance.json``, written by ``e5v-mine``).

MMEB-train, as released (facts, with sources):

* One folder per subset, 20 subsets: ImageNet_1K, N24News, HatefulMemes, VOC2007, SUN397, OK-VQA, A-OKVQA,
  DocVQA, InfographicsVQA, ChartQA, Visual7W, VisDial, CIRR, VisualNews_t2i, VisualNews_i2t, MSCOCO_t2i,
  MSCOCO_i2t, NIGHTS, WebQA, MSCOCO (VLM2Vec ``experiments/public/train/train_image.yaml``: ``dataset_name:
  TIGER-Lab/MMEB-train``, ``subset_name``, ``dataset_split: original``). Note ``ImageNet_1K`` (underscore; the
  eval task is ``ImageNet-1K``).
* Each subset folder holds ``original-00000-of-00001.parquet`` (the paper's instructions),
  ``diverse_instruction-00000-of-00001.parquet`` (paraphrased instructions, added 2025-01) and the older
  ``train-00000-of-00001.parquet`` (the hub's file tree, e.g. huggingface.co/datasets/TIGER-Lab/MMEB-train/tree/main/
  ChartQA; VLM2Vec README "[2025-01] ... two splits: original and diverse_instruction"). ``split=`` picks one.
* Columns, all strings: ``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path``, ``neg_text``,
  ``neg_image_path`` (VLM2Vec ``src/data/dataset/mmeb_dataset.py`` ``data_prepare_v4`` / ``TrainTextImageDataset``).
  An absent image is ``""`` (``if not qry_image_path``); an absent negative is an empty ``neg_text`` and
  ``neg_image_path`` (``if neg_text: ... else: []``), and the neg_* columns may be missing altogether
  (``batch_dict.get('neg_text', [''] * batch_size)``). A row whose query (or positive) has neither text nor
  image is dropped there (``continue``): here a counted bad row.
* Texts carry Phi-3-V's image placeholder ``<|image_1|>`` where the image goes (VLM2Vec replaces
  ``VLM_IMAGE_TOKENS[PHI3V]`` by the backbone's token) and the task instruction inside the text, as MMEB-eval V1.
* Images: ``os.path.join(image_dir, img_path)`` with ``image_dir`` the folder the repository's image zips unpack
  to (``python unzip_file.py`` in the clone, VLM2Vec ``experiments/public/data/download_data.sh``; its train
  configs use ``image_dir: vlm2vec_train/MMEB-train/image``).

Run: library only (``data=mmeb_train`` / ``data=mini_mmeb_train`` configs instantiate it).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from e5v.data.paths import UnsafePathError, safe_join
from e5v.errors import ConfigError, DataError, MissingDataError

log = logging.getLogger(__name__)

ITEM_KINDS = ("text", "image", "pair")
MMEB_TEMPLATES = {"text": "mmeb_text", "image": "mmeb_image", "pair": "mmeb_pair"}
NLI_TEMPLATES = {"text": "train"}
PAIR_TEMPLATES = {"text": "train", "image": "image"}


@dataclass(frozen=True)
class Item:
    """One thing to embed: a text (may be ``""`` when there is an image), an image path (resolved inside the
    data root) or None, and a task instruction (``""``: none; how it joins the text is the prompt's
    ``mmeb.instruction``: ``keep`` or ``drop``)."""

    text: str = ""
    image: str | None = None
    instruction: str = ""

    def kind(self, keep_instruction: bool = True) -> str:
        """``text``, ``image`` (an image and no text once the instruction is kept or dropped) or ``pair``."""
        if self.image is None:
            return "text"
        return "pair" if self.text_with(keep_instruction) else "image"

    def text_with(self, keep_instruction: bool, separator: str = " ") -> str:
        """The text this item contributes to its prompt: instruction and text joined, or the text alone."""
        if not keep_instruction or not self.instruction:
            return self.text
        if not self.text:
            return self.instruction
        return f"{self.instruction}{separator}{self.text}"


@dataclass
class ContrastiveRows:
    """Validated rows of one dataset, column-wise. ``positives[i]`` has >= 1 items, ``negatives[i]`` >= 0.
    ``ids[i]``: the row's stable id (``<name>:<row in the source>``): mined negatives are joined on it."""

    name: str
    queries: list[Item]
    positives: list[list[Item]]
    negatives: list[list[Item]]
    source: str
    templates: dict[str, str] = field(default_factory=lambda: dict(MMEB_TEMPLATES))
    image_root: str | None = None
    ids: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def anchor_kind(self) -> str:
        """``image`` when every query is an image alone (image-caption pairs), else ``text`` (logged)."""
        return "image" if self.queries and all(q.image is not None and not q.text for q in self.queries) else "text"

    def identity_payload(self) -> dict[str, Any]:
        """What :func:`e5v.train.run_identity.data_identity` hashes: every item as read, image paths relative
        to the image root (the data may move)."""
        root = (self.image_root or "").rstrip("/") + "/" if self.image_root else None

        def item(it: Item) -> list[Any]:
            img = it.image
            if img is not None and root and img.startswith(root):
                img = img[len(root):]
            return [it.text, img, it.instruction]

        return {"name": self.name, "templates": self.templates, "queries": [item(q) for q in self.queries],
                "positives": [[item(p) for p in ps] for ps in self.positives],
                "negatives": [[item(n) for n in ns] for ns in self.negatives]}


# ---------------------------------------------------------------------- MMEB's image placeholder
PLACEHOLDER = re.compile(r"<\|image_\d+\|>")  # Phi-3-V's token, as MMEB's texts (train and eval) write it


def strip_placeholder(text: str) -> tuple[str, bool]:
    """``text`` without MMEB's ``<|image_N|>`` placeholder (and the whitespace right after it); whether it
    had one. Other whitespace is kept as stored."""
    found = bool(PLACEHOLDER.search(text))
    if not found:
        return text, False
    out = PLACEHOLDER.sub("\x00", text)
    out = re.sub(r"\x00[ \t]*\n?", "", out)
    return out, True  # the rest as stored: VLM2Vec's V1 evaluation keeps the trailing newline (its pooled token)


# ---------------------------------------------------------------------- common checks
ON_BAD_ROW = ("skip", "error")
MAX_CHARS = 4096


class _Bad(Exception):
    """A bad row: ``reason`` (the skip counter's key) and a message naming the column."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _check_policy(on_bad_row: str) -> None:
    if on_bad_row not in ON_BAD_ROW:
        raise ConfigError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")


def _image(root: Path | None, rel: str, where: str, check_files: bool) -> str:
    """``rel`` resolved inside ``root`` (an escape raises :class:`UnsafePathError` whatever the policy)."""
    if root is None:
        raise DataError(f"{where}: names image {rel!r} but no image root is set; set data.loader.image_root")
    path = safe_join(root, rel, where=where)
    if check_files and not path.is_file():
        raise _Bad("image_not_found", f"{where}: image {rel!r} not found under {root}")
    return str(path)


def _too_long(text: str, max_chars: int | None, where: str) -> None:
    if max_chars is not None and len(text) > max_chars:
        raise _Bad("too_long", f"{where} has {len(text)} characters (max_chars={max_chars})")


def _finish(rows: ContrastiveRows, skipped: dict[str, int], source: str) -> ContrastiveRows:
    n = sum(skipped.values())
    if n:
        log.warning("%s: skipped %d bad row(s) (%s)", source, n, skipped)
    if not len(rows):
        raise DataError(f"{source}: no usable rows (skipped: {skipped})")
    return rows


# ---------------------------------------------------------------------- MMEB-train (real layout)
MMEB_TRAIN_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")
MMEB_TRAIN_REQUIRED = MMEB_TRAIN_COLUMNS[:4]
MMEB_TRAIN_SPLITS = ("original", "diverse_instruction", "train")
MMEB_TRAIN_HUB = "TIGER-Lab/MMEB-train"
MMEB_TRAIN_DOWNLOAD = ("git clone https://huggingface.co/datasets/TIGER-Lab/MMEB-train <paths.data_dir>/mmeb_train "
                       "&& (cd <paths.data_dir>/mmeb_train && python unzip_file.py)")
_SHARD = re.compile(r"^(?P<split>.+)-\d{5}-of-\d{5}$")


def mmeb_train_files(path: str | os.PathLike, split: str = "original") -> tuple[list[Path], str]:
    """The parquet file(s) of one MMEB-train subset and its default name: ``path`` is one parquet file
    (name: its folder when the file is a hub shard ``<split>-00000-of-00001.parquet``, else its stem) or a
    subset folder (``<folder>/<split>-*.parquet``, sorted; name: the folder)."""
    p = Path(path)
    if p.is_file():
        m = _SHARD.match(p.stem)
        return [p], (p.parent.name if m else p.stem)
    if p.is_dir():
        files = sorted(p.glob(f"{split}-*.parquet"))
        if not files:
            have = sorted(f.name for f in p.glob("*.parquet"))
            raise MissingDataError(
                f"{p}: no {split}-*.parquet (found {have or 'no parquet files'}); MMEB-train subsets hold "
                f"{', '.join(s + '-00000-of-00001.parquet' for s in MMEB_TRAIN_SPLITS[:2])}: set split= to one "
                f"of {list(MMEB_TRAIN_SPLITS)} or re-download: {MMEB_TRAIN_DOWNLOAD}")
        return files, p.name
    raise MissingDataError(f"MMEB-train subset {p} not found; download {MMEB_TRAIN_HUB}: {MMEB_TRAIN_DOWNLOAD} "
                           "(or point the data config's path at a subset folder or one of its parquet files)")


def _read_mmeb_parquet(f: Path) -> dict[str, list[Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(f)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
        raise DataError(f"{f}: not a readable parquet file ({e}); re-download it: {MMEB_TRAIN_DOWNLOAD}") from e
    missing = [c for c in MMEB_TRAIN_REQUIRED if c not in table.column_names]
    if missing:
        raise DataError(f"{f}: missing column(s) {missing} (columns: {table.column_names}); an MMEB-train "
                        f"parquet has {list(MMEB_TRAIN_COLUMNS)} (the neg_* columns optional)")
    return {c: table.column(c).to_pylist() for c in MMEB_TRAIN_COLUMNS if c in table.column_names}


def load_mmeb_train(
    path: str | os.PathLike,
    image_root: str | os.PathLike,
    name: str | None = None,
    limit: int | None = None,
    on_bad_row: str = "skip",
    check_files: bool = True,
    max_chars: int | None = MAX_CHARS,
    split: str = "original",
    mined: str | os.PathLike | None = None,
    mined_k: int | None = None,
    mined_mode: str = "replace",
) -> ContrastiveRows:
    """One ``TIGER-Lab/MMEB-train`` subset (the layout in this module's docstring) as rows.

    ``path``: a subset folder (its ``<split>-*.parquet``) or one parquet file. Texts lose the
    ``<|image_N|>`` placeholder (:func:`strip_placeholder`, as the MMEB-eval V1 loader does) and keep the
    instruction inside (``Item.instruction = ""``); image paths are resolved inside ``image_root``
    (``safe_join``: an escape raises :class:`UnsafePathError` whatever ``on_bad_row`` says), ``""`` or null is
    no image. A negative exists when ``neg_text`` or ``neg_image_path`` is non-empty. Bad rows (query with
    neither text nor image: ``missing_query``; positive with neither: ``empty_positive``; a named image not on
    disk: ``image_not_found``; a text over ``max_chars``: ``too_long``) are skipped and counted by reason, or
    (``on_bad_row="error"``) stop at the first, naming file, row and column. Row ids ``<name>:<row>``, the
    row counted through the subset's files in order. ``limit``: read only the first ``limit`` source rows
    (bad ones included). ``mined``: a mined-negatives folder (:func:`attach_mined`, ``k=mined_k``,
    ``mode=mined_mode``)."""
    _check_policy(on_bad_row)
    files, default_name = mmeb_train_files(path, split)
    name = name or default_name
    root = Path(image_root)
    queries: list[Item] = []
    positives: list[list[Item]] = []
    negatives: list[list[Item]] = []
    ids: list[str] = []
    skipped: dict[str, int] = {}
    row = 0
    for f in files:
        cols = _read_mmeb_parquet(f)
        n = len(cols["qry"])
        for r in range(n):
            if limit is not None and row >= limit:
                break
            try:
                q, p, ng = _mmeb_train_row(cols, r, f, root, check_files, max_chars)
            except _Bad as bad:
                if on_bad_row == "error":
                    raise DataError(f"{bad} (set data.loader.on_bad_row=skip to skip such rows)") from None
                skipped[bad.reason] = skipped.get(bad.reason, 0) + 1
            else:
                queries.append(q)
                positives.append([p])
                negatives.append(ng)
                ids.append(f"{name}:{row}")
            row += 1
    source = str(path)
    rows = _finish(ContrastiveRows(name, queries, positives, negatives, source, dict(MMEB_TEMPLATES), str(root),
                                   ids, skipped), skipped, source)
    if mined is not None:
        rows = attach_mined(rows, mined, k=mined_k, mode=mined_mode, check_files=check_files)
    return rows


def _cell(cols: dict[str, list[Any]], c: str, r: int, f: Path) -> str:
    v = cols[c][r] if c in cols else None
    if v is None:
        return ""
    if not isinstance(v, str):
        raise DataError(f"{f}: row {r}, column {c!r}: a {type(v).__name__}, expected a string")
    return v


def _mmeb_train_row(cols: dict[str, list[Any]], r: int, f: Path, root: Path, check_files: bool,
                    max_chars: int | None) -> tuple[Item, Item, list[Item]]:
    def item(text_col: str, img_col: str) -> Item | None:
        text, img = _cell(cols, text_col, r, f), _cell(cols, img_col, r, f)
        stripped, _ = strip_placeholder(text)
        _too_long(text, max_chars, f"{f}: row {r}, column {text_col!r}")
        if not stripped.strip() and not img:
            return None
        path = _image(root, img, f"{f}: row {r}, column {img_col!r}", check_files) if img else None
        return Item(stripped, path, "")

    q = item("qry", "qry_image_path")
    if q is None:
        raise _Bad("missing_query", f"{f}: row {r}: the query is empty (columns 'qry' and 'qry_image_path')")
    p = item("pos_text", "pos_image_path")
    if p is None:
        raise _Bad("empty_positive", f"{f}: row {r}: the positive is empty (columns 'pos_text' and 'pos_image_path')")
    n = item("neg_text", "neg_image_path")
    return q, p, ([] if n is None else [n])


# ---------------------------------------------------------------------- JSONL rows
JSONL_ROW_KEYS = ("id", "query", "positives", "negatives")
JSONL_ITEM_KEYS = ("text", "image", "instruction")


def _jsonl_item(obj: Any, where: str, root: Path | None, check_files: bool, max_chars: int | None,
                empty_reason: str) -> Item:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: an item must be an object with keys {list(JSONL_ITEM_KEYS)}, got "
                        f"{type(obj).__name__}")
    unknown = sorted(set(obj) - set(JSONL_ITEM_KEYS))
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; an item has only {list(JSONL_ITEM_KEYS)} "
                        "(fix the spelling)")
    vals = {}
    for k in JSONL_ITEM_KEYS:
        v = obj.get(k)
        if v is not None and not isinstance(v, str):
            raise DataError(f"{where}: key {k!r} is a {type(v).__name__}, expected a string or null")
        vals[k] = v or ""
    for k in ("text", "instruction"):
        _too_long(vals[k], max_chars, f"{where}, key {k!r}")
    if not vals["text"].strip() and not vals["image"]:
        raise _Bad(empty_reason, f"{where}: neither 'text' nor 'image'")
    image = _image(root, vals["image"], f"{where}, key 'image'", check_files) if vals["image"] else None
    return Item(vals["text"], image, vals["instruction"])


def load_jsonl_rows(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    name: str | None = None,
    limit: int | None = None,
    on_bad_row: str = "skip",
    check_files: bool = True,
    max_chars: int | None = MAX_CHARS,
    templates: dict[str, str] | None = None,
    mined: str | os.PathLike | None = None,
    mined_k: int | None = None,
    mined_mode: str = "replace",
) -> ContrastiveRows:
    """General rows from a JSONL file, one object a line (blank lines are not rows)::

        {"id": "optional, unique", "query": {"text": ..., "image": ..., "instruction": ...},
         "positives": [item, ...], "negatives": [item, ...]}   # negatives optional; item keys all optional

    ``image`` is relative to ``image_root`` (default: the file's folder). Structural faults stop with a
    :class:`DataError` naming the file, line and key, whatever ``on_bad_row`` says: invalid JSON, unknown
    keys (a typo must not pass), wrong types, no ``query`` / ``positives`` key, a duplicate id. Content
    faults are bad rows (skipped and counted, or an error with ``on_bad_row="error"``): an empty query
    (``missing_query``), ``positives: []`` (``no_positive``), an empty positive / negative item
    (``empty_positive`` / ``empty_negative``), a missing image (``image_not_found``), a text over
    ``max_chars`` (``too_long``). Ids default to ``<name>:<line index>`` (0-based); name: the file stem.
    Rendered with the MMEB bodies unless ``templates`` says otherwise."""
    _check_policy(on_bad_row)
    p = Path(path)
    if not p.is_file():
        raise MissingDataError(f"JSONL rows file {p} not found; point the data config's path at it")
    name = name or p.stem
    root = Path(image_root) if image_root is not None else p.parent
    queries: list[Item] = []
    positives: list[list[Item]] = []
    negatives: list[list[Item]] = []
    ids: list[str] = []
    seen: dict[str, int] = {}
    skipped: dict[str, int] = {}
    n_rows = 0
    with p.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            if limit is not None and n_rows >= limit:
                break
            n_rows += 1
            where = f"{p}: line {i + 1}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise DataError(f"{where}: not valid JSON ({e}); one JSON object per line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: a row must be a JSON object, got {type(obj).__name__}")
            unknown = sorted(set(obj) - set(JSONL_ROW_KEYS))
            if unknown:
                raise DataError(f"{where}: unknown key(s) {unknown}; a row has only {list(JSONL_ROW_KEYS)} "
                                "(fix the spelling)")
            for k in ("query", "positives"):
                if k not in obj:
                    raise DataError(f"{where}: no key {k!r}; a row needs 'query' and 'positives'")
            rid = obj.get("id", f"{name}:{i}")
            if not isinstance(rid, str) or not rid:
                raise DataError(f"{where}: key 'id' must be a non-empty string, got {rid!r}")
            if rid in seen:
                raise DataError(f"{where}: duplicate id {rid!r} (first on line {seen[rid] + 1}); ids must be unique "
                                "(mined negatives are joined on them)")
            seen[rid] = i
            for k in ("positives", "negatives"):
                if k in obj and not isinstance(obj[k], list):
                    raise DataError(f"{where}: key {k!r} must be a list of items, got {type(obj[k]).__name__}")
            try:
                q = _jsonl_item(obj["query"], f"{where}, key 'query'", root, check_files, max_chars, "missing_query")
                if not obj["positives"]:
                    raise _Bad("no_positive", f"{where}: 'positives' is empty; a row needs at least one")
                ps = [_jsonl_item(x, f"{where}, key 'positives'[{j}]", root, check_files, max_chars,
                                  "empty_positive") for j, x in enumerate(obj["positives"])]
                ns = [_jsonl_item(x, f"{where}, key 'negatives'[{j}]", root, check_files, max_chars,
                                  "empty_negative") for j, x in enumerate(obj.get("negatives") or [])]
            except _Bad as bad:
                if on_bad_row == "error":
                    raise DataError(f"{bad} (set data.loader.on_bad_row=skip to skip such rows)") from None
                skipped[bad.reason] = skipped.get(bad.reason, 0) + 1
                continue
            queries.append(q)
            positives.append(ps)
            negatives.append(ns)
            ids.append(rid)
    source = str(p)
    rows = _finish(ContrastiveRows(name, queries, positives, negatives, source,
                                   dict(templates or MMEB_TEMPLATES), str(root), ids, skipped), skipped, source)
    if mined is not None:
        rows = attach_mined(rows, mined, k=mined_k, mode=mined_mode, check_files=check_files)
    return rows


# ---------------------------------------------------------------------- other datasets as rows
def as_rows(data: Any, name: str | None = None) -> Any:
    """Any training dataset as general rows: :class:`e5v.data.nli.Triplets` (text anchors, ``[[positive]]``,
    ``[[negative]]`` or ``[[]]``; ``NLI_TEMPLATES``), :class:`e5v.data.pairs.ImageCaptionPairs` (image
    queries, caption positives, no negatives; ``PAIR_TEMPLATES``, ``image_root`` kept); a
    :class:`ContrastiveRows` or :class:`e5v.data.mixture.Mixture` passes through unchanged. ``source``
    and ``skipped`` are kept; ids are ``<name>:<i>`` (name: ``name`` or the source file's stem)."""
    from e5v.data.mixture import Mixture
    from e5v.data.nli import Triplets
    from e5v.data.pairs import ImageCaptionPairs

    if isinstance(data, (ContrastiveRows, Mixture)):
        return data
    if not isinstance(data, (Triplets, ImageCaptionPairs)):
        raise ConfigError(f"as_rows: cannot turn a {type(data).__name__} into contrastive rows; expected Triplets, "
                          "ImageCaptionPairs, ContrastiveRows or Mixture")
    nm = name or Path(str(data.source).rstrip("/")).stem or "data"
    if isinstance(data, Triplets):
        negs = data.negatives
        return ContrastiveRows(
            nm, [Item(a) for a in data.anchors], [[Item(p)] for p in data.positives],
            [[Item(n)] for n in negs] if negs is not None else [[] for _ in data.anchors], data.source,
            dict(NLI_TEMPLATES), None, [f"{nm}:{i}" for i in range(len(data))], dict(data.skipped))
    return ContrastiveRows(
        nm, [Item(image=a) for a in data.anchors], [[Item(p)] for p in data.positives],
        [[] for _ in data.anchors], data.source, dict(PAIR_TEMPLATES), data.image_root,
        [f"{nm}:{i}" for i in range(len(data))], dict(data.skipped))


# ---------------------------------------------------------------------- mined hard negatives
MINED_PROVENANCE = "provenance.json"
MINED_MODES = ("replace", "append")
_MINED_KEYS = ("id", "negatives", "scores", "positive_score")


def mined_file(folder: str | os.PathLike, name: str) -> Path:
    """``<folder>/<name>.jsonl``, the mined negatives of dataset ``name``."""
    return Path(folder) / f"{name}.jsonl"


def read_mined(folder: str | os.PathLike, name: str) -> dict[str, list[dict[str, Any]]]:
    """Row id -> its mined negatives (as written, best first) from ``<folder>/<name>.jsonl``."""
    folder = Path(folder)
    if not (folder / MINED_PROVENANCE).is_file():
        raise MissingDataError(f"{folder} is not a mined-negatives folder (no {MINED_PROVENANCE}); mine it with "
                               "e5v-mine, or point data.mined at the folder e5v-mine wrote")
    f = mined_file(folder, name)
    if not f.is_file():
        have = sorted(x.stem for x in folder.glob("*.jsonl"))
        raise MissingDataError(f"{f} not found: no mined negatives for dataset {name!r} (mined: {have}); mine this "
                               "dataset with e5v-mine into that folder")
    out: dict[str, list[dict[str, Any]]] = {}
    with f.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            where = f"{f}: line {i + 1}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise DataError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) \
                    or not isinstance(obj.get("negatives"), list):
                raise DataError(f"{where}: expected an object with 'id' (string) and 'negatives' (list); re-mine")
            unknown = sorted(set(obj) - set(_MINED_KEYS))
            if unknown:
                raise DataError(f"{where}: unknown key(s) {unknown}; a mined line has {list(_MINED_KEYS)}")
            if obj["id"] in out:
                raise DataError(f"{where}: duplicate id {obj['id']!r}; re-mine")
            out[obj["id"]] = obj["negatives"]
    return out


def attach_mined(rows: ContrastiveRows, folder: str | os.PathLike, k: int | None = None, mode: str = "replace",
                 check_files: bool = True) -> ContrastiveRows:
    """``rows`` with the hard negatives mined into ``<folder>/<rows.name>.jsonl`` (joined on the row ids):
    the first ``k`` of each row's (all when None); ``mode="replace"`` drops the row's own negatives,
    ``"append"`` keeps them first. A row without a line, or with fewer than ``k`` mined negatives, is a
    :class:`DataError` naming how many and the first such id. Mined images are relative to the rows' image
    root (``safe_join``: an escape raises :class:`UnsafePathError`)."""
    if mode not in MINED_MODES:
        raise ConfigError(f"mined mode must be one of {MINED_MODES}, got {mode!r}")
    if k is not None and (not isinstance(k, int) or k < 1):
        raise ConfigError(f"mined_k must be a positive integer or null (all), got {k!r}")
    mined = read_mined(folder, rows.name)
    f = mined_file(folder, rows.name)
    absent = [rid for rid in rows.ids if rid not in mined]
    if absent:
        raise DataError(f"{f}: {len(absent)} of {len(rows)} row(s) have no mined negatives (first: {absent[0]!r}); "
                        "the file was mined from other data: re-mine this dataset with e5v-mine")
    if k is not None:
        short = [rid for rid in rows.ids if len(mined[rid]) < k]
        if short:
            raise DataError(f"{f}: {len(short)} row(s) have fewer than mined_k={k} mined negatives (first: "
                            f"{short[0]!r} has {len(mined[short[0]])}); re-mine with a larger pool or lower mined_k")
    root = Path(rows.image_root) if rows.image_root else None
    new_negs: list[list[Item]] = []
    for rid, own in zip(rows.ids, rows.negatives):
        got = []
        for j, obj in enumerate(mined[rid][:k] if k is not None else mined[rid]):
            where = f"{f}: id {rid!r}, negatives[{j}]"
            try:
                got.append(_jsonl_item(obj, where, root, check_files, None, "empty_negative"))
            except _Bad as bad:
                raise DataError(f"{bad}; re-mine this dataset") from None
        new_negs.append((list(own) + got) if mode == "append" else got)
    return replace(rows, negatives=new_negs, source=f"{rows.source} + mined {folder}")


__all__ = ["ITEM_KINDS", "MMEB_TEMPLATES", "MMEB_TRAIN_COLUMNS", "NLI_TEMPLATES", "PAIR_TEMPLATES", "PLACEHOLDER",
           "ContrastiveRows", "Item", "UnsafePathError", "as_rows", "attach_mined", "load_jsonl_rows",
           "load_mmeb_train", "mined_file", "mmeb_train_files", "read_mined", "strip_placeholder"]
