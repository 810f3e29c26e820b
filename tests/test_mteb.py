"""mteb interoperability: our encoder runs mteb tasks built from local data (no network)."""

from __future__ import annotations

import numpy as np
import pytest

mteb = pytest.importorskip("mteb")


def _local_sts_task(pairs: list[tuple[str, str, float]]) -> object:
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata

    class MiniWorldSTS(AbsTaskSTS):
        metadata = TaskMetadata(
            name="MiniWorldSTS",
            description="Graded mini-world sentence pairs (local, generated).",
            reference=None,
            dataset={"path": "local/mini-world-sts", "revision": "1"},
            type="STS",
            category="t2t",
            modalities=["text"],
            eval_splits=["test"],
            eval_langs=["eng-Latn"],
            main_score="cosine_spearman",
            date=("2026-01-01", "2026-01-01"),
            domains=[],
            task_subtypes=[],
            license="cc-by-4.0",
            annotations_creators="derived",
            dialect=[],
            sample_creation="created",
            bibtex_citation="",
        )
        min_score = 0
        max_score = 5

        def load_data(self, num_proc: int | None = None, **kwargs: object) -> None:
            self.dataset = DatasetDict({"test": Dataset.from_dict({
                "sentence1": [p[0] for p in pairs], "sentence2": [p[1] for p in pairs],
                "score": [p[2] for p in pairs]})})
            self.data_loaded = True

    return MiniWorldSTS()


def test_mteb_sts_on_local_task_matches_our_protocol(embedder, tmp_path) -> None:
    from scipy.stats import spearmanr

    from e5v.data.mini_world import sts_pairs
    from e5v.integrations.mteb_encoder import E5VEncoder

    pairs = sts_pairs(40, seed=7)
    model = E5VEncoder("tiny", embedder=embedder)
    res = mteb.evaluate(model, _local_sts_task(pairs), cache=None)
    score = res.task_results[0].scores["test"][0]["cosine_spearman"]
    a = embedder.encode_sts([p[0] for p in pairs])
    b = embedder.encode_sts([p[1] for p in pairs])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    ours = spearmanr(cos, [p[2] for p in pairs]).statistic
    assert score == pytest.approx(ours, abs=1e-4)


def test_mteb_image_text_retrieval_mock_task(embedder) -> None:
    from mteb.mocks.mock_tasks import MockAny2AnyRetrievalT2ITask

    from e5v.integrations.mteb_encoder import E5VEncoder

    res = mteb.evaluate(E5VEncoder("tiny", embedder=embedder), MockAny2AnyRetrievalT2ITask(), cache=None)
    scores = res.task_results[0].scores["test"][0]
    assert 0.0 <= scores["main_score"] <= 1.0 and "ndcg_at_10" in scores
