"""Shared fixtures: offline environment, one tiny model per session, generated images."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("E5V_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tests never write to the user's cache: E5V_CACHE points into the session's temp dir."""
    cache = tmp_path_factory.mktemp("e5v-cache")
    os.environ["E5V_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_dir(_isolated_cache: Path) -> Path:
    from e5v.backbones import tiny

    return tiny.ensure_tiny(seed=0)


@pytest.fixture(scope="session")
def embedder(tiny_dir: Path):
    from e5v import Embedder

    return Embedder.from_pretrained("tiny", device="cpu", batch_size=8)


def make_image(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    return img if mode == "RGB" else img.convert(mode)


@pytest.fixture()
def images() -> list[Image.Image]:
    """Several sizes and aspect ratios: 1, 2 and 4 anyres tiles on the tiny 32px grid."""
    sizes = [(40, 40), (90, 30), (30, 90), (64, 64), (200, 120), (16, 16)]
    return [make_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
