"""The Embedder's speed features keep outputs unchanged: token-budget batching, the direct left padding,
the LLaVA-NeXT image-token expansion (vs the processor's), DataLoader workers, attention selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_image
from e5v.data.images import BadImageError
from test_embedder import TEXTS


def test_left_pad_matches_tokenizer_pad(embedder) -> None:
    from e5v.backbones.batching import left_pad

    ids = [embedder.tokenizer(t)["input_ids"] for t in TEXTS]
    ours, mask = left_pad(ids, embedder.backbone.pad_token_id)
    ref = embedder.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    assert torch.equal(ours, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"].long())


def test_image_token_expansion_equals_processor(embedder, images) -> None:
    """The ids we build (placeholder expanded from the image size) are exactly the processor's."""
    items = embedder._image_items([(im, t) for im, t in zip(images, TEXTS + ["x"])], "cirr_query", None)
    prep = embedder._preparer()
    from e5v.backbones.llava_next import LlavaNextInputs

    assert isinstance(prep.inputs, LlavaNextInputs)  # the expansion, not a processor call
    out = prep(items)
    from e5v.data.images import load_image

    ref = embedder.processor(
        text=[it.prompt for it in items], images=[load_image(it.image) for it in items], padding=True, return_tensors="pt"
    )
    assert torch.equal(out.tensors["input_ids"], ref["input_ids"])
    assert torch.equal(out.tensors["attention_mask"], ref["attention_mask"].long())
    assert torch.equal(out.tensors["pixel_values"], ref["pixel_values"])
    assert torch.equal(out.tensors["image_sizes"], ref["image_sizes"])
    # the sort key counted the same tokens
    assert [it.length for it in items] == ref["attention_mask"].sum(1).tolist()


def test_token_budget_batches(embedder) -> None:
    from e5v import Embedder

    texts = [" ".join(["word"] * n) for n in (1, 3, 40, 5, 80, 2, 9, 60)]
    capped = Embedder(embedder.backbone, embedder.prompt, batch_size=8, max_batch_tokens=200)
    items = capped._text_items(texts, "text", None)
    batches = list(capped._batches(items, 8))
    assert len(batches) > 1
    for b in batches:
        assert len(b) == 1 or len(b) * b[0].length <= 200
        assert b[0].length == max(it.length for it in b)  # longest first: the padded width
    assert sorted(it.index for b in batches for it in b) == list(range(len(texts)))
    np.testing.assert_allclose(capped.encode_text(texts), embedder.encode_text(texts, batch_size=8), atol=1e-5)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        Embedder(embedder.backbone, embedder.prompt, max_batch_tokens=0)


def test_workers_give_identical_outputs(embedder, images) -> None:
    from e5v import Embedder

    workers = Embedder(embedder.backbone, embedder.prompt, batch_size=2, num_workers=2, pin_memory=False)
    pairs = [(im, t) for im, t in zip(images, TEXTS + ["make it blue"])]
    np.testing.assert_array_equal(workers.encode_image(images), embedder.encode_image(images, batch_size=2))
    np.testing.assert_array_equal(
        workers.encode_interleaved(pairs), embedder.encode_interleaved(pairs, batch_size=2)
    )
    # text requests never start workers and are unchanged too
    np.testing.assert_array_equal(workers.encode_text(TEXTS), embedder.encode_text(TEXTS, batch_size=2))


def test_workers_bad_images(embedder, tmp_path) -> None:
    from e5v import Embedder

    good = tmp_path / "good.png"
    make_image(40, 30, seed=3).save(good)
    bad = tmp_path / "bad.png"
    make_image(40, 30, seed=4).save(bad)
    bad.write_bytes(bad.read_bytes()[:60])  # truncated: the header opens, decoding fails (in a worker)
    skip = Embedder(embedder.backbone, embedder.prompt, batch_size=1, num_workers=2, on_bad_image="skip")
    x = skip.encode_image([good, bad, good])
    assert x.shape == (2, embedder.dim)
    assert [s.index for s in skip.last_skipped] == [1] and skip.last_skipped[0].source == str(bad)
    raising = Embedder(embedder.backbone, embedder.prompt, batch_size=1, num_workers=2)
    with pytest.raises(BadImageError, match="bad.png"):
        raising.encode_image([good, bad])


def test_options_from_config_and_validation(tiny_dir) -> None:
    from e5v import Embedder
    from e5v.config import compose

    cfg = compose(
        "embed",
        ["backbone=tiny", "embedder.device=cpu", "embedder.num_workers=1", "embedder.max_batch_tokens=512",
         "embedder.pin_memory=false"],
    )
    emb = Embedder.from_config(cfg)
    assert (emb.num_workers, emb.max_batch_tokens, emb.pin_memory) == (1, 512, False)
    with pytest.raises(ValueError, match="num_workers"):
        Embedder(emb.backbone, emb.prompt, num_workers=-1)


def test_attention_selection() -> None:
    from e5v.backbones.base import resolve_attn_implementation

    cpu = torch.device("cpu")
    assert resolve_attn_implementation("auto", cpu, torch.bfloat16) == "sdpa"
    assert resolve_attn_implementation(None, cpu, torch.float32) == "sdpa"
    assert resolve_attn_implementation("eager", cpu, torch.float32) == "eager"
    with pytest.raises(ValueError, match="attn_implementation"):
        resolve_attn_implementation("flash3", cpu, torch.float32)
