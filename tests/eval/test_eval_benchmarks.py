"""Benchmark logic with a fake encoder whose embeddings give hand-computed answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from e5v.mini.eval_data import generate
from eval.benchmarks.base import Context
from eval.benchmarks.cirr import Cirr
from eval.benchmarks.fashioniq import FashionIQ
from eval.benchmarks.retrieval import CaptionRetrieval
from eval.benchmarks.sts import Sts
from eval.loaders.cirr import load_cirr
from eval.loaders.fashioniq import load_fashioniq
from eval.loaders.senteval import load_sts
from eval.metrics import sts_spearman
from eval.render import CaptionRenderer, RenderSpec

from evalkit import SMALL, FakeEncoder


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("mini"), seed=5, **SMALL)


@pytest.fixture()
def karpathy3(tmp_path: Path) -> Path:
    """3 images x 2 captions in the Karpathy layout: captions aK (of image K) and bK."""
    (tmp_path / "flickr30k-images").mkdir()
    images = []
    for k in range(3):
        Image.new("RGB", (8, 8), (40 * k, 0, 0)).save(tmp_path / "flickr30k-images" / f"i{k}.jpg")
        images.append({"filename": f"i{k}.jpg", "split": "test", "sentences": [{"raw": f"a{k}"}, {"raw": f"b{k}"}]})
    images.append({"filename": "train.jpg", "split": "train", "sentences": [{"raw": "t"}]})
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    return tmp_path


def _one_hot(k: int, dim: int = 8) -> np.ndarray:
    v = np.zeros(dim, np.float32)
    v[k] = 1.0
    return v


def test_caption_retrieval_hand_computed(karpathy3: Path) -> None:
    # image iK -> e_K; caption aK -> e_K (right), bK -> e_(K+1)%3 (wrong image)
    enc = FakeEncoder(
        image=lambda label: _one_hot(int(label[1])),
        text=lambda t: _one_hot(int(t[1]) if t[0] == "a" else (int(t[1]) + 1) % 3),
    )
    bench = CaptionRetrieval(
        "flickr30k", karpathy3, annotation="dataset_flickr30k.json", image_dir="flickr30k-images", ks=(1, 2, 3)
    )
    res = bench.run(Context(encoder=enc))
    m = res.metrics
    # t2i: a* hit at 1; b0 -> image 0 at rank 2 (tie broken by index); b1, b2 at rank 3
    assert m["t2i_R@1"] == pytest.approx(50.0) and m["t2i_R@2"] == pytest.approx(200 / 3) and m["t2i_R@3"] == 100.0
    # i2t: image 0 finds a0 first; images 1 and 2 first see another image's b caption (lower index)
    assert m["i2t_R@1"] == pytest.approx(100 / 3) and m["i2t_R@2"] == 100.0
    assert res.info["n_images"] == 3 and res.info["n_captions"] == 6
    assert ("text", "text", None, 6) in enc.calls and ("image", "image", None, 3) in enc.calls


def test_i2i_renders_captions_and_uses_the_image_prompt(karpathy3: Path, tmp_path: Path) -> None:
    seen: list[str] = []

    def image_rule(label: str) -> np.ndarray:
        seen.append(label)
        if label.startswith("caption "):  # rendered caption number c (order a0 b0 a1 b1 a2 b2)
            c = int(label.split()[1])
            return _one_hot(c // 2)
        return _one_hot(int(label[1]))

    enc = FakeEncoder(image=image_rule)
    renderer = CaptionRenderer(RenderSpec(), tmp_path / "rendered")
    bench = CaptionRetrieval(
        "i2i_flickr30k", karpathy3, annotation="dataset_flickr30k.json", image_dir="flickr30k-images", render=True
    )
    res = bench.run(Context(encoder=enc, renderer_factory=lambda: renderer, progress=False))
    assert res.metrics["t2i_R@1"] == 100.0 and res.metrics["i2t_R@1"] == 100.0
    assert [c[:2] for c in enc.calls] == [("image", "image"), ("image", "image")]  # no text prompt at all
    assert len(list((tmp_path / "rendered").rglob("*.png"))) == 6
    assert res.info["render"]["font"].startswith("DejaVu Sans") and res.family == "i2i"


def test_cirr_removes_reference_and_writes_submission(mini: Path, tmp_path: Path) -> None:
    val = load_cirr(mini / "cirr", "val")
    target_of = {(q.reference, q.caption): q.target for q in val.queries}
    names = sorted(val.gallery_names)
    vec = {n: np.random.default_rng(i).standard_normal(256).astype(np.float32) for i, n in enumerate(names)}
    # query = 2 x reference + target: the reference would rank first if it were not removed
    enc = FakeEncoder(dim=256, image=lambda n: vec[n], pair=lambda ref, cap: 2 * vec[ref] + vec[target_of[(ref, cap)]])
    res = Cirr("cirr", mini / "cirr", split="val").run(Context(encoder=enc))
    assert res.metrics["R@1"] == 100.0 and res.metrics["R_subset@1"] == 100.0
    assert res.metrics["avg"] == 100.0 and res.info["n_query"] == len(val.queries)

    test1 = load_cirr(mini / "cirr", "test1")
    tvec = {
        n: np.random.default_rng(100 + i).standard_normal(16).astype(np.float32)
        for i, n in enumerate(test1.gallery_names)
    }
    enc = FakeEncoder(dim=16, image=lambda n: tvec[n], pair=lambda ref, cap: tvec[ref])
    res = Cirr("cirr_test1", mini / "cirr", split="test1", submission_top=50).run(
        Context(encoder=enc, output_dir=tmp_path)
    )
    assert res.metrics == {} and sorted(res.info["files"]) == [
        "cirr_test1_recall.json",
        "cirr_test1_recall_subset.json",
    ]
    recall = json.loads((tmp_path / "cirr_test1_recall.json").read_text())
    subset = json.loads((tmp_path / "cirr_test1_recall_subset.json").read_text())
    assert recall["version"] == "rc2" and recall["metric"] == "recall" and subset["metric"] == "recall_subset"
    for q in test1.queries:
        top = recall[str(q.pairid)]
        assert q.reference not in top and len(top) == min(50, len(test1.gallery_names) - 1)
        sub = subset[str(q.pairid)]
        assert len(sub) == 3 and set(sub) <= set(q.members) - {q.reference}


def test_fashioniq_sums_both_caption_orders(mini: Path) -> None:
    cats = ("dress", "toptee")
    data = {c: load_fashioniq(mini / "fashioniq", c) for c in cats}
    names = sorted({n for d in data.values() for n in d.gallery_names})
    vec = {n: np.random.default_rng(7 + i).standard_normal(24).astype(np.float32) for i, n in enumerate(names)}
    lookup = {}
    for d in data.values():
        for q in d.queries:
            decoy = next(n for n in d.gallery_names if n not in (q.target, q.candidate))
            c1, c2 = (c.strip(".?, ") for c in q.captions)
            lookup[(q.candidate, f"{c1}, {c2}")] = vec[q.target] + 10 * vec[decoy]  # forward order: decoy wins
            lookup[(q.candidate, f"{c2}, {c1}")] = 2 * vec[q.target] - 10 * vec[decoy]  # reverse cancels it

    enc = FakeEncoder(dim=24, image=lambda n: vec[n], pair=lambda cand, text: lookup[(cand, text)])
    both = FashionIQ("fashioniq", mini / "fashioniq", categories=cats, ks=(1, 10)).run(Context(encoder=enc))
    assert both.metrics["dress_R@1"] == 100.0 and both.metrics["toptee_R@1"] == 100.0
    assert both.metrics["avg_R@1"] == 100.0 and set(both.metrics) == {
        f"{c}_R@{k}" for c in (*cats, "avg") for k in (1, 10)
    }
    assert {c[1:3] for c in enc.calls if c[0] == "pair"} == {
        ("fashioniq_query", "dress"),
        ("fashioniq_query", "toptee"),
    }
    one = FashionIQ("fashioniq", mini / "fashioniq", categories=cats, ks=(1,), both_orders=False).run(
        Context(encoder=enc)
    )
    assert one.metrics["avg_R@1"] == 0.0


def test_sts_uses_the_all_setting(mini: Path) -> None:
    rng_vec = {}

    def sts_rule(s: str) -> np.ndarray:
        if s not in rng_vec:
            rng_vec[s] = np.random.default_rng(len(rng_vec)).standard_normal(6).astype(np.float32) * 3
        return rng_vec[s]

    enc = FakeEncoder(dim=6, sts=sts_rule)
    res = Sts("sts", mini / "senteval", tasks=["STS12", "SICKRelatedness"]).run(Context(encoder=enc))
    pairs = load_sts(mini / "senteval", "STS12")
    a = np.stack([sts_rule(s) for s in pairs.sent_a])
    b = np.stack([sts_rule(s) for s in pairs.sent_b])
    assert res.metrics["STS12"] == pytest.approx(sts_spearman(a, b, pairs.gold))
    per_subset = []
    for sub in sorted(set(pairs.subset)):
        idx = [i for i, s in enumerate(pairs.subset) if s == sub]
        per_subset.append(sts_spearman(a[idx], b[idx], np.asarray(pairs.gold)[idx]))
    assert res.metrics["STS12"] != pytest.approx(float(np.mean(per_subset)))
    assert res.metrics["avg"] == pytest.approx((res.metrics["STS12"] + res.metrics["SICKRelatedness"]) / 2)
    assert res.info["n_pairs"]["STS12"] == len(pairs)


def test_unknown_options_are_rejected(mini: Path) -> None:
    with pytest.raises(TypeError, match="unknown option"):
        Sts("sts", mini / "senteval", taks=["STS12"])
    with pytest.raises(ValueError, match="tasks must be"):
        Sts("sts", mini / "senteval", tasks=["STS17"])
