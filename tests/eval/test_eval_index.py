"""FAISS search: exact ranking equals dense matmul + sort; approximate indexes report their recall."""

from __future__ import annotations

import numpy as np
import pytest

from eval.index import IndexSpec, approx_recall, build_index, rank, search
from eval.metrics import ranked_recall, retrieval_recall, stable_ranking


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_faiss_equals_matmul_and_sort() -> None:
    rng = np.random.default_rng(0)
    q, g = _unit(rng, 50, 16), _unit(rng, 300, 16)
    res = rank(q, g, k=300)
    dense = stable_ranking(q @ g.T)
    np.testing.assert_array_equal(res.ids, dense)
    np.testing.assert_allclose(res.scores, np.take_along_axis(q @ g.T, dense, 1), atol=1e-5)
    assert res.recall_vs_exact is None and res.spec["kind"] == "exact"
    positives = rng.random((50, 300)) < 0.02
    positives[np.arange(50), rng.integers(0, 300, 50)] = True
    ks = (1, 5, 10)
    assert ranked_recall(rank(q, g, 10).ids, positives, ks) == retrieval_recall(q @ g.T, positives, ks)


def test_exact_search_orders_ties_by_gallery_index() -> None:
    g = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], np.float32)
    q = np.array([[1.0, 0.0]], np.float32)
    scores, ids = search(build_index(g, IndexSpec()), q, 4)
    assert ids.tolist() == [[0, 2, 3, 1]]
    assert scores[0, :3].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_pq", "hnsw"])
def test_approximate_indexes_report_recall_against_exact(kind: str) -> None:
    rng = np.random.default_rng(1)
    g = _unit(rng, 2000, 32)
    q = g[:100] + 0.05 * _unit(rng, 100, 32)
    spec = IndexSpec(kind=kind, nlist=16, nprobe=16, pq_m=8, hnsw_m=16, check_k=10)
    res = rank(q, g, k=10, spec=spec)
    assert res.ids.shape == (100, 10)
    assert res.recall_vs_exact is not None and 0.0 <= res.recall_vs_exact <= 100.0
    if kind != "ivf_pq":  # full vectors: near-exact at these settings
        assert res.recall_vs_exact > 90.0
    assert (res.ids[:, 0] == np.arange(100)).mean() > 0.8  # the perturbed item finds its source


def test_small_gallery_clamps_and_spec_validation() -> None:
    rng = np.random.default_rng(2)
    g = _unit(rng, 20, 12)
    res = rank(g, g, k=5, spec=IndexSpec(kind="ivf_pq", nlist=1024, pq_m=64, pq_nbits=8))
    assert res.ids.shape == (20, 5)
    with pytest.raises(ValueError, match="index.kind"):
        IndexSpec(kind="annoy")
    with pytest.raises(ValueError, match="unknown index option"):
        IndexSpec.from_config({"kind": "exact", "nprobes": 3})
    with pytest.raises(ValueError, match="NaN"):
        build_index(np.full((2, 2), np.nan, np.float32), IndexSpec())
    assert approx_recall(np.array([[1, 2]]), np.array([[2, 3]])) == 50.0
