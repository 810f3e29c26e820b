"""MMEB (VLM2Vec's Massive Multimodal Embedding Benchmark), the real on-disk layouts.

* **V1** (``TIGER-Lab/MMEB-eval``): ``<root>/<Task>/test-00000-of-00001.parquet`` with columns ``qry_text``
  (str), ``qry_img_path`` (str, ``''`` when the query has no image), ``tgt_text`` (list[str]) and
  ``tgt_img_path`` (list[str], ``''`` entries for text candidates); the ground truth is candidate 0. Images:
  the repository's ``images.zip`` extracted under ``<root>/<image_dir>`` (default ``images``), each file at
  the relative path the parquet names (VLM2Vec V1 ``EvalDataset._get_image``: ``os.path.join(image_dir,
  img_path)``). Texts carry Phi-3-V's image placeholder ``<|image_1|>`` where the image goes, and the task
  instruction inside the text ("<|image_1|>\\nRepresent the given image for classification").
* **V2 image tasks** (``ziyjiang/MMEB_Test_Instruct``): the same layout plus ``qry_inst`` and ``tgt_inst``
  (the instruction apart from the text); images: ``TIGER-Lab/MMEB-V2`` ``image-tasks/mmeb_v1.tar.gz``.
* **V2 visual documents** (BEIR layout, ViDoRe / VisRAG): ``<root>/<Task>/queries/*.parquet``
  (``query-id``, ``query``), ``corpus/*.parquet`` (``corpus-id``, ``image``: a struct with ``bytes``, or an
  ``image_path`` column relative to ``<root>/<Task>``), ``qrels/*.parquet`` (``query-id``, ``corpus-id``,
  ``score``); grades <= 0 dropped, a repeated pair keeps its larger grade (VLM2Vec ``load_qrels_mapping``).

What the loaders return is layout-free: each item is ``(instruction, text, image)`` with the placeholder
removed (the prompt config decides where the model's own image token goes: :mod:`eval.benchmarks.mmeb`).
Video tasks would be one more loader returning frame lists as the image; nothing here assumes stills.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e5v.data.contrastive import PLACEHOLDER, strip_placeholder  # noqa: F401 - re-exported (one definition)
from eval.encode import ImageRef
from eval.loaders import DataFormatError, MissingDatasetError, image_path

DATASET = "mmeb"
PARQUET = "test-00000-of-00001.parquet"
V1_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
V2_COLUMNS = ("qry_inst", *V1_COLUMNS, "tgt_inst")

# The 36 MMEB-V1 tasks: meta-task and in-distribution (one of MMEB-train's 20 subsets) or not.
# Source: VLM2Vec paper (arXiv 2410.05160) Tables 1-2; task order as VLM2Vec experiments/report_score.py.
_V1 = {
    "classification": (["ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397"],
                       ["Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211"]),
    "vqa": (["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W"],
            ["ScienceQA", "VizWiz", "GQA", "TextVQA"]),
    "retrieval": (["VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS",
                   "WebQA"], ["FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS"]),
    "grounding": (["MSCOCO"], ["RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"]),
}
META_TASKS = tuple(_V1)


@dataclass(frozen=True)
class TaskInfo:
    name: str
    meta: str
    split: str  # "ind" | "ood" | "" (V2 visual documents: no such split)


V1_TASKS: dict[str, TaskInfo] = {
    name: TaskInfo(name, meta, split)
    for meta, (ind, ood) in _V1.items()
    for split, names in (("ind", ind), ("ood", ood))
    for name in names
}
V1_ORDER = list(V1_TASKS)  # meta-task by meta-task, in-distribution first: the leaderboard's order



def _mini_tasks() -> dict[str, TaskInfo]:
    from e5v.mini.mmeb_data import task_table

    return {n: TaskInfo(n, v["meta"], v["split"]) for n, v in task_table().items()}


# MMEB-mini (e5v.mini.mmeb_data, suite=mini): the mini world's tasks in the V1 layout, each with the meta-task
# and split of the real task it mirrors; selectable by name, never among the default 36.
MINI_TASKS: dict[str, TaskInfo] = _mini_tasks()
VISDOC_TASKS = [
    "ViDoRe_arxivqa", "ViDoRe_docvqa", "ViDoRe_infovqa", "ViDoRe_tabfquad", "ViDoRe_tatdqa", "ViDoRe_shiftproject",
    "ViDoRe_syntheticDocQA_artificial_intelligence", "ViDoRe_syntheticDocQA_energy",
    "ViDoRe_syntheticDocQA_government_reports", "ViDoRe_syntheticDocQA_healthcare_industry",
    "ViDoRe_esg_reports_human_labeled_v2", "ViDoRe_biomedical_lectures_v2_multilingual",
    "ViDoRe_economics_reports_v2_multilingual", "ViDoRe_esg_reports_v2_multilingual", "VisRAG_ArxivQA",
    "VisRAG_ChartQA", "VisRAG_MP-DocVQA", "VisRAG_SlideVQA", "VisRAG_InfoVQA", "VisRAG_PlotQA", "ViDoSeek-page",
    "ViDoSeek-doc", "MMLongBench-page", "MMLongBench-doc",
]
# VLM2Vec's instructions for the visual-document tasks (src/data/eval_dataset/vidore_dataset.py).
VISDOC_QUERY_INSTRUCTION = "Find a document image that matches the given query:"
VISDOC_DOC_INSTRUCTION = "Understand the content of the provided document image."


@dataclass(frozen=True)
class Item:
    """One thing to embed: an instruction, a text (either may be ``''``) and an image (or None)."""

    instruction: str
    text: str
    image: ImageRef | None = None

    @property
    def image_key(self) -> str:
        if self.image is None:
            return ""
        return str(self.image.path) if self.image.path is not None else f"bytes:{self.image.label}"


@dataclass
class LocalQuery:
    query: Item
    candidates: list[Item]  # the ground truth first
    raw: tuple[str, str, list[str], list[str]]  # (qry_text, qry_img_path, tgt_text, tgt_img_path) as stored


@dataclass
class LocalTask:
    name: str
    queries: list[LocalQuery]
    source: Path


@dataclass
class GlobalTask:
    name: str
    query_ids: list[str]
    queries: list[Item]
    doc_ids: list[str]
    docs: list[Item]
    qrels: list[dict[str, float]] = field(default_factory=list)  # per query {doc id: grade > 0}
    source: Path = Path()


def _read_parquet(path: Path, columns: tuple[str, ...], what: str) -> dict[str, list[Any]]:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise MissingDatasetError(DATASET, path, what)
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataFormatError(f"{path}: not a readable parquet file ({e}); re-download it (make data-mmeb)") from e
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataFormatError(
            f"{path}: no column {missing[0]!r} (columns: {table.column_names}); expected {list(columns)}"
        )
    return {c: table.column(c).to_pylist() for c in columns}


def task_parquet(root: Path, task: str) -> Path:
    """The task's parquet file: ``<root>/<task>/test-00000-of-00001.parquet`` (or its only ``test-*`` file)."""
    folder = root / task
    p = folder / PARQUET
    if not p.is_file() and folder.is_dir():
        found = sorted(folder.glob("test-*.parquet"))
        if len(found) == 1:
            return found[0]
    return p


def _image(img_root: Path, rel: Any, source: Path, row: str, check: bool) -> ImageRef | None:
    if rel is None or rel == "":
        return None
    if not isinstance(rel, str):
        raise DataFormatError(f"{source}: row {row}: image path is a {type(rel).__name__}, expected a string")
    return ImageRef(path=image_path(img_root, rel, source, row, DATASET, check=check), label=rel)


def load_local_task(
    root: str | Path, task: str, image_dir: str = "images", instruct: bool = False, check_images: bool = True
) -> LocalTask:
    """One V1 (``instruct=False``) or V2-instruct task: each row a query with its own candidate list."""
    root = Path(root)
    path = task_parquet(root, task)
    cols = _read_parquet(path, V2_COLUMNS if instruct else V1_COLUMNS, f"parquet file of task {task}")
    img_root = root / image_dir
    queries: list[LocalQuery] = []
    n = len(cols["qry_text"])
    if n == 0:
        raise DataFormatError(f"{path}: no rows")
    for r in range(n):
        qt, qi, tts, tis = (cols[c][r] for c in V1_COLUMNS)
        if not isinstance(qt, str):
            raise DataFormatError(f"{path}: row {r} column 'qry_text' is a {type(qt).__name__}, expected a string")
        if not isinstance(tts, list) or not isinstance(tis, list):
            raise DataFormatError(f"{path}: row {r}: 'tgt_text' and 'tgt_img_path' must be lists")
        if not tts:
            raise DataFormatError(f"{path}: row {r} has an empty candidate list ('tgt_text' is []); "
                                  "every query needs its ground truth as candidate 0")
        if len(tts) != len(tis):
            raise DataFormatError(f"{path}: row {r}: 'tgt_text' has {len(tts)} entries, 'tgt_img_path' {len(tis)}")
        q_inst = cols["qry_inst"][r] if instruct else ""
        t_inst = cols["tgt_inst"][r] if instruct else ""
        q_inst, _ = strip_placeholder(q_inst or "")
        t_inst, _ = strip_placeholder(t_inst or "")
        q_text, _ = strip_placeholder(qt)
        query = Item(q_inst, q_text, _image(img_root, qi, path, f"{r} 'qry_img_path'", check_images))
        cands = []
        for j, (t, im) in enumerate(zip(tts, tis)):
            if not isinstance(t, str):
                raise DataFormatError(f"{path}: row {r} 'tgt_text'[{j}] is a {type(t).__name__}, expected a string")
            text, _ = strip_placeholder(t)
            cands.append(Item(t_inst, text, _image(img_root, im, path, f"{r} 'tgt_img_path'[{j}]", check_images)))
        queries.append(LocalQuery(query, cands, (qt, qi or "", list(tts), list(tis))))
    return LocalTask(task, queries, path)


def _parquet_dir(folder: Path, columns: tuple[str, ...], what: str) -> dict[str, list[Any]]:
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        raise MissingDatasetError(DATASET, folder, f"{what} (*.parquet)")
    out: dict[str, list[Any]] = {c: [] for c in columns}
    for f in files:
        part = _read_parquet(f, columns, what)
        for c in columns:
            out[c].extend(part[c])
    return out


def load_beir_task(root: str | Path, task: str, check_images: bool = True) -> GlobalTask:
    """One visual-document task in the BEIR layout (queries / corpus / graded qrels)."""
    base = Path(root) / task
    if not base.is_dir():
        raise MissingDatasetError(DATASET, base, f"folder of task {task}")
    q = _parquet_dir(base / "queries", ("query-id", "query"), f"queries of task {task}")
    import pyarrow.parquet as pq

    corpus_files = sorted((base / "corpus").glob("*.parquet")) if (base / "corpus").is_dir() else []
    if not corpus_files:
        raise MissingDatasetError(DATASET, base / "corpus", f"corpus of task {task} (*.parquet)")
    names = pq.read_schema(corpus_files[0]).names
    img_col = "image" if "image" in names else "image_path"
    c = _parquet_dir(base / "corpus", ("corpus-id", img_col), f"corpus of task {task}")
    rel = _parquet_dir(base / "qrels", ("query-id", "corpus-id", "score"), f"qrels of task {task}")
    doc_ids: list[str] = []
    docs: list[Item] = []
    seen: dict[str, int] = {}
    for r, (did, im) in enumerate(zip(c["corpus-id"], c[img_col])):
        did = str(did)
        if did in seen:
            continue  # the corpus is de-duplicated by id (VLM2Vec's candidate dict)
        where = f"corpus row {r} ('corpus-id' {did!r})"
        if img_col == "image":
            data = im.get("bytes") if isinstance(im, dict) else None
            if not data:
                raise DataFormatError(f"{base / 'corpus'}: {where} has no image bytes in column 'image'")
            ref = ImageRef(data=data, label=f"{task}/{did}")
        else:
            ref = _image(base, im, base / "corpus", where, check_images)
            if ref is None:
                raise DataFormatError(f"{base / 'corpus'}: {where} has an empty 'image_path'")
        seen[did] = len(doc_ids)
        doc_ids.append(did)
        docs.append(Item(VISDOC_DOC_INSTRUCTION, "", ref))
    grades: dict[str, dict[str, float]] = {}
    for r, (qid, did, s) in enumerate(zip(rel["query-id"], rel["corpus-id"], rel["score"])):
        if s is None:
            raise DataFormatError(f"{base / 'qrels'}: row {r} has no 'score'")
        if s > 0:
            g = grades.setdefault(str(qid), {})
            g[str(did)] = max(g.get(str(did), 0.0), float(s))
    unknown = sorted({d for g in grades.values() for d in g if d not in seen})
    if unknown:
        raise DataFormatError(f"{base / 'qrels'}: corpus-id(s) {unknown[:3]} are not in the corpus")
    qids: list[str] = []
    items: list[Item] = []
    qrels: list[dict[str, float]] = []
    for qid, text in zip(q["query-id"], q["query"]):
        qid = str(qid)
        if qid not in grades:
            continue  # a query without a relevant document is not scored (as VLM2Vec: qrels drive the queries)
        if not isinstance(text, str) or not text:
            raise DataFormatError(f"{base / 'queries'}: query {qid!r} has no text in column 'query'")
        qids.append(qid)
        items.append(Item(VISDOC_QUERY_INSTRUCTION, text, None))
        qrels.append(grades[qid])
    if not qids:
        raise DataFormatError(f"{base}: no query has a relevant document (qrels score > 0)")
    return GlobalTask(task, qids, items, doc_ids, docs, qrels, base)
