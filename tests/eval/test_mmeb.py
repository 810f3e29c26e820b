"""MMEB benchmark family: metrics against hand-computed cases and independent implementations, the three real
layouts (V1 parquet, V2 instruct, BEIR) written here, clear failures, and one end-to-end run with ``tiny``."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from e5v.errors import ConfigError, DataError, MissingDataError
from eval.benchmarks.base import Context
from eval.benchmarks.mmeb import Mmeb, MmebVisDoc, item_text
from eval.loaders.mmeb import V1_ORDER, V1_TASKS, VISDOC_TASKS, load_beir_task, load_local_task
from eval.metrics_mmeb import (
    global_scores,
    local_chance,
    local_hit_at_1,
    local_prediction,
    ndcg_at_k,
    random_ndcg_at_k,
)
from tests.eval.evalkit import FakeEncoder

# ----------------------------------------------------------------------------------------------- fixtures


def _png(path: Path, colour: tuple[int, int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def write_v1(root: Path, task: str, rows: list[dict[str, Any]], instruct: bool = False, drop: str | None = None) -> Path:
    """A task parquet in the real layout: <root>/<task>/test-00000-of-00001.parquet (V1 columns, + V2's)."""
    cols = ["qry_inst", "qry_text", "qry_img_path", "tgt_inst", "tgt_text", "tgt_img_path"] if instruct else [
        "qry_text", "qry_img_path", "tgt_text", "tgt_img_path"]
    types = {"qry_text": pa.string(), "qry_img_path": pa.string(), "tgt_text": pa.list_(pa.string()),
             "tgt_img_path": pa.list_(pa.string()), "qry_inst": pa.string(), "tgt_inst": pa.string()}
    cols = [c for c in cols if c != drop]
    table = pa.table({c: pa.array([r[c] for r in rows], type=types[c]) for c in cols})
    path = root / task / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def v1_dataset(root: Path) -> None:
    """Two tasks: classification (image -> class name) and t2i retrieval (caption -> image)."""
    for name, rgb in COLOURS.items():
        _png(root / "images" / "ImageNet-1K" / f"{name}.jpg", rgb)
        _png(root / "images" / "MSCOCO_t2i" / f"{name}.jpg", rgb)
    names = list(COLOURS)
    cls = [{"qry_text": "<|image_1|>\nRepresent the given image for classification",
            "qry_img_path": f"ImageNet-1K/{n}.jpg", "tgt_text": [n] + [m for m in names if m != n],
            "tgt_img_path": [""] * len(names)} for n in names]
    t2i = [{"qry_text": f"Find me an everyday image that matches the given caption: a {n} square",
            "qry_img_path": "", "tgt_text": ["<|image_1|>\nRepresent the given image."] * 3,
            "tgt_img_path": [f"MSCOCO_t2i/{n}.jpg"] + [f"MSCOCO_t2i/{m}.jpg" for m in names if m != n][:2]}
           for n in names]
    write_v1(root, "ImageNet-1K", cls)
    write_v1(root, "MSCOCO_t2i", t2i)


# ----------------------------------------------------------------------------------------------- Hit@1


def _hit_reference(scores: list[float]) -> bool:
    """Written out: the ground truth (index 0) is predicted iff no later candidate scores strictly higher
    (np.argmax returns the first of equal maxima)."""
    return all(scores[0] >= s for s in scores[1:])


def test_local_hit_at_1_hand_cases_ties_and_duplicates() -> None:
    assert local_prediction([0.5, 0.5, 0.1]) == 0          # a tie with the ground truth: index 0 wins (hit)
    assert local_prediction([0.4, 0.5, 0.5]) == 1          # a tie between two wrong ones: the first of them
    assert local_prediction([0.2, 0.2, 0.2, 0.2]) == 0     # constant scores (a collapsed model) count as hits
    # duplicate candidates: the ground truth repeated at index 2 has its score; one wrong candidate beats both
    assert local_hit_at_1([[0.7, 0.1, 0.7], [0.3, 0.9, 0.3], [0.5, 0.4, 0.5, 0.6]]) == pytest.approx(1 / 3)
    assert local_hit_at_1([[1.0]]) == 1.0                  # a one-candidate list is always a hit
    with pytest.raises(ValueError, match="non-empty"):
        local_prediction([])
    with pytest.raises(ValueError, match="NaN"):
        local_prediction([0.1, float("nan")])


def test_local_hit_at_1_equals_independent_reference_with_many_ties() -> None:
    rng = np.random.default_rng(0)
    lists = [list(np.round(rng.random(rng.integers(1, 8)), 1)) for _ in range(500)]  # coarse: many ties
    expected = sum(_hit_reference(s) for s in lists) / len(lists)
    assert local_hit_at_1(lists) == pytest.approx(expected)
    assert 0.2 < expected < 0.8


def test_local_chance_is_the_mean_of_one_over_list_size() -> None:
    assert local_chance([4, 2, 1]) == pytest.approx((0.25 + 0.5 + 1.0) / 3)
    rng = np.random.default_rng(1)  # and random scores reach it
    sizes = [3] * 20000
    got = local_hit_at_1([rng.standard_normal(3) for _ in sizes])
    assert abs(got - 1 / 3) < 0.015
    with pytest.raises(ValueError, match="empty candidate list"):
        local_chance([3, 0])


# ----------------------------------------------------------------------------------------------- nDCG@5


def _ndcg_reference(ranked: list[str], qrels: dict[str, float], k: int) -> float:
    gains = np.array([qrels.get(d, 0.0) if qrels.get(d, 0.0) > 0 else 0.0 for d in ranked[:k]])
    disc = 1.0 / np.log2(np.arange(2, 2 + k))
    ideal = np.sort(np.array([g for g in qrels.values() if g > 0]))[::-1][:k]
    idcg = float((ideal * disc[: len(ideal)]).sum())
    return float((gains * disc[: len(gains)]).sum()) / idcg if idcg else 0.0


def test_ndcg_hand_computed_graded_qrels() -> None:
    qrels = {"a": 2, "b": 1}
    # ranking b, x, a: DCG = 1/log2(2) + 2/log2(4) = 2; ideal = 2/log2(2) + 1/log2(3)
    assert ndcg_at_k(["b", "x", "a", "y", "z"], qrels, 5) == pytest.approx(2 / (2 + 1 / math.log2(3)))
    assert ndcg_at_k(["a", "b", "x"], qrels, 5) == pytest.approx(1.0)
    assert ndcg_at_k(["x", "y", "z", "w", "v", "a"], qrels, 5) == 0.0           # relevant only at rank 6
    assert ndcg_at_k(["a"], {"a": 3, "b": 0}, 5) == pytest.approx(1.0)          # grade 0 is not relevant
    assert ndcg_at_k(["a"], {"b": 0}, 5) == 0.0                                 # nothing relevant: 0, not NaN
    # the cut-off: ideal uses the k largest grades only
    q = {f"d{i}": g for i, g in enumerate([3, 3, 2, 2, 1, 1, 1])}
    r = ["d6", "d5", "d4", "d3", "d2", "d1", "d0"]
    assert ndcg_at_k(r, q, 5) == pytest.approx(_ndcg_reference(r, q, 5))
    assert ndcg_at_k(r, q, 5) == pytest.approx(
        (1 + 1 / math.log2(3) + 1 / 2 + 2 / math.log2(5) + 2 / math.log2(6))
        / (3 + 3 / math.log2(3) + 2 / 2 + 2 / math.log2(5) + 1 / math.log2(6)))


def test_ndcg_and_hit_equal_independent_reference_on_random_cases() -> None:
    rng = np.random.default_rng(2)
    docs = [f"d{i}" for i in range(12)]
    rankings, qrels = [], []
    for _ in range(200):
        rel = {d: int(rng.integers(0, 4)) for d in rng.choice(docs, size=rng.integers(1, 5), replace=False)}
        rankings.append(list(rng.permutation(docs)))
        qrels.append(rel)
    got = global_scores(rankings, qrels, ks=(1, 5))
    ref = float(np.mean([_ndcg_reference(r, q, 5) for r, q in zip(rankings, qrels)]))
    hit1 = float(np.mean([any(q.get(d, 0) > 0 for d in r[:1]) for r, q in zip(rankings, qrels)]))
    assert got["ndcg_linear@5"] == pytest.approx(ref)
    assert got["hit@1"] == pytest.approx(hit1)


def test_random_ndcg_is_the_exact_expectation_over_all_rankings() -> None:
    qrels = {"a": 2, "b": 1}
    corpus = ["a", "b", "c", "d"]
    perms = list(itertools.permutations(corpus))
    exact = sum(ndcg_at_k(list(p), qrels, 2) for p in perms) / len(perms)
    assert random_ndcg_at_k(qrels, len(corpus), 2) == pytest.approx(exact)


# ----------------------------------------------------------------------------------------------- task table


def test_task_table_has_36_tasks_in_four_meta_tasks_20_ind_16_ood() -> None:
    metas = [t.meta for t in V1_TASKS.values()]
    assert {m: metas.count(m) for m in set(metas)} == {"classification": 10, "vqa": 10, "retrieval": 12,
                                                       "grounding": 4}
    assert sum(t.split == "ind" for t in V1_TASKS.values()) == 20
    assert V1_ORDER[:3] == ["ImageNet-1K", "N24News", "HatefulMemes"] and V1_ORDER[-1] == "Visual7W-Pointing"
    assert V1_TASKS["Place365"].split == "ood" and V1_TASKS["MSCOCO"].meta == "grounding"
    assert len(VISDOC_TASKS) == 24


# ----------------------------------------------------------------------------------------------- layouts


def test_v1_layout_reads_candidates_and_strips_the_placeholder(tmp_path: Path) -> None:
    v1_dataset(tmp_path)
    task = load_local_task(tmp_path, "ImageNet-1K")
    q = task.queries[0]
    assert q.query.text == "Represent the given image for classification" and q.query.image is not None
    assert q.query.image.path == tmp_path / "images" / "ImageNet-1K" / "red.jpg"
    assert [c.text for c in q.candidates] == ["red", "green", "blue", "white"]
    assert all(c.image is None for c in q.candidates)
    t2i = load_local_task(tmp_path, "MSCOCO_t2i").queries[1]
    assert t2i.query.image is None and t2i.candidates[0].text == "Represent the given image."
    assert "<|image_1|>" not in json.dumps([c.text for c in t2i.candidates])


def test_v2_instruct_layout_keeps_the_instruction_apart(tmp_path: Path) -> None:
    _png(tmp_path / "image-tasks" / "VQA" / "a.jpg", (1, 2, 3))
    write_v1(tmp_path, "OK-VQA", [{
        "qry_inst": "<|image_1|>\nRepresent the given image with the following question:", "qry_text": "What is it?",
        "qry_img_path": "VQA/a.jpg", "tgt_inst": "", "tgt_text": ["a cat", "a dog"], "tgt_img_path": ["", ""]}],
        instruct=True)
    q = load_local_task(tmp_path, "OK-VQA", image_dir="image-tasks", instruct=True).queries[0]
    assert q.query.instruction == "Represent the given image with the following question:"
    assert q.query.text == "What is it?"
    assert item_text(q.query, "keep") == "Represent the given image with the following question: What is it?"
    assert item_text(q.query, "drop") == "What is it?"


def write_beir(root: Path, task: str) -> None:
    base = root / task
    for sub in ("queries", "corpus", "qrels"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"query-id": ["q1", "q2", "q3"], "query": ["red page", "green page", "unjudged"]}),
                   base / "queries" / "test-00000-of-00001.parquet")
    import io

    from PIL import Image

    def png(rgb: tuple[int, int, int]) -> bytes:
        b = io.BytesIO()
        Image.new("RGB", (8, 8), rgb).save(b, format="PNG")
        return b.getvalue()

    imgs = [{"bytes": png(rgb), "path": None} for rgb in COLOURS.values()]
    pq.write_table(pa.table({"corpus-id": list(COLOURS), "image": imgs}), base / "corpus" / "test-00000-of-00001.parquet")
    pq.write_table(pa.table({"query-id": ["q1", "q1", "q1", "q2", "q2"], "corpus-id": ["red", "white", "red", "green", "blue"],
                             "score": [1, 2, 2, 1, 0]}), base / "qrels" / "test-00000-of-00001.parquet")


def test_beir_layout_graded_qrels(tmp_path: Path) -> None:
    write_beir(tmp_path, "ViDoRe_arxivqa")
    t = load_beir_task(tmp_path, "ViDoRe_arxivqa")
    assert t.query_ids == ["q1", "q2"]                     # q3 has no relevant document
    assert t.qrels == [{"red": 2.0, "white": 2.0}, {"green": 1.0}]  # repeated pair: larger grade; grade 0 dropped
    assert t.doc_ids == list(COLOURS) and t.docs[0].image is not None and t.docs[0].image.data


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("column", r"test-00000-of-00001\.parquet: no column 'tgt_img_path'"),
        ("image", r"mmeb: image 'ImageNet-1K/red\.jpg' \(named in .*row 0 'qry_img_path'\) not found"),
        ("empty", r"row 0 has an empty candidate list"),
    ],
)
def test_clear_one_line_failures(tmp_path: Path, case: str, pattern: str) -> None:
    row = {"qry_text": "<|image_1|>\nRepresent", "qry_img_path": "ImageNet-1K/red.jpg", "tgt_text": ["red"],
           "tgt_img_path": [""]}
    if case == "image":
        write_v1(tmp_path, "ImageNet-1K", [row])
        err: type[Exception] = MissingDataError
    elif case == "column":
        write_v1(tmp_path, "ImageNet-1K", [row], drop="tgt_img_path")
        err = DataError
    else:
        _png(tmp_path / "images" / "ImageNet-1K" / "red.jpg", (1, 1, 1))
        write_v1(tmp_path, "ImageNet-1K", [{**row, "tgt_text": [], "tgt_img_path": []}])
        err = DataError
    bench = Mmeb("mmeb", tmp_path, tasks=["ImageNet-1K"])
    with pytest.raises(err, match=pattern) as e:
        bench.check_data()
    assert "\n" not in str(e.value)


def test_missing_task_names_make_target_and_unknown_task_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError, match=r"parquet file of 1 selected task\(s\) \(CIRR\).*make data-mmeb"):
        Mmeb("mmeb", tmp_path, tasks=["CIRR"]).check_data()
    with pytest.raises(ConfigError, match="unknown MMEB task"):
        Mmeb("mmeb", tmp_path, tasks=["ImageNet1K"])


# ----------------------------------------------------------------------------------------------- benchmark logic


def _colour_of(label_or_text: str) -> str | None:
    return next((c for c in COLOURS if c in label_or_text), None)


def _basis(c: str | None) -> np.ndarray | None:
    if c is None:
        return None
    v = np.zeros(8, dtype=np.float32)
    v[list(COLOURS).index(c)] = 1.0
    return v


def test_v1_scores_aggregates_files_and_chance(tmp_path: Path) -> None:
    v1_dataset(tmp_path / "data")
    # classification right (image red <-> text red), t2i: the caption "a red square" wrong on purpose
    # for "blue" (maps to green), right for the others
    enc = FakeEncoder(dim=8, text=lambda t: _basis(_colour_of(t)),
                      image=lambda label: _basis(_colour_of(label)),
                      pair=lambda label, t: _basis(_colour_of(label)))
    orig = enc.text

    def text(texts: list[str], template: str = "text", **kw: Any) -> np.ndarray:
        return orig([t.replace("blue square", "green square") for t in texts], template, **kw)

    enc.text = text  # type: ignore[method-assign]
    bench = Mmeb("mmeb", tmp_path / "data", tasks=["ImageNet-1K", "MSCOCO_t2i"])
    bench.check_data()
    ctx = Context(encoder=enc, output_dir=tmp_path / "out", progress=False)
    res = bench.run(ctx)
    assert res is not None
    m = res.metrics
    assert m["ImageNet-1K/hit@1"] == 100.0
    # blue's caption now looks green; blue's candidates are (blue, red, green): green scores 1, the others 0
    assert m["MSCOCO_t2i/hit@1"] == 75.0
    assert m["classification/hit@1"] == 100.0 and m["retrieval/hit@1"] == 75.0
    assert m["ind/hit@1"] == pytest.approx(87.5) and m["overall/hit@1"] == pytest.approx(87.5)
    assert "ood/hit@1" not in m and "vqa/hit@1" not in m
    assert res.chance["ImageNet-1K/hit@1"] == 25.0 and res.chance["MSCOCO_t2i/hit@1"] == pytest.approx(100 / 3)
    assert res.chance["overall/hit@1"] == pytest.approx((25 + 100 / 3) / 2)
    score = json.loads((tmp_path / "out" / "mmeb" / "MSCOCO_t2i_score.json").read_text())
    assert score["acc"] == 0.75 and score["num_correct"] == 3 and score["num_pred"] == 4
    preds = [json.loads(x) for x in (tmp_path / "out" / "mmeb" / "MSCOCO_t2i_pred.jsonl").read_text().splitlines()]
    assert [p["correct"] for p in preds] == [True, True, False, True]
    assert preds[2]["pred"] == ["<|image_1|>\nRepresent the given image.", "MSCOCO_t2i/green.jpg"]  # as stored
    # every unique item once: 4 query images + 4 class names (classification); 4 captions + 4 candidate images
    kinds = {(k, t): n for k, t, _, n in enc.calls}
    assert kinds == {("text", "mmeb_text"): 8, ("pair", "mmeb_pair"): 8}


def test_visdoc_ranks_the_whole_corpus_ndcg(tmp_path: Path) -> None:
    write_beir(tmp_path, "ViDoRe_arxivqa")
    enc = FakeEncoder(dim=8)

    # q1 "red page" -> red best, white second; q2 "green page" -> blue first, green second
    order = {"red page": ["red", "white"], "green page": ["blue", "green"]}
    enc.rules["text"] = lambda t: sum(_basis(c) * w for c, w in zip(order[t.split(": ")[-1]], (1.0, 0.5)))
    enc.rules["pair"] = lambda label, t: _basis(label.split("/")[-1])
    bench = MmebVisDoc("mmeb_visdoc", tmp_path, tasks=["ViDoRe_arxivqa"])
    res = bench.run(Context(encoder=enc, output_dir=tmp_path / "out", progress=False))
    assert res is not None
    assert res.metrics["ViDoRe_arxivqa/ndcg_linear@5"] == pytest.approx(
        100 * (1.0 + 1 / math.log2(3)) / 2)   # q1 perfect; q2 green at rank 2: 1/log2(3)
    assert res.metrics["ViDoRe_arxivqa/hit@1"] == 50.0
    assert res.metrics["overall/ndcg_linear@5"] == res.metrics["ViDoRe_arxivqa/ndcg_linear@5"]
    assert res.chance["ViDoRe_arxivqa/hit@1"] == pytest.approx(100 * (2 / 4 + 1 / 4) / 2)


# ----------------------------------------------------------------------------------------------- end to end


def test_end_to_end_tiny_backbone_through_the_runner(tmp_path: Path, tiny_dir: Path) -> None:
    from e5v.config import compose
    from eval.runner import evaluate

    v1_dataset(tmp_path / "data" / "mmeb")
    ov = ["backbone=tiny", f"paths.data_dir={tmp_path / 'data'}", f"cache.dir={tmp_path / 'cache'}",
          "embedder.device=cpu", "embedder.dtype=float32", "progress=false", "report.history=null", "report.plot=false",
          f"output_dir={tmp_path / 'out'}", "suite=paper", "+benchmark@benchmark.mmeb=mmeb", "benchmarks=[mmeb]",
          "benchmark.mmeb.tasks=[ImageNet-1K,MSCOCO_t2i]"]
    res = evaluate(compose("eval", ov), output_dir=tmp_path / "out")
    m = res["metrics"]["mmeb"]
    for key in ("ImageNet-1K/hit@1", "MSCOCO_t2i/hit@1", "classification/hit@1", "retrieval/hit@1", "ind/hit@1",
                "overall/hit@1"):
        assert 0.0 <= m[key] <= 100.0, key
    assert m["overall/hit@1"] == pytest.approx((m["ImageNet-1K/hit@1"] + m["MSCOCO_t2i/hit@1"]) / 2)
    assert res["chance"]["mmeb"]["ImageNet-1K/hit@1"] == 25.0
    assert (tmp_path / "out" / "mmeb" / "ImageNet-1K_score.json").is_file()
    # a second run is served from the embedding cache
    res2 = evaluate(compose("eval", ov), output_dir=tmp_path / "out2")
    assert res2["metrics"]["mmeb"] == m


# ----------------------------------------------------------------------------------------------- data preparation


def test_prepare_data_mmeb_from_a_mirror_extracts_only_named_images_and_is_idempotent(tmp_path: Path) -> None:
    import zipfile

    from scripts.data.fetch import MirrorFetcher
    from scripts.prepare_data import parse_args, run

    hub = tmp_path / "mirror" / "hub" / "TIGER-Lab" / "MMEB-eval"
    names = list(COLOURS)
    for i, task in enumerate(V1_ORDER):  # one query per task, 2 candidates; half of them name images
        img = f"{task}/{names[i % 4]}.jpg" if i % 2 == 0 else ""
        write_v1(hub, task, [{"qry_text": "<|image_1|>\nRepresent" if img else f"a query for {task}", "qry_img_path": img,
                              "tgt_text": ["x", "y"], "tgt_img_path": ["", ""]}])
    (hub / "extra").mkdir()
    (hub / "extra" / "test-00000-of-00001.parquet").write_bytes(b"not ours")  # matched, but no V1 task: skipped
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(buf, format="JPEG")
    with zipfile.ZipFile(hub / "images.zip", "w") as zf:  # wrapped in one top folder, plus an unneeded image
        for i, task in enumerate(V1_ORDER):
            if i % 2 == 0:
                zf.writestr(f"eval_images/{task}/{names[i % 4]}.jpg", buf.getvalue())
        zf.writestr("eval_images/unused/z.jpg", buf.getvalue())
    root = tmp_path / "data"
    argv = ["mmeb", "--data-root", str(root)]
    fetcher = MirrorFetcher(tmp_path / "mirror")
    assert run(parse_args(argv), fetcher) == 0
    assert (root / "mmeb" / "ImageNet-1K" / "test-00000-of-00001.parquet").is_file()
    extracted = sorted(p.relative_to(root / "mmeb" / "images").as_posix() for p in (root / "mmeb" / "images").rglob("*.jpg"))
    assert len(extracted) == 18 and "unused/z.jpg" not in extracted
    Mmeb("mmeb", root / "mmeb").check_data()   # all 36 tasks load, every image found
    from scripts.data.common import read_marker

    counts = (read_marker(root / "mmeb") or {})["counts"]
    # 18 image queries (each its own image) + 18 text queries; candidates "x", "y" shared by all 36 tasks
    assert counts == {"tasks": 36, "queries": 36, "candidates": 72, "images": 18, "items_with_image": 18,
                      "text_items": 18 + 2}
    fetcher2 = MirrorFetcher(tmp_path / "mirror")
    assert run(parse_args(argv), fetcher2) == 0 and fetcher2.calls == []  # second run: nothing to do
    assert run(parse_args([*argv, "--check"]), MirrorFetcher(tmp_path / "mirror")) == 0


# ----------------------------------------------------------------------------------------------- prompt interface


def test_e5v_default_is_vlm2vecs_e5v_template_and_no_placeholder_survives(tmp_path: Path) -> None:
    from e5v.prompts import load_prompt

    p = load_prompt("e5v_llama3")
    assert p.extra["mmeb"]["instruction"] == "drop"
    # VLM2Vec src/model/processor.py e5_v_prompt_template, image + text, with "a cat" as the text
    head = "<|start_header_id|>user<|end_header_id|>\n\n"
    tail = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n \n"
    assert p.render("mmeb_pair", "a cat") == head + "<image>\na cat\nSummary above image and text in one word: " + tail
    assert p.render("mmeb_text", "a cat") == head + "a cat\nSummary above sentence in one word: " + tail
    assert p.render("mmeb_image") == head + "<image>\nSummary above image in one word: " + tail
    # an item from the V1 layout: the placeholder is gone, Phi-3-V's prompt gets its own token exactly once
    v1_dataset(tmp_path)
    q = load_local_task(tmp_path, "ImageNet-1K").queries[0].query
    phi = load_prompt("e5v_phi3").render("mmeb_pair", item_text(q, "keep"))
    assert phi.count("<|image_1|>") == 1 and "Represent the given image for classification" in phi
    for name in ("e5v_llama3", "e5v_qwen2_vl", "none", "generic_llama3"):
        pr = load_prompt(name)
        assert "<|image_1|>" not in pr.render("mmeb_pair", item_text(q, "keep")).replace(pr.image_token, ""), name


def test_prompt_without_mmeb_node_is_a_clear_config_error(tmp_path: Path) -> None:
    from e5v.prompts import PromptSet

    v1_dataset(tmp_path)
    enc = FakeEncoder()
    enc.prompt = PromptSet.from_config({"name": "bare", "wrapper": "{body}", "bodies": {"text": "<sent>"}})  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="prompt config 'bare' has no 'mmeb:' node"):
        Mmeb("mmeb", tmp_path, tasks=["ImageNet-1K"]).embed(Context(encoder=enc, progress=False))
    from e5v.prompts import PromptConfigError

    with pytest.raises(PromptConfigError, match="node mmeb: pair = '<sent>' is missing placeholder"):
        PromptSet.from_config({"name": "x", "wrapper": "{body}", "bodies": {"text": "<sent>"},
                               "mmeb": {"instruction": "drop", "text": "<sent>", "image": "<image>", "pair": "<sent>"}})


def test_the_three_configs_compose_and_instantiate(tmp_path: Path) -> None:
    from e5v.config import compose
    from eval.benchmarks.mmeb import MmebV2Image
    from eval.runner import select_benchmarks

    ov = ["backbone=tiny", f"paths.data_dir={tmp_path}", "suite=paper", "+benchmark@benchmark.mmeb=mmeb",
          "+benchmark@benchmark.mmeb_v2_image=mmeb_v2_image", "+benchmark@benchmark.mmeb_visdoc=mmeb_visdoc",
          "benchmarks=[mmeb,mmeb_v2_image,mmeb_visdoc]"]
    b = select_benchmarks(compose("eval", ov))
    assert type(b["mmeb"]) is Mmeb and len(b["mmeb"].tasks) == 36 and b["mmeb"].root == tmp_path / "mmeb"
    assert type(b["mmeb_v2_image"]) is MmebV2Image and b["mmeb_v2_image"].image_dir == "image-tasks"
    assert type(b["mmeb_visdoc"]) is MmebVisDoc and len(b["mmeb_visdoc"].tasks) == 24
    assert b["mmeb_visdoc"].main_metric == "ndcg_linear@5"


def test_v2_instruct_with_e5v_prompt_drops_the_instruction_generic_keeps_it(tmp_path: Path) -> None:
    from e5v.prompts import load_prompt
    from eval.benchmarks.mmeb import MmebV2Image

    _png(tmp_path / "image-tasks" / "VQA" / "a.jpg", (1, 2, 3))
    write_v1(tmp_path, "OK-VQA", [{
        "qry_inst": "<|image_1|>\nRepresent the given image with the following question:", "qry_text": "What is it?",
        "qry_img_path": "VQA/a.jpg", "tgt_inst": "Represent the answer:", "tgt_text": ["a cat", "a dog"],
        "tgt_img_path": ["", ""]}], instruct=True)
    seen: dict[str, list[str]] = {}
    for name in ("e5v_llama3", "none"):
        enc = FakeEncoder()
        enc.prompt = load_prompt(name)  # type: ignore[attr-defined]
        texts: list[str] = []
        enc.rules["text"] = lambda t, texts=texts: texts.append(t)
        enc.rules["pair"] = lambda label, t, texts=texts: texts.append(t)
        MmebV2Image("m", tmp_path, tasks=["OK-VQA"]).embed(Context(encoder=enc, progress=False))
        seen[name] = sorted(texts)
    assert seen["e5v_llama3"] == ["What is it?", "a cat", "a dog"]
    assert seen["none"] == ["Represent the answer: a cat", "Represent the answer: a dog",
                            "Represent the given image with the following question: What is it?"]


def test_v2_and_visdoc_missing_data_point_at_root_not_a_make_target(tmp_path: Path) -> None:
    from eval.benchmarks.mmeb import MmebV2Image

    for bench in (MmebV2Image("m", tmp_path / "none"), MmebVisDoc("v", tmp_path / "none")):
        with pytest.raises(MissingDataError, match="Point the benchmark's `root` at your copy") as e:
            bench.check_data()
        assert "make data-" not in str(e.value)


def test_placeholder_removed_rest_of_the_text_as_stored() -> None:
    """VLM2Vec substitutes the model's image token for <|image_1|> and keeps the rest, trailing newline included
    (the token VLM2Vec pools): the loader removes the placeholder and the whitespace right after it only."""
    from eval.loaders.mmeb import strip_placeholder

    assert strip_placeholder("<|image_1|>\nRepresent the given image for classification\n") == (
        "Represent the given image for classification\n", True)
    assert strip_placeholder("Find a caption for the image\n") == ("Find a caption for the image\n", False)
    assert strip_placeholder("<|image_1|> Select the dog\n") == ("Select the dog\n", True)
