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

    from e5v.mini.world import sts_pairs
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


class _Spy:
    """An Embedder proxy that records each encode call: (kind, number of inputs, batch_size)."""

    def __init__(self, inner) -> None:  # noqa: ANN001
        self.inner = inner
        self.calls: list[tuple[str, int, object]] = []

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.inner, name)

    def _rec(self, kind: str, n: int, kw: dict) -> None:
        self.calls.append((kind, n, kw.get("batch_size")))

    def encode_text(self, texts, **kw):  # noqa: ANN001, ANN201
        self._rec("text", len(texts), kw)
        return self.inner.encode_text(texts, **kw)

    def encode_sts(self, texts, **kw):  # noqa: ANN001, ANN201
        self._rec("sts", len(texts), kw)
        return self.inner.encode_sts(texts, **kw)

    def encode_image(self, images, **kw):  # noqa: ANN001, ANN201
        self._rec("image", len(images), kw)
        return self.inner.encode_image(images, **kw)

    def encode_interleaved(self, pairs, **kw):  # noqa: ANN001, ANN201
        self._rec("pair", len(pairs), kw)
        return self.inner.encode_interleaved(pairs, **kw)


def _retrieval_meta() -> object:
    from types import SimpleNamespace

    return SimpleNamespace(type="Any2AnyRetrieval", name="Mock")


def test_encode_streams_images_per_batch_and_honours_batch_size(embedder) -> None:
    from conftest import make_image
    from e5v.integrations.mteb_encoder import E5VEncoder

    spy = _Spy(embedder)
    enc = E5VEncoder("tiny", embedder=spy)
    imgs = [make_image(20 + 7 * i, 30, seed=i) for i in range(7)]
    batches = [{"image": imgs[0:3]}, {"image": imgs[3:6]}, {"image": imgs[6:7]}]
    out = enc.encode(iter(batches), task_metadata=_retrieval_meta(), hf_split="test", hf_subset="default",
                     batch_size=2)
    assert spy.calls == [("image", 3, 2), ("image", 3, 2), ("image", 1, 2)]  # one call per mteb batch
    np.testing.assert_allclose(out, embedder.encode_image(imgs), atol=1e-5)


def test_encode_routes_rows_and_keeps_order(embedder) -> None:
    from conftest import make_image
    from e5v.integrations.mteb_encoder import E5VEncoder

    spy = _Spy(embedder)
    enc = E5VEncoder("tiny", embedder=spy)
    a, b = make_image(32, 32, seed=1), make_image(40, 24, seed=2)
    batches = [{"text": ["red", "a cat", "blue"], "image": [a, None, b]}, {"text": ["a dog"]}]
    out = enc.encode(batches, task_metadata=_retrieval_meta(), hf_split="test", hf_subset="default", batch_size=5)
    assert sorted(spy.calls) == [("pair", 2, 5), ("text", 2, 5)]
    pairs = embedder.encode_interleaved([(a, "red"), (b, "blue")], template="cirr_query")
    texts = embedder.encode_text(["a cat", "a dog"])
    np.testing.assert_allclose(out, np.stack([pairs[0], texts[0], pairs[1], texts[1]]), atol=1e-5)


def _perturbed(embedder):  # noqa: ANN001, ANN202
    """Same architecture, other weights (the final norm rescaled): a second checkpoint."""
    import copy
    import dataclasses

    import torch

    from e5v import Embedder

    model = copy.deepcopy(embedder.backbone.model)
    name, weight = [(n, p) for n, p in model.named_parameters() if n.endswith("norm.weight")][-1]
    with torch.no_grad():
        weight.mul_(torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) * 2 + 0.1)
    return Embedder(dataclasses.replace(embedder.backbone, model=model), embedder.prompt, batch_size=8)


def test_same_dir_name_other_weights_get_other_revision_and_score(embedder, tmp_path) -> None:
    from mteb.cache import ResultCache

    from e5v.mini.world import sts_pairs
    from e5v.integrations.mteb_encoder import E5VEncoder

    other = _perturbed(embedder)
    (tmp_path / "a" / "ckpt").mkdir(parents=True)
    (tmp_path / "b" / "ckpt").mkdir(parents=True)
    first = E5VEncoder(str(tmp_path / "a" / "ckpt"), embedder=embedder)
    second = E5VEncoder(str(tmp_path / "b" / "ckpt"), embedder=other)
    assert first.mteb_model_meta.name == second.mteb_model_meta.name == "e5v/ckpt"
    assert first.mteb_model_meta.revision != second.mteb_model_meta.revision
    assert first.mteb_model_meta.revision.startswith("sha256-")
    assert E5VEncoder(str(tmp_path / "a" / "ckpt"), embedder=embedder).mteb_model_meta.revision == first.revision
    assert E5VEncoder("tiny", revision="v1", embedder=embedder).mteb_model_meta.revision == "v1"

    pairs = sts_pairs(30, seed=3)
    cache = ResultCache(tmp_path / "mteb-cache")
    s1 = mteb.evaluate(first, _local_sts_task(pairs), cache=cache).task_results[0].scores["test"][0]
    s2 = mteb.evaluate(second, _local_sts_task(pairs), cache=cache).task_results[0].scores["test"][0]
    fresh = mteb.evaluate(E5VEncoder("x", embedder=other), _local_sts_task(pairs), cache=None)
    assert s2["cosine_spearman"] == pytest.approx(fresh.task_results[0].scores["test"][0]["cosine_spearman"], abs=1e-6)
    assert s2["cosine_spearman"] != pytest.approx(s1["cosine_spearman"], abs=1e-6)  # not the first one's score
