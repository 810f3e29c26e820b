"""MMEB metrics: pure functions, no model inside (the benchmark is :mod:`eval.benchmarks.mmeb`).

Two protocols, as VLM2Vec scores them (TIGER-AI-Lab/VLM2Vec; checked against its code, not copied):

* **local** (MMEB-V1 and the V2 image tasks): each query is scored against its OWN candidate list, the
  ground truth at index 0. V1 ``eval.py`` (+ ``evaluation/eval_utils.get_pred``) takes ``np.argmax`` over
  the candidate scores and counts a hit when it is 0. ``np.argmax`` returns the FIRST index among equal
  maxima, so **a tie with the ground truth counts as a hit** (also a duplicate of the ground truth further
  down the list: same embedding, same score, index 0 wins). :func:`local_hit_at_1` follows that rule
  exactly. Values: fractions in [0, 1] here; the benchmark reports them x100 (house convention) and
  writes fractions into the leaderboard-style score file.
* **global** (V2 visual documents, BEIR layout): the query ranks the whole de-duplicated corpus; graded
  qrels (only grades > 0 kept, the larger grade of a repeated pair: VLM2Vec ``load_qrels_mapping``);
  ``ndcg_linear@k`` = DCG with gain ``rel / log2(i + 2)`` over the top k, divided by the DCG of the k
  largest grades (VLM2Vec ``src/utils/eval_utils/metrics.py``, ``RankingMetrics.ndcg_at_k``,
  ``form="linear"``); a query whose ideal DCG is 0 scores 0.

One difference, on purpose: VLM2Vec's ``RankingMetrics.evaluate`` de-duplicates a query's labels with
``list(set(labels))`` and then zips them with the grades in their ORIGINAL order, so for a query whose
relevant documents carry different grades the grade-to-document pairing depends on Python's string-hash
seed. :func:`ndcg_at_k` pairs each document with its own grade. The two agree whenever a query's relevant
documents all share one grade (binary qrels: ViDoRe v1, VisRAG), and for every query with one relevant
document.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def local_prediction(scores: Sequence[float] | np.ndarray) -> int:
    """Index of the predicted candidate: ``np.argmax`` (the first of equal maxima), as VLM2Vec V1."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"a query's candidate scores must be a non-empty 1-D array, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("candidate scores contain NaN/inf")
    return int(np.argmax(s))


def local_hit_at_1(score_lists: Sequence[Sequence[float] | np.ndarray]) -> float:
    """Hit@1 (= precision@1, V1's ``acc``) as a fraction: share of queries whose argmax is candidate 0."""
    if not score_lists:
        raise ValueError("no queries")
    return float(np.mean([local_prediction(s) == 0 for s in score_lists]))


def local_chance(n_candidates: Sequence[int]) -> float:
    """Expected local Hit@1 (fraction) for random embeddings: mean of 1/n over the queries' list sizes
    (continuous random scores never tie)."""
    if not n_candidates:
        raise ValueError("no queries")
    if min(n_candidates) < 1:
        raise ValueError("a query has an empty candidate list")
    return float(np.mean([1.0 / n for n in n_candidates]))


def dcg(gains: Sequence[float]) -> float:
    """Linear DCG: sum of ``g / log2(i + 2)`` over positions i = 0, 1, ..."""
    return float(sum(g / math.log2(i + 2) for i, g in enumerate(gains)))


def ndcg_at_k(ranked: Sequence[str], qrels: Mapping[str, float], k: int) -> float:
    """``ndcg_linear@k`` of one query: ``ranked`` document ids (best first), ``qrels`` {doc id: grade}."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rel = {d: float(g) for d, g in qrels.items() if g > 0}
    got = dcg([rel.get(d, 0.0) for d in list(ranked)[:k]])
    ideal = dcg(sorted(rel.values(), reverse=True)[:k])
    return got / ideal if ideal > 0 else 0.0


def hit_at_k(ranked: Sequence[str], qrels: Mapping[str, float], k: int) -> float:
    """1.0 when any document with a grade > 0 is in the top k, else 0.0 (VLM2Vec ``hit_at_k``)."""
    rel = {d for d, g in qrels.items() if g > 0}
    return 1.0 if rel and any(d in rel for d in list(ranked)[:k]) else 0.0


def global_scores(rankings: Sequence[Sequence[str]], qrels: Sequence[Mapping[str, float]],
                  ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Mean ``ndcg_linear@k`` and ``hit@k`` (fractions) over queries, VLM2Vec's key names."""
    if len(rankings) != len(qrels):
        raise ValueError(f"{len(rankings)} rankings for {len(qrels)} queries")
    if not rankings:
        raise ValueError("no queries")
    out: dict[str, float] = {}
    for k in ks:
        out[f"hit@{k}"] = float(np.mean([hit_at_k(r, q, k) for r, q in zip(rankings, qrels)]))
        out[f"ndcg_linear@{k}"] = float(np.mean([ndcg_at_k(r, q, k) for r, q in zip(rankings, qrels)]))
    return out


def random_ndcg_at_k(qrels: Mapping[str, float], n_corpus: int, k: int) -> float:
    """Expected ``ndcg_linear@k`` of one query under a uniformly random ranking of ``n_corpus`` documents:
    each position i < k holds a given document with probability 1/n, so E[DCG] = mean grade over the corpus
    (non-relevant = 0) times sum_{i<min(k,n)} 1/log2(i+2)."""
    rel = [float(g) for g in qrels.values() if g > 0]
    ideal = dcg(sorted(rel, reverse=True)[:k])
    if ideal == 0 or n_corpus < 1:
        return 0.0
    discount = sum(1.0 / math.log2(i + 2) for i in range(min(k, n_corpus)))
    return (sum(rel) / n_corpus) * discount / ideal


def mean(values: Sequence[float]) -> float:
    """Unweighted mean (MMEB averages tasks, not queries), NaN-free input required."""
    if not values:
        raise ValueError("nothing to average")
    return float(sum(values) / len(values))
