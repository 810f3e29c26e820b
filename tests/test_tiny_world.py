"""The shipped ``tiny_world`` backbone: intact, loaded without rebuilding, and it has learnt the world
(zero-shot caption-to-image retrieval with the E5-V prompts far above chance)."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image


def test_shipped_asset_is_intact_and_used(tmp_path) -> None:
    from e5v.mini import pretrain

    path = pretrain.ensure(seed=0, cache_dir=tmp_path / "cache")  # an empty cache: must not pretrain
    assert path.parent == pretrain.ASSET_DIR
    assert not (tmp_path / "cache").exists()
    meta = json.loads((path / "e5v_tiny_world.json").read_text())
    assert hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest() == meta["weights_sha256"]
    assert meta["seed"] == 0 and meta["recipe"] == pretrain.RECIPE
    assert meta["final_loss"] < 0.5 * meta["first_loss"]


def test_damaged_asset_is_not_used(tmp_path, monkeypatch) -> None:
    """A copy whose weights no longer match the recorded sha256 is refused (ensure would rebuild)."""
    import shutil

    from e5v.mini import pretrain

    src = pretrain.ensure(seed=0)
    copy = tmp_path / src.name
    shutil.copytree(src, copy)
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(-16, 2)
        f.write(b"\0" * 16)
    assert pretrain._intact(src)
    assert not pretrain._intact(copy)


@pytest.fixture(scope="module")
def world_embedder():
    from e5v import Embedder

    return Embedder.from_pretrained("tiny_world", device="cpu", batch_size=32)


def test_builtin_name_loads_with_e5v_prompts(world_embedder) -> None:
    assert world_embedder.backbone.family == "tiny_world"
    assert world_embedder.prompt.name == "e5v_llama3"
    assert world_embedder.dim == 128


def test_zero_shot_caption_to_image_above_chance(world_embedder, tmp_path) -> None:
    """24 mini-world images, one caption each: text->image R@5 with the E5-V prompts vs chance 5/24."""
    from e5v.mini.eval_data import generate
    from eval.loaders.captions import load_captions

    root = generate(tmp_path / "mini", seed=3, images=24)
    data = load_captions(root / "flickr30k", "flickr30k", annotation="dataset_flickr30k.json",
                         image_dir="flickr30k-images")
    first = {}
    for cap, img in zip(data.captions, data.caption_image):
        first.setdefault(int(img), cap)
    caps = [first[i] for i in range(len(data.images))]
    pics = [Image.open(io.BytesIO(ref.data)) if ref.data is not None else str(ref.path) for ref in data.images]
    img = world_embedder.encode_image(pics)
    txt = world_embedder.encode_text(caps)
    ranks = np.argsort(-(txt @ img.T), axis=1)[:, :5]
    r5 = 100 * np.mean([i in ranks[i] for i in range(len(caps))])
    assert r5 > 2 * 100 * 5 / 24, r5  # chance 20.8; measured 54.2 (seed 3)
