"""Published MMEB numbers of the released embedding models and of E5-V: the authors' (or the benchmark
authors') claims, as facts with their sources, so a report can put our MMEB scores beside them.

Keys follow the ``mmeb`` benchmark's metric names (``eval.benchmarks.mmeb``): ``<meta>/hit@1`` for the four
meta-tasks (classification, vqa, retrieval, grounding), ``ind/hit@1``, ``ood/hit@1``, ``overall/hit@1``, in
percent. MMEB-V1 = the 36 image tasks of ``TIGER-Lab/MMEB-eval``; MMEB-V2's image part is the same 36 tasks with
V2's instructions (``ziyjiang/MMEB_Test_Instruct``), reported as ``image/...`` here, and ``all/score`` is V2's
overall (78 tasks: image, video, visual documents). A value absent is not published (not zero).
"""

from __future__ import annotations

from dataclasses import dataclass, field

VLM2VEC_PAPER = "VLM2Vec paper, arXiv 2410.05160, Table 2 (MMEB baselines)"
VLM2VEC_README = ("https://github.com/TIGER-AI-Lab/VLM2Vec README.md (news 2025-02: 'based on Qwen2VL 2B and 7B, "
                  "achieving 60.1 and 65.8 ... on the MMEB benchmark')")
QWEN3_VL_EMB_README = ("https://github.com/QwenLM/Qwen3-VL-Embedding README.md @ 8ce3aab, 'Evaluation Results on "
                       "MMEB-V2' table (VisDoc OOD re-evaluated on the updated split)")


@dataclass(frozen=True)
class Published:
    """One model's published MMEB numbers (percent), per benchmark version, with where each came from."""

    model: str          # the model's name as its authors write it
    hub_id: str
    backbone: str | None  # our backbone config (configs/backbone/<name>.yaml), None where we have none
    prompt: str | None    # the prompt config that config selects (what a run records: results["run"]["prompt"])
    v1: dict[str, float] = field(default_factory=dict)
    v1_source: str = ""
    v2: dict[str, float] = field(default_factory=dict)
    v2_source: str = ""


def _meta(cls: float, vqa: float, ret: float, gd: float, prefix: str = "") -> dict[str, float]:
    return {f"{prefix}classification/hit@1": cls, f"{prefix}vqa/hit@1": vqa, f"{prefix}retrieval/hit@1": ret,
            f"{prefix}grounding/hit@1": gd}


PUBLISHED: dict[str, Published] = {
    "e5v": Published(
        model="E5-V", hub_id="royokong/e5-v", backbone="e5v", prompt=None,
        v1={**_meta(21.8, 4.9, 11.5, 19.0), "ind/hit@1": 14.9, "ood/hit@1": 11.5, "overall/hit@1": 13.3},
        v1_source=VLM2VEC_PAPER + " (zero-shot baseline row 'E5-V')",
    ),
    "vlm2vec_qwen2vl_2b": Published(
        model="VLM2Vec (Qwen2-VL-2B)", hub_id="TIGER-Lab/VLM2Vec-Qwen2VL-2B", backbone="vlm2vec_qwen2vl_2b", prompt="vlm2vec_qwen2vl",
        v1={"overall/hit@1": 60.1}, v1_source=VLM2VEC_README,
        v2={**_meta(58.7, 49.3, 65.0, 72.9, "image/"), "image/overall/hit@1": 59.7, "all/score": 47.7},
        v2_source=QWEN3_VL_EMB_README + " (row 'VLM2Vec 2B')",
    ),
    "gme_qwen2vl_2b": Published(
        model="GME-Qwen2-VL-2B", hub_id="Alibaba-NLP/gme-Qwen2-VL-2B-Instruct", backbone="gme_qwen2vl_2b", prompt="gme_qwen2vl",
        v2={**_meta(54.4, 29.9, 66.9, 55.5, "image/"), "image/overall/hit@1": 51.9, "all/score": 55.3},
        v2_source=QWEN3_VL_EMB_README + " (row 'GME-2B'); no MMEB-V1 overall published by its authors",
    ),
    "qwen3_vl_embedding_2b": Published(
        model="Qwen3-VL-Embedding-2B", hub_id="Qwen/Qwen3-VL-Embedding-2B", backbone="qwen3_vl_embedding_2b", prompt="qwen3_vl_embedding",
        v2={**_meta(70.3, 74.3, 74.8, 88.5, "image/"), "image/overall/hit@1": 75.0, "all/score": 73.2},
        v2_source=QWEN3_VL_EMB_README + " (row 'Qwen3-VL-Embedding-2B')",
    ),
}


def published_for_backbone(backbone: str, prompt: str | None = None) -> Published | None:
    """The published numbers of the model a run evaluated: by backbone config name or hub id, or by the released
    model's own prompt config (a run records the model's path and its prompt); None: not a released MMEB model."""
    return next((p for p in PUBLISHED.values()
                 if backbone in (p.backbone, p.hub_id) or (prompt is not None and prompt == p.prompt)), None)


def published_value(key: str, metric: str, version: str = "v1") -> float | None:
    """``PUBLISHED[key].v1[metric]`` (or ``v2``), None where not published."""
    p = PUBLISHED.get(key)
    if p is None:
        return None
    return (p.v1 if version == "v1" else p.v2).get(metric)


def markdown_table() -> str:
    """The published overall numbers side by side (docs/evaluation.md 'Released embedding models')."""
    rows = ["| model | MMEB-V1 overall | MMEB-V2 image (36 tasks) | MMEB-V2 all (78 tasks) |", "|---|---|---|---|"]
    for p in PUBLISHED.values():
        cells = [p.v1.get("overall/hit@1"), p.v2.get("image/overall/hit@1"), p.v2.get("all/score")]
        rows.append(f"| {p.model} | " + " | ".join("—" if c is None else f"{c:.1f}" for c in cells) + " |")
    return "\n".join(rows)


V1_COLUMNS = ("classification/hit@1", "vqa/hit@1", "retrieval/hit@1", "grounding/hit@1", "ind/hit@1", "ood/hit@1",
              "overall/hit@1")
V1_LABELS = ("cls", "VQA", "ret", "grd", "IND", "OOD", "overall")


def mmeb_section(metrics: dict[str, dict[str, float]], backbone: str, suite: str = "",
                 prompt: str | None = None) -> list[str]:
    """Report lines: this run's MMEB-V1 scores (benchmark ``mmeb``) beside every published MMEB-V1 row (E5-V's and
    the released models'); the run's own model's row marked. Empty when the run has no ``mmeb`` scores."""
    ours = metrics.get("mmeb") or {}
    if not any(k in ours for k in V1_COLUMNS):
        return []
    fmt = lambda v: "—" if v is None else f"{v:.1f}"  # noqa: E731
    lines = ["## MMEB-V1 beside published numbers\n", "| model | " + " | ".join(V1_LABELS) + " |",
             "|---|" + "---|" * len(V1_COLUMNS),
             f"| **ours** (`{backbone}`) | " + " | ".join(fmt(ours.get(c)) for c in V1_COLUMNS) + " |"]
    own = published_for_backbone(backbone, prompt)
    for p in PUBLISHED.values():
        if not p.v1:
            continue
        mark = " (this model, published)" if p is own else " (published)"
        lines.append(f"| {p.model}{mark} | " + " | ".join(fmt(p.v1.get(c)) for c in V1_COLUMNS) + " |")
    no_v1 = [p.model for p in PUBLISHED.values() if not p.v1]
    lines.append(f"\nSources: eval/published.py. No MMEB-V1 numbers published for {', '.join(no_v1)} (their "
                 "MMEB-V2 image numbers use V2's instructions: compare with `mmeb_v2_image`).")
    if suite == "mini":
        lines.append("Mini suite: generated data; the published numbers are shown for layout only.")
    lines.append("")
    return lines
