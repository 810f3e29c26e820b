"""Guarantee 8, numerical faults: a NaN or inf loss stops training with a clear message and keeps the last good
checkpoint (nothing is written after it); a NaN or inf embedding in evaluation is reported with the item it
belongs to, and nothing is cached or scored.

Existing: tests/test_train.py::test_nan_loss_stops_and_keeps_last_good_checkpoint (NaN injected at step 5 of a
real run with inject.py's nan-at-step:5: non-zero exit, message names step 5 and step-000004, no later checkpoint).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from faultkit import TINY_EVAL, eval_cfg, save_fake_checkpoint


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_loss_stops_naming_step_and_last_good_checkpoint(tmp_path: Path, bad: float) -> None:
    from e5v.train import Trainer, TrainingDiverged

    root = tmp_path / "checkpoints"
    save_fake_checkpoint(root, 2)
    save_fake_checkpoint(root, 4)
    trainer = Trainer.__new__(Trainer)  # only the state check_finite reads: no model needed
    trainer.ckpt_root, trainer.step = root, 6
    trainer.check_finite(torch.tensor(1.5))  # finite: nothing happens
    with pytest.raises(TrainingDiverged) as err:
        trainer.check_finite(torch.tensor(bad))
    msg = str(err.value)
    assert "non-finite loss at step 7" in msg and str(root / "step-000004") in msg and "resume from it" in msg
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004"]  # nothing written


def test_grad_cache_checks_the_loss_before_any_backward() -> None:
    from e5v.train.grad_cache import grad_cache_step

    backwards: list[bool] = []

    def encode(rows: Any) -> torch.Tensor:
        return torch.ones(2, len(rows), 4, requires_grad=True)

    def loss_fn(reps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return reps.sum() * float("inf"), torch.tensor(0.0)

    def check(loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError("stop")

    with pytest.raises(FloatingPointError):
        grad_cache_step(encode, [[0, 1], [2, 3]], loss_fn, lambda s, last: backwards.append(last), check=check)
    assert backwards == []  # no parameter was touched


class _NaNModel:
    """Embeddings from a rule; items whose text/label contains 'poison' come out NaN (or inf)."""

    fingerprint = "n" * 64

    def __init__(self, bad: float = float("nan")) -> None:
        outer = self
        outer.bad = bad

        def rows(names: list[str]) -> np.ndarray:
            out = np.stack([np.arange(8, dtype=np.float32) + len(n) for n in names])
            out[[i for i, n in enumerate(names) if "poison" in n], 3] = outer.bad
            return out

        self.embedder = SimpleNamespace(
            encode_text=lambda texts, **_: rows(list(texts)),
            encode_image=lambda images, **_: rows([str(getattr(i, "filename", i)) for i in images]),
            encode_interleaved=lambda pairs, **_: rows([f"{getattr(i, 'filename', i)} {t}" for i, t in pairs]),
        )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_embedding_names_the_item_and_caches_nothing(tmp_path: Path, bad: float) -> None:
    from e5v.prompts import load_prompt
    from eval.cache import EmbeddingCache
    from eval.encode import Encoder, ImageRef, NonFiniteEmbedding

    enc = Encoder(_NaNModel(bad), load_prompt("e5v_llama3"), EmbeddingCache(tmp_path / "c"), shard_size=2,
                  progress=False)
    texts = ["a dog", "a cat", "the poison pill", "a bird"]
    with pytest.raises(NonFiniteEmbedding, match=r"1 of 2 item\(s\): text 'the poison pill'") as err:
        enc.text(texts)
    assert err.value.items == ["text 'the poison pill'"]
    shards = [json.loads(f.read_text())["keys"] for f in (tmp_path / "c").rglob("shard-*.json")]
    assert len(shards) == 1 and len(shards[0]) == 2  # the good first shard only: nothing NaN was cached
    img = tmp_path / "poison.png"
    from conftest import make_image

    make_image(8, 8, seed=0).save(img)
    with pytest.raises(NonFiniteEmbedding, match=r"image poison\.png \+ text 'make it blue'"):
        enc.interleaved([(ImageRef(path=img, label="poison.png"), "make it blue")], template="cirr_query")


def test_nan_embedding_stops_an_evaluation_run_before_any_score(tiny_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the runner with the real tiny model: one caption's embedding is made NaN."""
    from eval.encode import Encoder, NonFiniteEmbedding
    from eval.runner import evaluate

    cfg = eval_cfg(tmp_path, tmp_path / "mini", tmp_path / "cache", "benchmarks=[flickr30k]", sizes=TINY_EVAL)
    real = Encoder._encode_chunk

    def poisoned(self: Encoder, kind: str, template: str, category: str | None, payloads: list[Any]) -> np.ndarray:
        out = real(self, kind, template, category, payloads)
        if kind == "text":
            out = out.copy()
            out[1, 0] = np.nan
        return out

    monkeypatch.setattr(Encoder, "_encode_chunk", poisoned)
    with pytest.raises(NonFiniteEmbedding, match=r"text: the model returned NaN/inf embeddings for 1 of .* text '"):
        evaluate(cfg, output_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "results.json").exists()


def test_nan_in_a_cached_shard_is_dropped_and_recomputed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from e5v.prompts import load_prompt
    from eval.cache import EmbeddingCache
    from eval.encode import Encoder

    model = _NaNModel()
    enc = Encoder(model, load_prompt("e5v_llama3"), EmbeddingCache(tmp_path), shard_size=8, progress=False)
    good = enc.text(["x", "y"], normalize=False)
    (npy,) = tmp_path.rglob("shard-*.npy")
    arr = np.load(npy)
    arr[0, 0] = np.nan
    np.save(npy, arr)
    with caplog.at_level(logging.WARNING, logger="eval.cache"):
        again = Encoder(model, load_prompt("e5v_llama3"), EmbeddingCache(tmp_path), progress=False).text(
            ["x", "y"], normalize=False)
    assert "NaN or inf" in caplog.text and "dropping bad shard" in caplog.text
    np.testing.assert_array_equal(again, good)
