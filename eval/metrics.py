"""Evaluation metrics: pure functions on score matrices and index results (no model inside).

Conventions (documented once, used everywhere):

* Recall values are percentages (x100), as the paper reports them.
* A ranking is a descending sort by score with ties broken by the LOWER gallery index
  (a stable sort of ``-scores``). :func:`eval.index.search` returns FAISS results in the same order,
  so dense and index-based rankings agree.
* Retrieval R@k (CLIP_benchmark semantics) is the fraction of queries with AT LEAST ONE positive in
  the top k: text-to-image has one positive per caption, image-to-text counts a hit when any of the
  image's captions is in the top k.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def stable_ranking(scores: np.ndarray, k: int | None = None) -> np.ndarray:
    """Gallery indices in descending score order per row, ties broken by lower index. (nq, k) int64."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (n_query, n_gallery), got shape {scores.shape}")
    order = np.argsort(-scores, axis=1, kind="stable")
    return order if k is None else order[:, :k]


def _check_ks(ks: Iterable[int]) -> list[int]:
    out = [int(k) for k in ks]
    if not out or any(k < 1 for k in out):
        raise ValueError(f"ks must be positive integers, got {list(ks)}")
    return out


def first_hit_rank(ranked: np.ndarray, positives: Sequence[Iterable[int]] | np.ndarray) -> np.ndarray:
    """0-based position of the first positive in each ranked row; ``len(row)`` when none is present.

    ``ranked``: (nq, k) gallery indices (``-1`` = empty slot, as FAISS pads). ``positives``: a bool
    matrix (nq, n_gallery) or one iterable of positive gallery indices per query.
    """
    ranked = np.asarray(ranked)
    if ranked.ndim != 2:
        raise ValueError(f"ranked must be 2-D (n_query, k), got shape {ranked.shape}")
    nq, k = ranked.shape
    if isinstance(positives, np.ndarray) and positives.dtype == bool:
        if positives.ndim != 2 or positives.shape[0] != nq:
            raise ValueError(f"positives must have shape ({nq}, n_gallery), got {positives.shape}")
        safe = np.where(ranked < 0, 0, ranked)
        hits = np.take_along_axis(positives, safe, axis=1) & (ranked >= 0)
        no_pos = ~positives.any(axis=1)
    else:
        if len(positives) != nq:
            raise ValueError(f"{len(positives)} positive sets for {nq} queries")
        sets = [set(int(p) for p in ps) for ps in positives]
        hits = np.array([[int(g) in s for g in row] for row, s in zip(ranked, sets)], dtype=bool).reshape(nq, k)
        no_pos = np.array([not s for s in sets], dtype=bool)
    if no_pos.any():
        raise ValueError(
            f"query row(s) {np.flatnonzero(no_pos)[:10].tolist()} have no positive: recall is undefined; "
            "drop those queries or fix the annotations"
        )
    return np.where(hits.any(axis=1), hits.argmax(axis=1), k)


def ranked_recall(
    ranked: np.ndarray, positives: Sequence[Iterable[int]] | np.ndarray, ks: Iterable[int]
) -> dict[str, float]:
    """R@k (x100) from index results: ``ranked`` (nq, K) gallery indices with K >= max(ks)."""
    ks = _check_ks(ks)
    ranked = np.asarray(ranked)
    if ranked.shape[1] < max(ks):
        raise ValueError(f"ranked lists hold {ranked.shape[1]} items but R@{max(ks)} was asked for")
    first = first_hit_rank(ranked, positives)
    return {f"R@{k}": float(100.0 * np.mean(first < k)) for k in ks}


def retrieval_recall(scores: np.ndarray, positives: np.ndarray, ks: Iterable[int]) -> dict[str, float]:
    """R@k (x100) on a dense score matrix.

    Args:
        scores: (n_query, n_gallery) similarities.
        positives: bool (n_query, n_gallery), True where the gallery item is a correct answer.
            Several True per row are allowed (image-to-text: all captions of the image).
        ks: cut-offs, e.g. (1, 5, 10).
    Returns:
        ``{"R@1": ..., "R@5": ..., ...}`` in percent.
    """
    scores = np.asarray(scores)
    positives = np.asarray(positives, dtype=bool)
    if scores.shape != positives.shape:
        raise ValueError(f"scores {scores.shape} and positives {positives.shape} must have the same shape")
    ks = _check_ks(ks)
    kmax = min(max(ks), scores.shape[1])
    ranked = stable_ranking(scores, kmax)
    first = first_hit_rank(ranked, positives)
    return {f"R@{k}": float(100.0 * np.mean(first < k)) for k in ks}


def cirr_recall(
    ranked_names: Sequence[Sequence[str]],
    reference_names: Sequence[str],
    target_names: Sequence[str],
    group_members: Sequence[Iterable[str]],
    ks: Iterable[int] = (1, 5, 10, 50),
    subset_ks: Iterable[int] = (1, 2, 3),
    subset_ranked_names: Sequence[Sequence[str]] | None = None,
) -> dict[str, float]:
    """CIRR Recall@k and Recall_subset@k (x100).

    The reference image is removed from its own ranking. ``R@k``: the target is in the first k of the
    remaining gallery. ``R_subset@k``: the ranking restricted to the query's ``img_set`` members minus
    the reference (order kept) has the target in its first k.

    ``ranked_names``: per query, gallery names best first (the full ranking, or at least the top
    ``max(ks) + 1``). ``subset_ranked_names``: the ranking used for the subset (default: the same);
    it must contain every member of the query's group.
    """
    ks, subset_ks = _check_ks(ks), (_check_ks(subset_ks) if list(subset_ks) else [])
    n = len(ranked_names)
    for name, seq in (
        ("reference_names", reference_names),
        ("target_names", target_names),
        ("group_members", group_members),
    ):
        if len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries for {n} queries")
    subset_src = ranked_names if subset_ranked_names is None else subset_ranked_names
    hits = {k: 0 for k in ks}
    sub_hits = {k: 0 for k in subset_ks}
    for q in range(n):
        ref, tgt = reference_names[q], target_names[q]
        if tgt == ref:
            raise ValueError(f"query {q}: the target {tgt!r} is the reference image itself")
        kept = [g for g in ranked_names[q] if g != ref]
        pos = kept.index(tgt) if tgt in kept else len(kept)
        for k in ks:
            hits[k] += pos < k
        if subset_ks:
            members = set(group_members[q]) - {ref}
            if tgt not in members:
                raise ValueError(f"query {q}: target {tgt!r} is not in its img_set members {sorted(members)}")
            sub = [g for g in subset_src[q] if g in members]
            if len(sub) != len(members):
                missing = sorted(members - set(sub))
                raise ValueError(
                    f"query {q}: group member(s) {missing} are missing from the ranking; pass a full ranking "
                    "(or subset_ranked_names) for Recall_subset"
                )
            spos = sub.index(tgt)
            for k in subset_ks:
                sub_hits[k] += spos < k
    out = {f"R@{k}": 100.0 * hits[k] / n for k in ks}
    out.update({f"R_subset@{k}": 100.0 * sub_hits[k] / n for k in subset_ks})
    return out


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (n, d) arrays (float64)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"emb_a {a.shape} and emb_b {b.shape} must be two (n, d) arrays of one shape")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    if (na == 0).any() or (nb == 0).any():
        raise ValueError("an embedding has zero norm: cosine similarity is undefined")
    return (a * b).sum(axis=1) / (na * nb)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (``scipy.stats.spearmanr``: Pearson correlation of ranks, ties sharing their average
    rank); NaN when either side is constant (without scipy's warning)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(spearmanr(x, y).statistic)


def sts_spearman(emb_a: np.ndarray, emb_b: np.ndarray, gold: Sequence[float] | np.ndarray) -> float:
    """Spearman correlation (x100) between cos(emb_a[i], emb_b[i]) and the gold scores.

    For the STS12-16 "all" setting, concatenate every subset's pairs first and call this once.
    """
    gold = np.asarray(gold, dtype=np.float64)
    cos = cosine_rows(emb_a, emb_b)
    if gold.shape != (cos.shape[0],):
        raise ValueError(f"gold has shape {gold.shape} for {cos.shape[0]} pairs")
    if cos.shape[0] < 2:
        raise ValueError("Spearman correlation needs at least 2 pairs")
    return 100.0 * spearman(cos, gold)


def mean_metric(values: Mapping[str, float] | Iterable[float]) -> float:
    vals = list(values.values()) if isinstance(values, Mapping) else list(values)
    if not vals:
        raise ValueError("mean of no values")
    return float(np.mean(vals))


def _check_k(k: int) -> int:
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return int(k)


def chance_recall(k: int, n_gallery: int) -> float:
    """Expected R@k (x100) of a random ranking when each query has ONE positive among ``n_gallery`` items."""
    k = _check_k(k)
    if n_gallery < 1:
        raise ValueError(f"n_gallery must be >= 1, got {n_gallery}")
    return 100.0 * min(k, n_gallery) / n_gallery


def chance_recall_any(k: int, n_gallery: int, positives: Mapping[int | str, int]) -> float:
    """Expected R@k (x100) of a random ranking when a hit is ANY of a query's positives in the top k
    (image-to-text: every caption of the image). ``positives``: {positives per query: number of queries},
    e.g. ``{5: 990, 6: 10}``; keys may be strings (as in results.json)."""
    from math import comb

    k = _check_k(k)
    total = 0.0
    for c, n in positives.items():
        c = int(c)
        miss = comb(n_gallery - c, k) / comb(n_gallery, k) if n_gallery - c >= k else 0.0
        total += int(n) * (1.0 - miss)
    return 100.0 * total / sum(int(n) for n in positives.values())


# Random embeddings: cosine scores independent of the gold scores, Spearman's rho 0 in expectation.
CHANCE_SPEARMAN = 0.0
