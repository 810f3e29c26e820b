"""Metrics against hand-computed answers: multi-caption retrieval, ties, CIRR, STS 'all'."""

from __future__ import annotations

import numpy as np
import pytest

from eval.metrics import (
    cirr_recall,
    first_hit_rank,
    ranked_recall,
    retrieval_recall,
    spearman,
    stable_ranking,
    sts_spearman,
)

# 2 images, 4 captions: captions 0,1 belong to image 0; captions 2,3 to image 1.
CAPTION_IMAGE = np.array([0, 0, 1, 1])


def test_image_to_text_counts_any_caption() -> None:
    scores = np.array(
        [
            [0.1, 0.9, 0.8, 0.2],  # image 0: caption 1 (its own) ranks first -> hit at 1
            [0.7, 0.6, 0.1, 0.5],  # image 1: c0, c1, c3, c2 -> first own caption (c3) at position 3
        ]
    )
    positives = CAPTION_IMAGE[None, :] == np.arange(2)[:, None]
    r = retrieval_recall(scores, positives, ks=(1, 2, 3))
    assert r == {"R@1": 50.0, "R@2": 50.0, "R@3": 100.0}


def test_text_to_image_one_positive_per_caption() -> None:
    scores = np.array([[0.9, 0.1], [0.2, 0.3], [0.4, 0.5], [0.6, 0.1]])  # (captions, images)
    positives = CAPTION_IMAGE[:, None] == np.arange(2)[None, :]
    r = retrieval_recall(scores, positives, ks=(1, 2))
    # caption 0 -> img0 hit; caption 1 -> img1 ranked first (miss); caption 2 -> img1 hit; caption 3 -> img0 miss
    assert r == {"R@1": 50.0, "R@2": 100.0}


def test_ties_break_by_lower_gallery_index() -> None:
    scores = np.array([[0.5, 0.5, 0.1], [0.5, 0.5, 0.1]])
    positives = np.array([[False, True, False], [True, False, False]])
    assert retrieval_recall(scores, positives, ks=(1, 2)) == {"R@1": 50.0, "R@2": 100.0}
    assert stable_ranking(scores).tolist() == [[0, 1, 2], [0, 1, 2]]


def test_ranked_recall_with_index_padding_and_sets() -> None:
    ranked = np.array([[3, 1, -1], [2, -1, -1]])  # FAISS pads missing results with -1
    r = ranked_recall(ranked, [{1}, {0, 5}], ks=(1, 2, 3))
    assert r == {"R@1": 0.0, "R@2": 50.0, "R@3": 50.0}
    assert first_hit_rank(ranked, [{3}, {2}]).tolist() == [0, 0]


def test_recall_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="no positive"):
        retrieval_recall(np.zeros((2, 2)), np.array([[True, False], [False, False]]), ks=(1,))
    with pytest.raises(ValueError, match="same shape"):
        retrieval_recall(np.zeros((2, 2)), np.zeros((2, 3), bool), ks=(1,))
    with pytest.raises(ValueError, match="ks"):
        retrieval_recall(np.zeros((1, 1)), np.ones((1, 1), bool), ks=(0,))


def test_cirr_reference_removal_and_subset() -> None:
    ranked = [list("abcde"), list("ebacd"), list("cabed")]
    refs = ["a", "b", "c"]
    targets = ["c", "e", "d"]
    groups = [list("acd"), list("bde"), list("cad")]
    r = cirr_recall(ranked, refs, targets, groups, ks=(1, 2, 4), subset_ks=(1, 2))
    # q0: [b c d e] -> target at 2; q1: [e a c d] -> 1; q2: [a b e d] -> 4 (without removal it would be 5th)
    # subsets: q0 [c d] -> 1; q1 [e d] -> 1; q2 [a d] -> 2
    assert r["R@1"] == pytest.approx(100 / 3)
    assert r["R@2"] == pytest.approx(200 / 3)
    assert r["R@4"] == pytest.approx(100.0)
    assert r["R_subset@1"] == pytest.approx(200 / 3)
    assert r["R_subset@2"] == pytest.approx(100.0)


def test_cirr_subset_needs_every_member_and_a_valid_target() -> None:
    with pytest.raises(ValueError, match="missing from the ranking"):
        cirr_recall([["a", "b"]], ["a"], ["b"], [["a", "b", "z"]], ks=(1,), subset_ks=(1,))
    with pytest.raises(ValueError, match="not in its img_set"):
        cirr_recall([["a", "b", "c"]], ["a"], ["c"], [["a", "b"]], ks=(1,), subset_ks=(1,))
    with pytest.raises(ValueError, match="reference image itself"):
        cirr_recall([["a", "b"]], ["a"], ["a"], [["a", "b"]], ks=(1,), subset_ks=())


def _pairs_with_cosines(cos: list[float]) -> tuple[np.ndarray, np.ndarray]:
    th = np.arccos(np.asarray(cos))
    a = np.stack([np.ones_like(th), np.zeros_like(th)], 1) * 3.0  # raw (unnormalised) embeddings
    b = np.stack([np.cos(th), np.sin(th)], 1) * 0.5
    return a, b


def test_sts_all_setting_concatenates_subsets() -> None:
    cos_a, gold_a = [0.1, 0.2, 0.3], [1, 2, 3]  # rho = 1
    cos_b, gold_b = [0.4, 0.5, 0.6], [1, 3, 2]  # rho = 0.5
    a1, b1 = _pairs_with_cosines(cos_a)
    a2, b2 = _pairs_with_cosines(cos_b)
    assert sts_spearman(a1, b1, gold_a) == pytest.approx(100.0)
    assert sts_spearman(a2, b2, gold_b) == pytest.approx(50.0)
    # "all": one Spearman over the 6 concatenated pairs; gold ties get average ranks
    # gold ranks [1.5 3.5 5.5 1.5 5.5 3.5] vs 1..6 -> rho = 6 / sqrt(17.5 * 16)
    rho_all = sts_spearman(np.vstack([a1, a2]), np.vstack([b1, b2]), gold_a + gold_b)
    assert rho_all == pytest.approx(100 * 6 / np.sqrt(17.5 * 16))
    assert rho_all != pytest.approx(75.0)  # not the mean of the subsets


def test_spearman_matches_scipy_with_ties() -> None:
    from scipy.stats import rankdata, spearmanr

    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 200).astype(float)
    y = x + rng.integers(0, 3, 200)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    # the ranks spearman() correlates (scipy's): ties share their average
    assert rankdata(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert np.isnan(spearman(np.ones(4), np.arange(4.0)))


def test_chance_level_matches_random_scores(tmp_path) -> None:
    """The analytic chance level equals the mean R@k of random score matrices (Monte Carlo, 4,000 draws).
    Each benchmark owns its metrics' chance levels (``Benchmark.chance``, on the helpers of eval.metrics)."""
    from eval.benchmarks.cirr import Cirr
    from eval.benchmarks.fashioniq import FashionIQ
    from eval.benchmarks.retrieval import CaptionRetrieval
    from eval.benchmarks.sts import Sts
    from eval.metrics import chance_recall, chance_recall_any

    rng = np.random.default_rng(0)
    counts = [5, 5, 6, 7, 5, 6, 5, 7, 5, 5]  # captions per image (mini world: 5-7)
    caption_image = np.repeat(np.arange(len(counts)), counts)
    n_img, n_cap = len(counts), len(caption_image)
    info = {"n_images": n_img, "n_captions": n_cap,
            "captions_per_image": {str(c): counts.count(c) for c in sorted(set(counts))}}
    t2i_pos = caption_image[:, None] == np.arange(n_img)[None, :]
    i2t_pos = t2i_pos.T
    t2i, i2t = [], []
    for _ in range(4000):
        s = rng.random((n_cap, n_img))
        t2i.append(retrieval_recall(s, t2i_pos, [5])["R@5"])
        i2t.append(retrieval_recall(s.T, i2t_pos, [5])["R@5"])
    flickr = CaptionRetrieval("flickr30k", tmp_path)
    assert flickr.chance("t2i_R@5", info) == pytest.approx(np.mean(t2i), abs=0.5)
    assert flickr.chance("i2t_R@5", info) == pytest.approx(np.mean(i2t), abs=0.5)
    assert flickr.chance("t2i_R@5", info) == chance_recall(5, n_img)
    assert flickr.chance("i2t_R@5", info) == chance_recall_any(5, n_cap, info["captions_per_image"])
    # without the histogram the mean count is used: close, not exact
    rough = flickr.chance("i2t_R@5", {"n_images": n_img, "n_captions": n_cap})
    assert abs(rough - flickr.chance("i2t_R@5", info)) < 3
    assert Cirr("cirr", tmp_path).chance("R@5", {"n_gallery": 11}) == pytest.approx(50.0)
    fiq_info = {"dress": {"n_gallery": 20}, "shirt": {"n_gallery": 40}}
    assert FashionIQ("fashioniq", tmp_path).chance("avg_R@10", fiq_info) == pytest.approx(37.5)
    assert Sts("sts", tmp_path).chance("STS12", {}) == 0.0 and Sts("sts", tmp_path).chance("avg", {}) == 0.0
    with pytest.raises(ValueError, match="k must be"):
        flickr.chance("t2i_R@0", info)
    with pytest.raises(ValueError, match="k must be"):
        chance_recall(0, n_img)
    with pytest.raises(ValueError, match="no metric 'vqa_R@5'"):
        flickr.chance("vqa_R@5", {})
