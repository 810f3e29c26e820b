"""Embedder behaviour on the tiny backbone: invariance, order, recipe parity, truncation, bad input."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import make_image
from e5v.data.images import BadImageError

TEXTS = [
    "a red circle",
    "a large blue square to the left of a small green triangle near the top of the picture",
    "x",
    "two yellow stars",
    "a purple ring in the bottom right corner, next to an orange cross and a gray star",
]


def direct_text(emb, prompt: str) -> np.ndarray:
    """The released inference recipe: HF forward, hidden_states[-1][:, -1], L2 normalise."""
    enc = emb.tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        out = emb.model(**enc, output_hidden_states=True)
    return F.normalize(out.hidden_states[-1][:, -1].float(), dim=-1)[0].numpy()


def direct_image(emb, prompt: str, image: Image.Image) -> np.ndarray:
    enc = emb.processor(text=[prompt], images=[image], return_tensors="pt")
    with torch.no_grad():
        out = emb.model(**enc, output_hidden_states=True)
    return F.normalize(out.hidden_states[-1][:, -1].float(), dim=-1)[0].numpy()


def test_text_shapes_and_norms(embedder) -> None:
    x = embedder.encode_text(TEXTS)
    assert x.shape == (len(TEXTS), embedder.dim) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    raw = embedder.encode_text(TEXTS, normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), x, atol=1e-5)


def test_text_batch_invariance(embedder) -> None:
    batched = embedder.encode_text(TEXTS, batch_size=len(TEXTS))
    for i, t in enumerate(TEXTS):
        alone = embedder.encode_text([t])[0]
        np.testing.assert_allclose(alone, batched[i], atol=1e-5)
    # inputs really differ, so equality above is not trivial
    sims = batched @ batched.T
    assert sims[np.triu_indices(len(TEXTS), 1)].max() < 0.9999


def test_image_batch_invariance_mixed_tiles(embedder, images) -> None:
    tokens = {embedder._image_tokens(im) for im in images}
    assert len(tokens) >= 3, f"fixture should span several anyres grids, got token counts {tokens}"
    batched = embedder.encode_image(images, batch_size=len(images))
    for i, im in enumerate(images):
        np.testing.assert_allclose(embedder.encode_image([im])[0], batched[i], atol=1e-5)


def test_interleaved_batch_invariance(embedder, images) -> None:
    pairs = [(im, t) for im, t in zip(images, TEXTS + ["make it blue"])]
    batched = embedder.encode_interleaved(pairs, batch_size=len(pairs))
    for i, p in enumerate(pairs):
        np.testing.assert_allclose(embedder.encode_interleaved([p])[0], batched[i], atol=1e-5)


def test_order_follows_input_after_length_sort(embedder) -> None:
    # Sorted by length internally; any permutation of the input must permute the output the same way.
    perm = [3, 0, 4, 2, 1]
    a = embedder.encode_text(TEXTS, batch_size=2)
    b = embedder.encode_text([TEXTS[i] for i in perm], batch_size=2)
    np.testing.assert_allclose(b, a[perm], atol=1e-5)
    order = [it.index for batch in embedder._batches(embedder._text_items(TEXTS, "text", None), 2) for it in batch]
    assert order != list(range(len(TEXTS))), "length sorting should reorder this input"


def test_recipe_parity_text(embedder) -> None:
    ours = embedder.encode_text(TEXTS)
    for i, t in enumerate(TEXTS):
        prompt = embedder.prompt.render("text", t)
        np.testing.assert_allclose(ours[i], direct_text(embedder, prompt), atol=1e-5)


def test_recipe_parity_image(embedder, images) -> None:
    ours = embedder.encode_image(images)
    prompt = embedder.prompt.render("image")
    for i, im in enumerate(images):
        np.testing.assert_allclose(ours[i], direct_image(embedder, prompt, im), atol=1e-5)


def test_recipe_parity_cirr_query(embedder, images) -> None:
    ours = embedder.encode_interleaved([(images[1], "is blue")], template="cirr_query")
    prompt = embedder.prompt.render("cirr_query", "is blue")
    np.testing.assert_allclose(ours[0], direct_image(embedder, prompt, images[1]), atol=1e-5)


def test_fashioniq_templates(embedder, images) -> None:
    g = embedder.encode_image(images[:2], template="fashioniq_gallery", category="dress")
    q = embedder.encode_interleaved([(images[0], "is red, shorter")], template="fashioniq_query", category="toptee")
    assert g.shape == (2, embedder.dim) and q.shape == (1, embedder.dim)
    with pytest.raises(ValueError, match="category"):
        embedder.encode_image(images[:1], template="fashioniq_gallery")


def test_sts_uses_clean_raw_embeddings(embedder) -> None:
    raw = embedder.encode_sts(['He said "no"', "Is it?"])
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    assert embedder.text_prompts(["Is it?"], template="sts")[0].startswith(
        "<|start_header_id|>user<|end_header_id|>\n\n Is it.\nSummary"
    )


def test_paths_and_modes(embedder, tmp_path) -> None:
    base = make_image(48, 40, seed=7)
    paths = []
    for mode in ["RGB", "L", "RGBA", "P", "CMYK", "LA"]:
        p = tmp_path / f"img_{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        base.convert(mode).save(p)
        paths.append(p)
    arr16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    p16 = tmp_path / "img16.png"
    im16 = Image.fromarray(arr16)
    assert im16.mode == "I;16"
    im16.save(p16)
    paths.append(p16)
    x = embedder.encode_image(paths)
    assert x.shape == (len(paths), embedder.dim) and np.isfinite(x).all()
    # 16-bit grayscale scaled to 8 bits gives the same image as the 8-bit grayscale
    np.testing.assert_allclose(x[-1], x[1], atol=1e-5)


# ------------------------------------------------------------------ truncation
def test_truncation_keeps_template_suffix(embedder, caplog) -> None:
    from e5v import Embedder

    short = Embedder(embedder.backbone, embedder.prompt, max_length=40)
    long = " ".join(["a large red circle next to a small blue square"] * 20)
    with caplog.at_level(logging.WARNING, logger="e5v.embedder"):
        prompts = short.text_prompts([long, "a dog"])
    assert "1 input(s) exceeded max_length=40" in caplog.text
    suffix = "\nSummary above sentence in one word: <|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n \n"
    assert prompts[0].endswith(suffix) and prompts[1].endswith(suffix)
    assert len(short.tokenizer(prompts[0])["input_ids"]) <= 40
    assert short.last_truncated == [0]
    body = prompts[0][len("<|start_header_id|>user<|end_header_id|>\n\n") : -len(suffix)]
    assert len(body) > 10 and long.startswith(body)
    # and the embedding is exactly the one of the shortened prompt
    np.testing.assert_allclose(short.encode_text([long])[0], direct_text(short, prompts[0]), atol=1e-5)


def test_truncation_interleaved_counts_image_tokens(embedder, images) -> None:
    from e5v import Embedder

    n_img = embedder._image_tokens(images[4])
    short = Embedder(embedder.backbone, embedder.prompt, max_length=n_img + 45)
    long = " ".join(["make the circle bigger and move it to the left"] * 10)
    x = short.encode_interleaved([(images[4], long)])
    assert short.last_truncated == [0] and x.shape == (1, embedder.dim)


def test_template_longer_than_limit_fails(embedder) -> None:
    from e5v import Embedder

    tiny = Embedder(embedder.backbone, embedder.prompt, max_length=5)
    with pytest.raises(ValueError, match="template alone"):
        tiny.encode_text(["a long enough sentence to need cutting"])


# ------------------------------------------------------------------ bad input
def test_empty_list(embedder) -> None:
    for out in (embedder.encode_text([]), embedder.encode_image([]), embedder.encode_interleaved([])):
        assert out.shape == (0, embedder.dim) and out.dtype == np.float32


def test_none_names_index(embedder, images) -> None:
    with pytest.raises(TypeError, match=r"texts\[2\] is None"):
        embedder.encode_text(["a", "b", None])
    with pytest.raises(TypeError, match=r"images\[1\] is None"):
        embedder.encode_image([images[0], None])
    with pytest.raises(TypeError, match=r"pairs\[0\]\[0\]"):
        embedder.encode_interleaved([(None, "x")])
    with pytest.raises(TypeError, match=r"pairs\[1\]\[1\] is None"):
        embedder.encode_interleaved([(images[0], "x"), (images[0], None)])
    with pytest.raises(TypeError, match="single str"):
        embedder.encode_text("not a list")
    with pytest.raises(ValueError, match="image token"):
        embedder.encode_text(["sneaky <image> token"])


@pytest.fixture()
def bad_files(tmp_path):
    good = tmp_path / "good.png"
    make_image(40, 40, seed=1).save(good)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    truncated = tmp_path / "truncated.jpg"
    make_image(64, 64, seed=2).save(truncated, quality=90)
    truncated.write_bytes(truncated.read_bytes()[:200])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.png"
    return {"good": good, "corrupt": corrupt, "truncated": truncated, "empty": empty, "missing": missing}


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "empty", "missing"])
def test_bad_image_raises_naming_file(embedder, bad_files, kind) -> None:
    with pytest.raises(BadImageError, match=bad_files[kind].name):
        embedder.encode_image([bad_files["good"], bad_files[kind]])


def test_bad_image_skip_reports(embedder, bad_files) -> None:
    from e5v import Embedder

    skip = Embedder(embedder.backbone, embedder.prompt, on_bad_image="skip")
    order = ["good", "corrupt", "good", "truncated", "empty", "missing"]
    x = skip.encode_image([bad_files[k] for k in order])
    assert x.shape == (2, embedder.dim)
    assert [s.index for s in sorted(skip.last_skipped, key=lambda s: s.index)] == [1, 3, 4, 5]
    assert {s.source for s in skip.last_skipped} >= {str(bad_files["truncated"]), str(bad_files["missing"])}
    np.testing.assert_allclose(x[0], x[1], atol=1e-6)
    np.testing.assert_allclose(x[0], embedder.encode_image([bad_files["good"]])[0], atol=1e-5)


def test_last_skipped_is_per_call(embedder, bad_files, caplog) -> None:
    """A text (or clean image) call after one that skipped images neither reports nor warns about them."""
    from e5v import Embedder

    skip = Embedder(embedder.backbone, embedder.prompt, on_bad_image="skip")
    skip.encode_image([bad_files["good"], bad_files["corrupt"]])
    assert [s.index for s in skip.last_skipped] == [1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="e5v.embedder"):
        skip.encode_text(["a caption"])
    assert skip.last_skipped == [] and "skipped" not in caplog.text
    skip.encode_image([bad_files["missing"]])
    assert len(skip.last_skipped) == 1
    skip.encode_interleaved([(bad_files["good"], "red")])
    assert skip.last_skipped == []


def test_bad_options(embedder) -> None:
    from e5v import Embedder

    with pytest.raises(ValueError, match="on_bad_image"):
        Embedder(embedder.backbone, embedder.prompt, on_bad_image="ignore")
    with pytest.raises(ValueError, match="needs a text"):
        embedder.encode_image([make_image(8, 8, 0)], template="cirr_query")
    with pytest.raises(KeyError, match="no body 'nope'"):
        embedder.encode_text(["a"], template="nope")
