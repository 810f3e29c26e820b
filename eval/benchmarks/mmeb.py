"""MMEB: VLM2Vec's Massive Multimodal Embedding Benchmark (docs/evaluation.md, section "MMEB").

* :class:`Mmeb` (``configs/benchmark/mmeb.yaml``): MMEB-V1, 36 image tasks in four meta-tasks; each query
  scored against its own candidate list (ground truth first), Hit@1 with ``np.argmax``'s tie rule
  (:func:`eval.metrics_mmeb.local_hit_at_1`).
* :class:`MmebV2Image` (``mmeb_v2_image.yaml``): the same 36 tasks in the V2 ``MMEB_Test_Instruct`` layout
  (instruction apart from the text).
* :class:`MmebVisDoc` (``mmeb_visdoc.yaml``): V2 visual-document tasks (BEIR layout), every query ranked
  against the whole corpus through FAISS; ``ndcg_linear@5`` main metric, as the leaderboard.

How a model sees an item is its prompt config's ``mmeb:`` node (``configs/prompt/*.yaml``): ``instruction``
keep | drop, and the bodies ``text`` / ``image`` / ``pair`` for an item with a text only, an image only, or
both. MMEB's ``<|image_1|>`` placeholder is removed by the loader; the body puts the model's own image
token (``<image>`` -> the backbone's token) where the image goes, so the placeholder never reaches a prompt.

Cost: every item of every selected task (queries and candidates alike) is keyed by (instruction+text,
image content) and requested from the embedding cache in ONE request per kind, so an item shared by lists
or tasks is encoded once; the encoder shards the rest across ranks (``torchrun``) and commits every shard,
so an interrupted run resumes where it stopped.

Metric keys (the runner prefixes the benchmark name): ``<Task>/hit@1``, ``<meta>/hit@1``, ``ind/hit@1``,
``ood/hit@1``, ``overall/hit@1`` (x100); visual documents ``<Task>/ndcg_linear@5`` and
``overall/ndcg_linear@5``. Files in ``<run>/<benchmark name>/``: ``<Task>_score.json`` (VLM2Vec's keys and
units: fractions; V1's ``acc``/``num_correct``/``num_pred`` and V2's ``hit@1``/``precision@1``) and
``<Task>_pred.jsonl`` (one line per query: the predicted candidate and whether it is the ground truth).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from e5v.data.atomic import atomic_write_text
from e5v.errors import ConfigError
from eval.benchmarks.base import Benchmark, BenchmarkResult, Context, search_info
from eval.index import rank
from eval.loaders import MissingDatasetError
from eval.loaders.mmeb import (
    DATASET,
    META_TASKS,
    V1_ORDER,
    V1_TASKS,
    VISDOC_TASKS,
    GlobalTask,
    Item,
    LocalTask,
    MINI_TASKS,
    load_beir_task,
    load_local_task,
    task_parquet,
)
from eval.metrics_mmeb import global_scores, local_chance, local_prediction, mean, random_ndcg_at_k

log = logging.getLogger(__name__)

DEFAULT_MMEB_PROMPT = {"instruction": "keep"}  # a prompt config without an ``mmeb:`` node: see _prompt_text


def mmeb_settings(encoder: Any) -> dict[str, Any]:
    """The ``mmeb:`` node of the encoder's prompt config (``{"instruction": "keep"}`` when absent)."""
    prompt = getattr(encoder, "prompt", None)
    bodies = getattr(prompt, "bodies", None)
    if bodies is not None and "mmeb_text" not in bodies:
        raise ConfigError(
            f"prompt config '{getattr(prompt, 'name', '?')}' has no 'mmeb:' node, so MMEB cannot build its prompts; "
            "add one (keys instruction, text, image, pair: see configs/prompt/e5v_llama3.yaml and docs/evaluation.md)"
        )
    extra = getattr(prompt, "extra", None) or {}
    node = extra.get("mmeb") if isinstance(extra, Mapping) else None
    return dict(node) if isinstance(node, Mapping) else dict(DEFAULT_MMEB_PROMPT)


def item_text(item: Item, instruction: str, separator: str = " ") -> str:
    """The text an item contributes to its prompt: instruction and text joined (``keep``) or the text alone
    (``drop``). V1 texts already hold their instruction (the loader cannot split it off)."""
    if instruction == "drop" or not item.instruction:
        return item.text
    if not item.text:
        return item.instruction
    return f"{item.instruction}{separator}{item.text}"


def _kind(text: str, item: Item) -> str:
    if item.image is None:
        return "text"
    return "pair" if text else "image"


def embed_items(items: Sequence[Item], ctx: Context, instruction: str, separator: str = " ") -> list[np.ndarray]:
    """Embeddings (L2-normalised) of ``items``, each unique (kind, text, image) requested once."""
    enc = ctx.encoder
    keyed: list[tuple[str, str, str]] = []
    groups: dict[str, dict[tuple[str, str, str], Item]] = {"text": {}, "image": {}, "pair": {}}
    texts: dict[tuple[str, str, str], str] = {}
    for it in items:
        text = item_text(it, instruction, separator)
        kind = _kind(text, it)
        if kind == "text" and not text:
            raise ValueError("an MMEB item has neither text nor image")
        key = (kind, text, it.image_key)
        keyed.append(key)
        groups[kind].setdefault(key, it)
        texts[key] = text
    table: dict[tuple[str, str, str], np.ndarray] = {}
    for kind, members in groups.items():
        if not members:
            continue
        keys = list(members)
        if kind == "text":
            vecs = enc.text([texts[k] for k in keys], template="mmeb_text")
        elif kind == "image":
            vecs = enc.image([members[k].image for k in keys], template="mmeb_image")
        else:
            vecs = enc.interleaved([(members[k].image, texts[k]) for k in keys], template="mmeb_pair")
        table.update(zip(keys, np.asarray(vecs, dtype=np.float32)))
    return [table[k] for k in keyed]


def _write(out: Path | None, folder: str, files: dict[str, str]) -> list[str]:
    if out is None:
        return []
    d = Path(out) / folder
    for name, text in files.items():
        atomic_write_text(d / name, text)
    return [f"{folder}/{n}" for n in files]


class _MmebBase(Benchmark):
    family = "mmeb"
    make_target = "data-mmeb"

    @property
    def dataset(self) -> str:
        return DATASET

    def __init__(self, name: str, root: str | Path, tasks: Sequence[str] | None = None, **options: Any) -> None:
        super().__init__(name, root, **options)
        known = self.all_tasks()
        chosen = list(known) if tasks in (None, "all") else [str(t) for t in tasks]  # type: ignore[union-attr]
        unknown = [t for t in chosen if t not in known and t not in self.extra_tasks]
        if unknown and self.known_only:
            raise ConfigError(f"benchmark '{name}': unknown MMEB task(s) {unknown}; tasks are {known}")
        if not chosen:
            raise ConfigError(f"benchmark '{name}': tasks is empty; leave it out for all {len(known)} tasks")
        self.tasks = chosen

    known_only = True
    extra_tasks: Mapping[str, Any] = {}  # tasks selectable by name beyond all_tasks() (MMEB-mini)

    def all_tasks(self) -> list[str]:  # pragma: no cover - interface
        raise NotImplementedError

    def chance(self, metric: str, info: Mapping[str, Any]) -> float | None:
        levels = info.get("chance_levels", {})
        if metric in levels:
            return float(levels[metric])
        if metric in info.get("metrics", ()):
            return None
        raise ValueError(f"{self.name}: no metric {metric!r}")


class Mmeb(_MmebBase):
    """MMEB-V1: ``<root>/<Task>/test-00000-of-00001.parquet`` + images under ``<root>/<image_dir>``."""

    instruct = False
    extra_tasks = MINI_TASKS

    default_image_dir = "images"

    def __init__(self, name: str, root: str | Path, tasks: Sequence[str] | None = None, image_dir: str | None = None,
                 main_metric: str = "hit@1", **options: Any) -> None:
        super().__init__(name, root, tasks, **options)
        self.image_dir = image_dir or self.default_image_dir
        if main_metric != "hit@1":
            raise ConfigError(f"benchmark '{name}': main_metric of local MMEB tasks is hit@1, got {main_metric!r}")

    def all_tasks(self) -> list[str]:
        return list(V1_ORDER)

    def check_data(self) -> None:
        """Every selected task's parquet (columns, rows, candidate lists) and image files; no model."""
        if not self.root.is_dir():
            raise MissingDatasetError(DATASET, self.root, "dataset folder", self.make_target or "")
        missing = [t for t in self.tasks if not task_parquet(self.root, t).is_file()]
        if missing:
            raise MissingDatasetError(
                DATASET, task_parquet(self.root, missing[0]),
                f"parquet file of {len(missing)} selected task(s) ({', '.join(missing[:4])}"
                f"{', ...' if len(missing) > 4 else ''})", self.make_target or "")
        for t in self.tasks:
            load_local_task(self.root, t, self.image_dir, instruct=self.instruct)

    def embed(self, ctx: Context) -> dict[str, Any]:
        settings = mmeb_settings(ctx.encoder)
        instruction, sep = settings.get("instruction", "keep"), settings.get("separator", " ")
        data = [load_local_task(self.root, t, self.image_dir, instruct=self.instruct) for t in self.tasks]
        items: list[Item] = []
        for task in data:
            for q in task.queries:
                items.append(q.query)
                items.extend(q.candidates)
        vectors = embed_items(items, ctx, instruction, sep)  # one request: shared items encoded once
        out: dict[str, Any] = {"data": data, "scores": {}}
        pos = 0
        for task in data:
            per_query = []
            for q in task.queries:
                qv = vectors[pos]
                cands = np.stack(vectors[pos + 1 : pos + 1 + len(q.candidates)])
                pos += 1 + len(q.candidates)
                per_query.append(cands @ qv)
            out["scores"][task.name] = per_query
        return out

    def score(self, state: dict[str, Any], ctx: Context) -> BenchmarkResult:
        metrics: dict[str, float] = {}
        chance: dict[str, float] = {}
        files: list[str] = []
        task_info: dict[str, Any] = {}
        for task in state["data"]:
            scores = state["scores"][task.name]
            preds = [local_prediction(s) for s in scores]
            hits = [p == 0 for p in preds]
            acc = float(np.mean(hits))
            sizes = [len(q.candidates) for q in task.queries]
            metrics[f"{task.name}/hit@1"] = 100.0 * acc
            chance[f"{task.name}/hit@1"] = 100.0 * local_chance(sizes)
            task_info[task.name] = {"n_query": len(sizes), "candidates": [min(sizes), max(sizes)]}
            files += self._files(task, preds, hits, scores, acc, ctx.output_dir)
        self._aggregate(metrics, chance)
        info = {"tasks": task_info, "chance_levels": chance, "metrics": sorted(metrics), "files": files,
                "layout": "v2_instruct" if self.instruct else "v1"}
        return BenchmarkResult(self.name, self.family, metrics, info, chance)

    def _aggregate(self, metrics: dict[str, float], chance: dict[str, float]) -> None:
        """Unweighted means of the task scores: per meta-task, in-distribution, out-of-distribution, overall
        (the leaderboard averages tasks, not queries). A group with no selected task is left out."""
        groups: dict[str, list[str]] = {m: [] for m in META_TASKS}
        groups.update({"ind": [], "ood": []})
        for t in self.tasks:
            info = V1_TASKS.get(t) or MINI_TASKS.get(t)
            if info is None:
                continue
            groups[info.meta].append(t)
            groups[info.split].append(t)
        groups["overall"] = list(self.tasks)
        for g, members in groups.items():
            if members:
                metrics[f"{g}/hit@1"] = mean([metrics[f"{t}/hit@1"] for t in members])
                chance[f"{g}/hit@1"] = mean([chance[f"{t}/hit@1"] for t in members])

    def _files(self, task: LocalTask, preds: list[int], hits: list[bool], scores: list[np.ndarray], acc: float,
               out: Path | None) -> list[str]:
        lines = []
        for i, (q, p, h, s) in enumerate(zip(task.queries, preds, hits, scores)):
            qt, qi, tts, tis = q.raw
            lines.append(json.dumps({"query": i, "prediction": p, "pred": [tts[p], tis[p]], "correct": h,
                                     "n_candidates": len(tts), "score_pred": float(s[p]), "score_gt": float(s[0])}))
        n_correct = int(sum(hits))
        score = {"acc": acc, "num_correct": n_correct, "num_pred": len(hits), "hit@1": acc, "precision@1": acc,
                 "num_data": len(hits)}
        return _write(out, self.name, {f"{task.name}_score.json": json.dumps(score, indent=4) + "\n",
                                       f"{task.name}_pred.jsonl": "\n".join(lines) + "\n"})


class MmebV2Image(Mmeb):
    """The 36 image tasks in the V2 ``MMEB_Test_Instruct`` layout (``qry_inst`` / ``tgt_inst`` columns)."""

    instruct = True
    default_image_dir = "image-tasks"  # VLM2Vec's image_root for the image tasks
    make_target = None  # not prepared by `make data-mmeb` (V1 only): point root at a copy


class MmebVisDoc(_MmebBase):
    """V2 visual-document retrieval (BEIR layout): ranked over the whole corpus, ``ndcg_linear@5``."""

    make_target = None  # no `make` target: point root at a copy

    def __init__(self, name: str, root: str | Path, tasks: Sequence[str] | None = None, ks: Sequence[int] = (1, 5, 10),
                 main_metric: str = "ndcg_linear@5", **options: Any) -> None:
        super().__init__(name, root, tasks, **options)
        self.ks = [int(k) for k in ks]
        self.main_metric = main_metric
        if main_metric.split("@")[0] not in ("ndcg_linear", "hit") or int(main_metric.split("@")[-1]) not in self.ks:
            raise ConfigError(f"benchmark '{name}': main_metric {main_metric!r} must be ndcg_linear@k or hit@k, k in ks")

    def all_tasks(self) -> list[str]:
        return list(VISDOC_TASKS)

    def check_data(self) -> None:
        if not self.root.is_dir():
            raise MissingDatasetError(DATASET, self.root, "dataset folder", self.make_target or "")
        for t in self.tasks:
            load_beir_task(self.root, t)

    def embed(self, ctx: Context) -> dict[str, Any]:
        settings = mmeb_settings(ctx.encoder)
        instruction, sep = settings.get("instruction", "keep"), settings.get("separator", " ")
        data = [load_beir_task(self.root, t) for t in self.tasks]
        out: dict[str, Any] = {"data": data, "q": {}, "d": {}}
        for task in data:
            out["q"][task.name] = np.stack(embed_items(task.queries, ctx, instruction, sep))
            out["d"][task.name] = np.stack(embed_items(task.docs, ctx, instruction, sep))
        return out

    def score(self, state: dict[str, Any], ctx: Context) -> BenchmarkResult:
        metrics: dict[str, float] = {}
        chance: dict[str, float] = {}
        files: list[str] = []
        infos: dict[str, Any] = {}
        k_max = max(self.ks)
        for task in state["data"]:
            task_: GlobalTask = task
            q, d = state["q"][task_.name], state["d"][task_.name]
            res = rank(q, d, min(k_max, len(d)), ctx.index)
            ids = np.asarray(task_.doc_ids)
            ranked = [ids[row[row >= 0]].tolist() for row in res.ids]
            s = global_scores(ranked, task_.qrels, self.ks)
            metrics[f"{task_.name}/{self.main_metric}"] = 100.0 * s[self.main_metric]
            metrics[f"{task_.name}/hit@1"] = 100.0 * s["hit@1"]
            kk = int(self.main_metric.split("@")[1])
            if self.main_metric.startswith("ndcg"):
                chance[f"{task_.name}/{self.main_metric}"] = 100.0 * float(
                    np.mean([random_ndcg_at_k(g, len(d), kk) for g in task_.qrels]))
            chance[f"{task_.name}/hit@1"] = 100.0 * float(np.mean([min(1.0, len(g) / len(d)) for g in task_.qrels]))
            infos[task_.name] = search_info(res, len(q), len(d))
            lines = [json.dumps({"query-id": qid, "prediction": r, "label": list(g), "rel_scores": list(g.values())})
                     for qid, r, g in zip(task_.query_ids, ranked, task_.qrels)]
            score = {**s, "num_pred": len(ranked), "num_data": len(ranked)}
            files += _write(ctx.output_dir, self.name, {f"{task_.name}_score.json": json.dumps(score, indent=4) + "\n",
                                                         f"{task_.name}_pred.jsonl": "\n".join(lines) + "\n"})
        for m in (self.main_metric, "hit@1"):
            metrics[f"overall/{m}"] = mean([metrics[f"{t}/{m}"] for t in self.tasks])
            if all(f"{t}/{m}" in chance for t in self.tasks):
                chance[f"overall/{m}"] = mean([chance[f"{t}/{m}"] for t in self.tasks])
        info = {"tasks": infos, "chance_levels": chance, "metrics": sorted(metrics), "files": files}
        return BenchmarkResult(self.name, self.family, metrics, info, chance)
