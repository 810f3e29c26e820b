"""The paper's numbers (E5-V, arXiv 2407.12580 v1) and the layout of its tables.

Metric keys match ours: ``PAPER[reference][benchmark][metric]``. ``e5v`` is the released model
(Tables 1-6); ``llava_next_8b_prompt`` is Table 6's zero-shot row (LLaVA-NeXT-8B with the prompts,
no fine-tuning), which has R@5-only summary numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

R = ("R@1", "R@5", "R@10")


def _r(prefix: str, values: tuple[float, ...], ks: tuple[str, ...] = R) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in zip(ks, values)}


PAPER: dict[str, dict[str, dict[str, float]]] = {
    "e5v": {
        "flickr30k": {**_r("t2i_", (79.5, 95.0, 97.6)), **_r("i2t_", (88.2, 98.7, 99.4))},
        "coco": {**_r("t2i_", (52.0, 76.5, 84.7)), **_r("i2t_", (62.0, 83.6, 89.7))},
        "i2i_flickr30k": {**_r("t2i_", (67.8, 89.2, 93.6)), **_r("i2t_", (79.5, 95.2, 97.8))},
        "i2i_coco": {**_r("t2i_", (41.2, 66.7, 76.2)), **_r("i2t_", (51.6, 76.8, 84.9))},
        "cirr": {"R@5": 66.6},  # val, Table 6
        "cirr_test1": {"R@1": 33.90, "R@5": 64.12, "R@10": 75.88, "R@50": 93.54},  # evaluation server, Table 2
        "fashioniq": {
            "dress_R@10": 23.75,
            "dress_R@50": 47.45,
            "shirt_R@10": 36.36,
            "shirt_R@50": 56.43,
            "toptee_R@10": 35.29,
            "toptee_R@50": 57.47,
            "avg_R@10": 31.80,
            "avg_R@50": 53.78,
        },
        "sts": {
            "STS12": 80.03,
            "STS13": 89.94,
            "STS14": 85.67,
            "STS15": 89.09,
            "STS16": 85.89,
            "STSBenchmark": 87.88,
            "SICKRelatedness": 83.51,
            "avg": 86.00,
        },
        "summary": {"avg": 80.7},
    },
    "llava_next_8b_prompt": {
        "flickr30k": {"t2i_R@5": 82.8, "i2t_R@5": 90.4},
        "coco": {"t2i_R@5": 60.3, "i2t_R@5": 67.4},
        "cirr": {"R@5": 38.4},
        "fashioniq": {"avg_R@50": 32.4},
        "i2i_flickr30k": {"t2i_R@5": 67.0, "i2t_R@5": 75.4},
        "i2i_coco": {"t2i_R@5": 41.8, "i2t_R@5": 49.3},
        "sts": {"avg": 75.8},
        "summary": {"avg": 61.9},
    },
}

REFERENCE_LABEL = {"e5v": "E5-V (paper)", "llava_next_8b_prompt": "LLaVA-NeXT-8B + prompts (paper, Table 6)"}


@dataclass(frozen=True)
class Column:
    label: str
    benchmark: str
    metric: str


@dataclass(frozen=True)
class Table:
    title: str
    columns: tuple[Column, ...]
    note: str = ""
    comparable: bool = True  # False: the paper's split differs from ours (CIRR test1 vs val)


def _dir_cols(bench: str, label: str, prefix: str) -> tuple[Column, ...]:
    return tuple(Column(f"{label} {k}", bench, f"{prefix}{k}") for k in R)


# Table 6's eleven numbers, in the paper's order; their mean is the "avg" column.
SUMMARY: tuple[Column, ...] = (
    Column("Flickr T->I", "flickr30k", "t2i_R@5"),
    Column("Flickr I->T", "flickr30k", "i2t_R@5"),
    Column("COCO T->I", "coco", "t2i_R@5"),
    Column("COCO I->T", "coco", "i2t_R@5"),
    Column("CIRR", "cirr", "R@5"),
    Column("FIQ", "fashioniq", "avg_R@50"),
    Column("I2I-Flickr T->I", "i2i_flickr30k", "t2i_R@5"),
    Column("I2I-Flickr I->T", "i2i_flickr30k", "i2t_R@5"),
    Column("I2I-COCO T->I", "i2i_coco", "t2i_R@5"),
    Column("I2I-COCO I->T", "i2i_coco", "i2t_R@5"),
    Column("STS", "sts", "avg"),
)

TABLES: tuple[Table, ...] = (
    Table(
        "Table 1: image-text retrieval (R@1/5/10)",
        _dir_cols("flickr30k", "Flickr T->I", "t2i_")
        + _dir_cols("coco", "COCO T->I", "t2i_")
        + _dir_cols("flickr30k", "Flickr I->T", "i2t_")
        + _dir_cols("coco", "COCO I->T", "i2t_"),
    ),
    Table(
        "Table 2: composed image retrieval, CIRR",
        tuple(Column(k, "cirr", k) for k in ("R@1", "R@5", "R@10", "R@50", "R_subset@1", "R_subset@2", "R_subset@3")),
        note="The paper's Table 2 is test1 (evaluation server): 33.90/64.12/75.88/93.54; ours is val. "
        "Upload the cirr_test1_*.json files of this run to the server for test1. Val R@5 in the paper: 66.6 (Table 6).",
    ),
    Table(
        "Table 3: composed image retrieval, FashionIQ val (R@10/R@50)",
        tuple(
            Column(f"{c} {k}", "fashioniq", f"{c}_{k}")
            for c in ("dress", "shirt", "toptee", "avg")
            for k in ("R@10", "R@50")
        ),
    ),
    Table(
        "Table 4: image-image retrieval, rendered captions (R@1/5/10)",
        _dir_cols("i2i_flickr30k", "Flickr text-img->img", "t2i_")
        + _dir_cols("i2i_coco", "COCO text-img->img", "t2i_")
        + _dir_cols("i2i_flickr30k", "Flickr img->text-img", "i2t_")
        + _dir_cols("i2i_coco", "COCO img->text-img", "i2t_"),
    ),
    Table(
        "Table 5: sentence embeddings, STS (Spearman x100)",
        tuple(
            Column(t, "sts", t)
            for t in ("STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness", "avg")
        ),
    ),
    Table(
        "Table 6: summary (R@5; CIRR val R@5; FashionIQ avg R@50; STS avg)",
        SUMMARY + (Column("avg", "summary", "avg"),),
    ),
)


def paper_value(reference: str, benchmark: str, metric: str) -> float | None:
    if reference not in PAPER:
        raise KeyError(f"unknown paper reference {reference!r}; choose from {sorted(PAPER)}")
    if benchmark == "cirr" and reference == "e5v" and metric != "R@5":
        return None
    return PAPER[reference].get(benchmark, {}).get(metric)
