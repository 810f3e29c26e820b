"""e5v-mine: hard negatives for stage-2 contrastive rows, mined with a (trained) model (Hydra app over
``configs/mine.yaml``; the library function is :func:`mine`, the selection a pure function on search results,
:func:`select_negatives`).

  e5v-mine data=<rows config> checkpoint=outputs/train/run          # the newest step of a training run
  e5v-mine data=<rows config> backbone=tiny embedder.dtype=float32   # CPU, the tiny model
  e5v-mine data=<rows config> pool=data/pool.jsonl k=8 max_score_ratio=0.9 min_rank=2
  torchrun --nproc_per_node 2 -m eval.mining data=<rows config>     # encoding shared by 2 processes

For every dataset of the data (``data.loader``: ContrastiveRows or a Mixture of them) the queries are searched
(FAISS, inner product on L2-normalised embeddings) against a candidate pool: the dataset's unique positive items
(``pool=positives``) or a JSONL of items. Dropped: a candidate equal to one of the row's positives (text, image,
instruction), and one scoring above ``max_score_ratio`` x the row's best positive cosine (a likely false
negative); then the first ``min_rank`` survivors are skipped and the top ``k`` kept (score order, ties: lower pool
index first). A row left with fewer than ``k`` keeps what it has and is counted (``short_rows``).

Writes ``<out_dir>/<dataset>.jsonl`` (one line per row, row order: id, negatives as items with image paths
relative to the dataset's image root, scores, positive_score) and ``<out_dir>/provenance.json`` (model,
prompt, data hashes, pool, params, counts per dataset). Each file is written atomically; a rerun with the same
model, prompt, data, pool and params skips the datasets already mined, one with anything else refuses unless
``overwrite=true``. Items are embedded through eval's embedding cache (shared with e5v-eval); several
processes (torchrun) take whole chunks of items, so the files are byte-identical on 1 or N processes.
A mistake you can fix is reported in one line, "e5v-mine: error: ..." (HYDRA_FULL_ERROR=1 shows the traceback).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from e5v.data.contrastive import ContrastiveRows, Item
from e5v.errors import ConfigError, DataError, MissingDataError

PROG = "e5v-mine"
PROVENANCE = "provenance.json"
IDENTITY_KEYS = ("checkpoint", "backbone", "prompt", "data", "pool", "params", "index")  # what a rerun must match
ITEM_KEYS = ("text", "image", "instruction")

log = logging.getLogger("eval.mining")

__all__ = ["MineParams", "Selection", "datasets_of", "embed_items", "load_pool", "main", "mine", "rows_identity",
           "select_negatives"]


# ---------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class MineParams:
    """``k`` negatives per row out of ``search_k`` retrieved (None: ``k * 4 + P``, P the most positives of a
    row); ``max_score_ratio`` (None: off) and ``min_rank`` as in the module doc."""

    k: int = 4
    search_k: int | None = None
    max_score_ratio: float | None = 0.95
    min_rank: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"k must be an integer >= 1, got {self.k!r}")
        if self.search_k is not None and (not isinstance(self.search_k, int) or self.search_k < 1):
            raise ConfigError(f"search_k must be null (k * 4 + P) or an integer >= 1, got {self.search_k!r}")
        if self.max_score_ratio is not None and not (isinstance(self.max_score_ratio, (int, float))
                                                     and 0 < float(self.max_score_ratio)):
            raise ConfigError(f"max_score_ratio must be null (off) or a number > 0, got {self.max_score_ratio!r}")
        if not isinstance(self.min_rank, int) or self.min_rank < 0:
            raise ConfigError(f"min_rank must be an integer >= 0, got {self.min_rank!r}")

    @classmethod
    def from_config(cls, cfg: Any) -> MineParams:
        ratio = cfg.get("max_score_ratio", 0.95)
        return cls(k=cfg.get("k", 4), search_k=cfg.get("search_k"),
                   max_score_ratio=None if ratio is None else float(ratio), min_rank=cfg.get("min_rank", 0))

    def resolved_search_k(self, max_positives: int) -> int:
        return int(self.search_k) if self.search_k is not None else self.k * 4 + int(max_positives)

    def record(self) -> dict[str, Any]:
        """The params as recorded in provenance.json (``search_k`` as asked: null means k * 4 + P per dataset)."""
        return {"k": self.k, "search_k": self.search_k, "max_score_ratio": self.max_score_ratio,
                "min_rank": self.min_rank}


# ---------------------------------------------------------------------------------------------- selection
@dataclass
class Selection:
    """The negatives of every row: pool indices and scores (score order), the counts of what was dropped."""

    ids: list[list[int]]
    scores: list[list[float]]
    short_rows: int = 0
    dropped_equal: int = 0
    dropped_ratio: int = 0
    skipped_rank: int = 0
    counts: dict[str, int] = field(default_factory=dict)


def select_negatives(
    scores: np.ndarray,
    ids: np.ndarray,
    positive_scores: np.ndarray,
    positive_ids: Sequence[set[int]],
    params: MineParams,
    progress: Callable[[Any], Any] | None = None,
) -> Selection:
    """Pick each row's negatives from its search results.

    ``scores``/``ids``: (n, search_k) in rank order (score desc, pool index asc; ``-1``: empty slot);
    ``positive_scores``: (n,) the best positive's cosine per row; ``positive_ids[i]``: the pool indices equal to
    row i's positives. Every retrieved candidate of a row is examined: equal to a positive -> ``dropped_equal``;
    above ``max_score_ratio * positive_score`` -> ``dropped_ratio``; of the rest the first ``min_rank`` are
    skipped and the next ``k`` kept."""
    n = scores.shape[0]
    if ids.shape != scores.shape or positive_scores.shape != (n,) or len(positive_ids) != n:
        raise ValueError(f"shapes: scores {scores.shape}, ids {ids.shape}, positive_scores {positive_scores.shape}, "
                         f"{len(positive_ids)} positive sets")
    out = Selection(ids=[], scores=[])
    rows = progress(range(n)) if progress is not None else range(n)
    for i in rows:
        limit = None if params.max_score_ratio is None else float(params.max_score_ratio) * float(positive_scores[i])
        kept_ids: list[int] = []
        kept_scores: list[float] = []
        survivors = 0
        for s, j in zip(scores[i].tolist(), ids[i].tolist()):
            if j < 0:
                continue
            if j in positive_ids[i]:
                out.dropped_equal += 1
                continue
            if limit is not None and s > limit:
                out.dropped_ratio += 1
                continue
            survivors += 1
            if survivors <= params.min_rank:
                out.skipped_rank += 1
                continue
            if len(kept_ids) < params.k:
                kept_ids.append(int(j))
                kept_scores.append(float(s))
        out.ids.append(kept_ids)
        out.scores.append(kept_scores)
        out.short_rows += len(kept_ids) < params.k
    out.counts = {"rows": n, "short_rows": out.short_rows, "dropped_equal": out.dropped_equal,
                  "dropped_ratio": out.dropped_ratio, "skipped_rank": out.skipped_rank}
    return out


# ---------------------------------------------------------------------------------------------- data
def datasets_of(data: Any) -> list[ContrastiveRows]:
    """The datasets of what ``data.loader`` returned: ContrastiveRows, a Mixture's ``.datasets``, or NLI triplets /
    image-caption pairs as the trainer sees them (:func:`e5v.data.contrastive.as_rows`: the same names and ids);
    names unique."""
    from e5v.data.contrastive import as_rows

    if not isinstance(data, ContrastiveRows) and not hasattr(data, "datasets"):
        data = as_rows(data)  # a ConfigError for anything else
    if isinstance(data, ContrastiveRows):
        found = [data]
    elif hasattr(data, "datasets"):
        found = list(data.datasets)
    else:
        raise ConfigError(f"data.loader returned {type(data).__name__}; e5v-mine needs ContrastiveRows or a Mixture "
                          "of them (e5v.data.contrastive): choose a data config whose loader builds those")
    bad = [type(d).__name__ for d in found if not isinstance(d, ContrastiveRows)]
    if bad or not found:
        raise ConfigError(f"data.loader's mixture holds {bad or 'no datasets'}; e5v-mine needs ContrastiveRows")
    names = [d.name for d in found]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"datasets {dup} appear twice in the mixture; mined files are named by dataset: rename one")
    for d in found:
        if len(d.ids) != len(d):
            raise DataError(f"dataset '{d.name}' ({d.source}): {len(d.ids)} row ids for {len(d)} rows; mined "
                            "negatives are joined on ContrastiveRows.ids: its loader must set one id per row")
        if not d.name or "/" in d.name or d.name.startswith("."):
            raise DataError(f"dataset name {d.name!r} ({d.source}) cannot name a file <name>.jsonl; rename it")
    return found


def rows_identity(rows: ContrastiveRows) -> dict[str, Any]:
    """``{"source", "rows", "sha256"}``: the hash over :meth:`ContrastiveRows.identity_payload` (items as read,
    images relative to the image root)."""
    blob = json.dumps(rows.identity_payload(), ensure_ascii=False, sort_keys=True)
    return {"source": str(rows.source), "rows": len(rows), "sha256": hashlib.sha256(blob.encode("utf-8")).hexdigest()}


def relative_image(path: str | None, root: str | None, where: str) -> str | None:
    """``path`` relative to the image root (as written to the mined file); an image outside it is an error."""
    if path is None:
        return None
    if not root:
        raise DataError(f"{where}: image {path!r} but the dataset has no image_root to write it relative to")
    prefix = str(root).rstrip("/") + "/"
    if str(path).startswith(prefix):
        return str(path)[len(prefix):]
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(root))
    if rel.startswith(".."):
        raise DataError(f"{where}: image {path!r} lies outside the dataset's image root {root}")
    return rel


def item_key(item: Item, root: str | None, where: str) -> tuple[str, str | None, str]:
    """What makes two items equal: text, image relative to the image root, instruction."""
    return item.text, relative_image(item.image, root, where), item.instruction


def load_pool(path: str | os.PathLike, image_root: str | None) -> list[Item]:
    """Candidate items from a JSONL file, one ``{"text", "image", "instruction"}`` object per line (``image``:
    relative to ``image_root``, or null; ``text``/``instruction`` default to ""). Errors name the line and key."""
    from e5v.data.paths import safe_join

    p = Path(path)
    if not p.is_file():
        raise MissingDataError(f"pool={p}: no such file; give a JSONL of items or pool=positives")
    items: list[Item] = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p} line {n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not JSON ({e.msg}); one object per line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: a {type(obj).__name__}, expected an object with keys {list(ITEM_KEYS)}")
            unknown = sorted(set(obj) - set(ITEM_KEYS))
            if unknown:
                raise DataError(f"{where}: unknown key(s) {unknown}; an item has {list(ITEM_KEYS)}")
            text, image, instr = obj.get("text") or "", obj.get("image"), obj.get("instruction") or ""
            for key, val in (("text", text), ("instruction", instr)):
                if not isinstance(val, str):
                    raise DataError(f"{where}: key '{key}' must be a string, got {type(val).__name__}")
            if image is not None:
                if not isinstance(image, str):
                    raise DataError(f"{where}: key 'image' must be a path string or null, got {type(image).__name__}")
                if not image_root:
                    raise DataError(f"{where}: key 'image' set but the dataset has no image_root to resolve it in")
                resolved = safe_join(image_root, image, where)
                if not resolved.is_file():
                    raise MissingDataError(f"{where}: key 'image': {resolved} not found (relative to {image_root})")
                image = str(resolved)
            if not text and image is None:
                raise DataError(f"{where}: an item needs a 'text' or an 'image'")
            items.append(Item(text=text, image=image, instruction=instr))
    if not items:
        raise DataError(f"pool={p}: no items")
    return items


# ---------------------------------------------------------------------------------------------- embedding
def embed_items(items: Sequence[Item], encoder: Any, templates: dict[str, str], keep_instruction: bool,
                separator: str = " ", where: str = "") -> np.ndarray:
    """(n, d) L2-normalised embeddings of ``items`` through the cached encoder, each rendered by its kind with
    ``templates[kind]``: text -> ``encoder.text``, image -> ``encoder.image``, image + text ->
    ``encoder.interleaved``. One request per kind (a collective under torchrun: every rank calls it alike)."""
    from eval.encode import ImageRef

    kinds: list[str] = []
    texts: list[str] = []
    groups: dict[str, list[int]] = {"text": [], "image": [], "pair": []}
    for i, it in enumerate(items):
        kind = it.kind(keep_instruction)
        text = it.text_with(keep_instruction, separator)
        if kind == "text" and not text:
            raise DataError(f"{where}: an item has neither text nor image")
        kinds.append(kind)
        texts.append(text)
        groups[kind].append(i)
    out: np.ndarray | None = None
    for kind, members in groups.items():
        if not members:
            continue
        template = templates.get(kind)
        if template is None:
            raise ConfigError(f"{where}: {len(members)} {kind} item(s) but the dataset's templates {templates} have "
                              f"no '{kind}' entry; its loader must name the prompt body for {kind} items")
        if kind == "text":
            vecs = encoder.text([texts[i] for i in members], template=template)
        elif kind == "image":
            vecs = encoder.image([ImageRef(path=Path(str(items[i].image)), label=str(items[i].image))
                                  for i in members], template=template)
        else:
            vecs = encoder.interleaved([(ImageRef(path=Path(str(items[i].image)), label=str(items[i].image)),
                                         texts[i]) for i in members], template=template)
        vecs = np.asarray(vecs, dtype=np.float32)
        if out is None:
            out = np.zeros((len(items), vecs.shape[1]), np.float32)
        out[members] = vecs
    return out if out is not None else np.zeros((0, 0), np.float32)


def instruction_settings(prompt: Any) -> tuple[bool, str]:
    """(keep_instruction, separator) from the prompt's ``mmeb:`` node (keep when it has none)."""
    extra = getattr(prompt, "extra", None) or {}
    node = extra.get("mmeb") if hasattr(extra, "get") else None
    node = dict(node) if node else {}
    mode = node.get("instruction", "keep")
    if mode not in ("keep", "drop"):
        raise ConfigError(f"prompt '{getattr(prompt, 'name', '?')}': mmeb.instruction must be keep or drop, got {mode!r}")
    return mode == "keep", str(node.get("separator", " "))


# ---------------------------------------------------------------------------------------------- one dataset
@dataclass
class Mined:
    lines: list[str]
    counts: dict[str, int]
    search_k: int


def mine_dataset(rows: ContrastiveRows, pool: list[Item] | None, encoder: Any, index_spec: Any, params: MineParams,
                 keep_instruction: bool, separator: str, progress: bool = False) -> Mined | None:
    """Embed (every rank) and search (rank 0) one dataset; rank 0 gets the file's lines, the others None."""
    from e5v import distributed as dist
    from eval.index import rank

    root = rows.image_root
    # unique positives (first-seen order): the default pool, and each row's best-positive score
    pos_keys: dict[tuple[str, str | None, str], int] = {}
    positives: list[Item] = []
    row_pos: list[list[int]] = []
    for r, ps in enumerate(rows.positives):
        if not ps:
            raise DataError(f"dataset '{rows.name}' ({rows.source}) row {rows.ids[r]}: no positive")
        idx = []
        for p in ps:
            key = item_key(p, root, f"dataset '{rows.name}' row {rows.ids[r]}")
            if key not in pos_keys:
                pos_keys[key] = len(positives)
                positives.append(p)
            idx.append(pos_keys[key])
        row_pos.append(idx)
    if pool is None:
        pool_items, pool_keys = positives, dict(pos_keys)
    else:
        pool_items, pool_keys = [], {}
        for j, it in enumerate(pool):
            key = item_key(it, root, f"pool item {j}")
            if key not in pool_keys:  # a repeated item is one candidate
                pool_keys[key] = len(pool_items)
                pool_items.append(it)
        if len(pool_items) < len(pool):
            log.info("%s: pool has %d repeated item(s), each searched once", rows.name, len(pool) - len(pool_items))
    everything = list(rows.queries) + positives + (pool_items if pool is not None else [])
    vecs = embed_items(everything, encoder, rows.templates, keep_instruction, separator,
                       where=f"dataset '{rows.name}' ({rows.source})")
    if not dist.is_main():
        return None
    n, n_pos = len(rows), len(positives)
    q_vecs, p_vecs = vecs[:n], vecs[n:n + n_pos]
    pool_vecs = p_vecs if pool is None else vecs[n + n_pos:]
    positive_scores = np.array([float(np.max(p_vecs[idx] @ q_vecs[i])) for i, idx in enumerate(row_pos)],
                               dtype=np.float32)
    pos_key_list = list(pos_keys)  # positive index -> its key (insertion order)
    positive_ids = [{pool_keys[pos_key_list[j]] for j in idx if pos_key_list[j] in pool_keys} for idx in row_pos]
    search_k = min(params.resolved_search_k(max(len(ps) for ps in rows.positives)), len(pool_items))
    res = rank(q_vecs, pool_vecs, search_k, index_spec)
    bar = None
    if progress and not os.environ.get("E5V_NO_PROGRESS"):
        from e5v import console

        def bar(it: Any) -> Any:
            return console.progress(it, desc=f"mine {rows.name}", unit="row", total=n)

    sel = select_negatives(res.scores, res.ids, positive_scores, positive_ids, params, progress=bar)
    lines = []
    for i in range(n):
        negs = []
        for j in sel.ids[i]:
            it = pool_items[j]
            negs.append({"text": it.text, "image": relative_image(it.image, root, f"pool item {j}"),
                         "instruction": it.instruction})
        lines.append(json.dumps({"id": rows.ids[i], "negatives": negs,
                                 "scores": [round(s, 6) for s in sel.scores[i]],
                                 "positive_score": round(float(positive_scores[i]), 6)}, ensure_ascii=False))
    return Mined(lines=lines, counts=sel.counts, search_k=search_k)


# ---------------------------------------------------------------------------------------------- run folder
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _resume_plan(out: Path, identity: dict[str, Any], names: list[str], overwrite: bool) -> dict[str, Any]:
    """Which datasets are already mined (their files unchanged), or a refusal: ``{"done": {...}}`` /
    ``{"error": "..."}``; ``stale``: files of an overwritten run to remove."""
    prov_file = out / PROVENANCE
    if not prov_file.is_file():
        found = sorted(p.name for p in out.glob("*.jsonl")) if out.is_dir() else []
        if found and not overwrite:
            return {"error": f"{out} holds {found[:3]} but no {PROVENANCE}: not a mining run folder; choose another "
                             "out_dir (run_name=...) or set overwrite=true"}
        return {"done": {}, "stale": []}
    try:
        old = json.loads(prov_file.read_text())
    except (OSError, ValueError) as e:
        if not overwrite:
            return {"error": f"{prov_file}: unreadable ({e}); set overwrite=true to mine again"}
        return {"done": {}, "stale": []}
    changed = [k for k in IDENTITY_KEYS if old.get(k) != identity.get(k)]
    if changed:
        if not overwrite:
            return {"error": f"{out} holds negatives mined with other {' / '.join(changed)} (see {prov_file}); "
                             "choose another out_dir (run_name=...) or set overwrite=true to replace them"}
        stale = [n for n in (old.get("per_dataset") or {}) if n not in names]
        return {"done": {}, "stale": stale}
    done: dict[str, Any] = {}
    for name, entry in (old.get("per_dataset") or {}).items():
        f = out / f"{name}.jsonl"
        if name in names and f.is_file() and entry.get("sha256") == _sha256_file(f):
            done[name] = entry
        elif name in names:
            log.warning("%s: missing or changed since it was mined; mining it again", f)
    return {"done": done, "stale": []}


def _write_provenance(out: Path, identity: dict[str, Any], per_dataset: dict[str, Any], extra: dict[str, Any]) -> None:
    from e5v.data.atomic import atomic_write_text
    from e5v.provenance import git_info

    record = {**identity, "per_dataset": per_dataset, **extra, "git": git_info(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(out / PROVENANCE, json.dumps(record, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------- the run
def mine(cfg: Any, out_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """Mine every dataset of ``cfg.data.loader`` into ``out_dir`` (default ``cfg.out_dir``); rank 0 returns the
    provenance record, other ranks None. Checks the config, the data and the pool before any weights load."""
    from omegaconf import OmegaConf

    from e5v import distributed as dist
    from e5v.config import instantiate
    from e5v.prompts import PromptSet
    from e5v.provenance import require_values
    from eval.cache import EmbeddingCache
    from eval.encode import Encoder, FileHasher
    from eval.index import IndexSpec
    from eval.model import ModelHandle
    from eval.runner import backbone_label, checkpoint_info

    require_values(cfg)
    params = MineParams.from_config(cfg)
    out = Path(str(out_dir if out_dir is not None else cfg.out_dir))
    loader = cfg.get("data", {}).get("loader") if cfg.get("data") else None
    if loader is None:
        raise ConfigError("no data.loader: choose data=<config> whose loader returns ContrastiveRows or a Mixture")
    datasets = datasets_of(instantiate(loader))
    pool_arg = str(cfg.get("pool") or "positives")
    pool_file = None if pool_arg == "positives" else Path(pool_arg)
    pools = {d.name: (load_pool(pool_file, d.image_root) if pool_file is not None else None) for d in datasets}
    index_spec = IndexSpec.from_config(cfg.get("index"))
    cache_root = Path(str(cfg.cache.dir))
    model = ModelHandle(cfg, memo_dir=cache_root if cfg.cache.enabled else None)  # adopts a checkpoint's prompt
    if dist.world_size() > 1:
        model.prebuild()
    distributed = dist.join_launched_group(str(cfg.embedder.device))
    try:
        prompt = PromptSet.from_config(cfg.prompt)
        keep, sep = instruction_settings(prompt)
        cache = EmbeddingCache(cache_root, enabled=bool(cfg.cache.enabled))
        hasher = FileHasher(cache_root / "file_hashes.json" if cfg.cache.enabled else None)
        encoder = Encoder(model, prompt, cache, shard_size=int(cfg.cache.shard_size), hasher=hasher,
                          progress=bool(cfg.get("progress", True)), whole_chunks=True)
        identity = {
            "checkpoint": {**checkpoint_info(cfg, model), "model_fingerprint": model.fingerprint},
            "backbone": backbone_label(model),
            "prompt": OmegaConf.to_container(cfg.prompt, resolve=True),
            "data": {d.name: rows_identity(d) for d in datasets},
            "pool": "positives" if pool_file is None else {"path": str(pool_file), "sha256": _sha256_file(pool_file)},
            "params": params.record(),
            "index": index_spec.describe(),
        }
        names = [d.name for d in datasets]
        plan = _resume_plan(out, identity, names, bool(cfg.get("overwrite", False))) if dist.is_main() else None
        plan = dist.broadcast_object(plan)
        if "error" in plan:
            raise ConfigError(plan["error"])
        per_dataset: dict[str, Any] = dict(plan["done"])
        extra = {"runtime": encoder.runtime}
        todo = [d.name for d in datasets if d.name not in per_dataset]
        if dist.is_main() and (todo or plan["stale"] or not (out / PROVENANCE).is_file()):  # a full skip writes nothing
            out.mkdir(parents=True, exist_ok=True)
            for name in plan["stale"]:
                (out / f"{name}.jsonl").unlink(missing_ok=True)
            _write_provenance(out, identity, per_dataset, extra)
        for d in datasets:
            if d.name in per_dataset:
                log.info("%s: already mined (%s), skipped", d.name, out / f"{d.name}.jsonl")
                continue
            t0 = time.perf_counter()
            res = mine_dataset(d, pools[d.name], encoder, index_spec, params, keep, sep,
                               progress=bool(cfg.get("progress", True)))
            hasher.save()
            if res is None:
                continue
            from e5v.data.atomic import atomic_write_text

            f = out / f"{d.name}.jsonl"
            atomic_write_text(f, "".join(line + "\n" for line in res.lines))
            per_dataset[d.name] = {**res.counts, "search_k": res.search_k, "file": f.name, "sha256": _sha256_file(f),
                                   "seconds": round(time.perf_counter() - t0, 3)}
            _write_provenance(out, identity, per_dataset, extra)
            c = res.counts
            log.info("%s: %d rows, %d short of k=%d, dropped %d equal to a positive, %d above the score ratio -> %s",
                     d.name, c["rows"], c["short_rows"], params.k, c["dropped_equal"], c["dropped_ratio"], f)
        if not dist.is_main():
            return None
        return json.loads((out / PROVENANCE).read_text())
    finally:
        if distributed:
            dist.shutdown()


# ---------------------------------------------------------------------------------------------- CLI
def _hydra_app() -> Callable[[], None]:
    import hydra

    from e5v.config import config_dir

    @hydra.main(config_path=str(config_dir()), config_name="mine", version_base="1.3")
    def _app(cfg: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        from e5v import console
        from e5v.cli.errors import cli_errors
        from e5v.distributed import rank
        from e5v.provenance import scrub_hydra_outputs

        with cli_errors(PROG):
            scrub_hydra_outputs(HydraConfig.get())
            out_dir = str(cfg.out_dir)
            console.setup_run(out_dir, "mine", bool(cfg.get("verbose")), rank())
            try:
                record = mine(cfg, out_dir=out_dir)
            finally:
                console.close()
        if record is not None:
            print(f"\nmined negatives in {out_dir}")
            for name, c in record["per_dataset"].items():
                print(f"  {name}: {c['rows']} rows, {c['short_rows']} short of k={record['params']['k']}, dropped "
                      f"{c['dropped_equal']} equal to a positive, {c['dropped_ratio']} above the score ratio")

    return _app


def main() -> None:
    """Console entry point (``e5v-mine``): one line ``e5v-mine: error: ...`` for a mistake you can fix."""
    from e5v.cli.errors import print_help_preface

    print_help_preface(__doc__)
    _hydra_app()()


if __name__ == "__main__":
    sys.exit(main())
