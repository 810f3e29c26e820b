"""Matryoshka ``dim`` on the Embedder, ``e5v-encode --dim`` and the eval fingerprint: the embeddings are the full
last-token state's first ``dim`` coordinates (re-normalised when normalising), checked against a numpy prefix of
the full raw embeddings; a dim wider than the hidden size fails in one line naming both.

Run: ``.venv/bin/python -m pytest -q tests/test_embedder_dim.py``
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_image
from e5v.errors import ConfigError

TEXTS = ["a red circle", "a large blue square to the left of a small green triangle", "x", "two yellow stars"]


def numpy_prefix(raw: np.ndarray, k: int, normalize: bool) -> np.ndarray:
    """Independent reference: the first k columns, divided by their float64 L2 norm."""
    cut = raw[:, :k].astype(np.float64)
    return cut / np.linalg.norm(cut, axis=1, keepdims=True) if normalize else cut


@pytest.fixture(scope="module")
def hidden(embedder) -> int:
    return int(embedder.backbone.model.config.text_config.hidden_size)  # read from the HF config, not our property


@pytest.mark.parametrize("k", [1, 5, 16])
def test_dim_is_the_renormalised_prefix_of_the_full_embedding(embedder, images, hidden, k) -> None:
    from e5v import Embedder

    small = Embedder(embedder.backbone, embedder.prompt, batch_size=3, dim=k)
    assert small.dim == k and embedder.dim == hidden and k < hidden
    pairs = [(im, t) for im, t in zip(images, TEXTS + TEXTS)]
    cases = [
        (lambda e, n: e.encode_text(TEXTS, normalize=n), len(TEXTS)),
        (lambda e, n: e.encode_image(images, normalize=n), len(images)),
        (lambda e, n: e.encode_interleaved(pairs, normalize=n), len(pairs)),
    ]
    for encode, n in cases:
        raw = encode(embedder, False)
        assert raw.shape == (n, hidden)
        for normalize in (True, False):
            got = encode(small, normalize)
            assert got.shape == (n, k) and got.dtype == np.float32
            np.testing.assert_allclose(got, numpy_prefix(raw, k, normalize), atol=1e-6, rtol=0)
        if k > 1:  # a real re-normalisation: the prefix of the normalised full vector is shorter than 1
            full = encode(embedder, True)
            assert np.linalg.norm(full[:, :k], axis=1).max() < 0.999
            np.testing.assert_allclose(np.linalg.norm(encode(small, True), axis=1), 1.0, atol=1e-6)
    # the STS protocol (raw) and an empty request keep the width too
    np.testing.assert_allclose(small.encode_sts(TEXTS), embedder.encode_sts(TEXTS)[:, :k], atol=1e-6, rtol=0)
    assert small.encode_text([]).shape == (0, k)


def test_dim_equal_to_the_hidden_size_is_the_full_embedding(embedder, hidden) -> None:
    from e5v import Embedder

    same = Embedder(embedder.backbone, embedder.prompt, batch_size=8, dim=hidden)
    assert same.dim == hidden
    np.testing.assert_array_equal(same.encode_text(TEXTS), embedder.encode_text(TEXTS))


def test_dim_wider_than_the_hidden_size_fails_in_one_line(embedder, hidden) -> None:
    from e5v import Embedder

    with pytest.raises(ConfigError) as err:
        Embedder(embedder.backbone, embedder.prompt, dim=hidden + 1)
    msg = str(err.value)
    assert "\n" not in msg and f"dim={hidden + 1}" in msg and f"hidden size {hidden}" in msg
    for bad in (0, -3, "8", True, 2.5):
        with pytest.raises(ConfigError, match="embedder dim"):
            Embedder(embedder.backbone, embedder.prompt, dim=bad)  # type: ignore[arg-type]


def test_dim_through_from_pretrained_and_from_config(embedder, tiny_dir) -> None:
    from e5v import Embedder
    from e5v.config import compose

    raw = embedder.encode_text(TEXTS, normalize=False)
    loaded = Embedder.from_pretrained("tiny", device="cpu", dim=7)
    assert loaded.dim == 7
    np.testing.assert_allclose(loaded.encode_text(TEXTS), numpy_prefix(raw, 7, True), atol=1e-6, rtol=0)
    cfg = compose("embed", ["backbone=tiny", "embedder.device=cpu", "embedder.dtype=float32", "embedder.dim=9"])
    configured = Embedder.from_config(cfg)
    assert configured.dim == 9
    np.testing.assert_allclose(configured.encode_text(TEXTS), numpy_prefix(raw, 9, True), atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="hidden size"):
        Embedder.from_config(compose("embed", ["backbone=tiny", "embedder.device=cpu", "embedder.dim=100000"]))


def test_encode_cli_dim(tmp_path, embedder, hidden) -> None:
    from e5v.cli.encode import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (w, h) in enumerate([(40, 30), (30, 60), (64, 64)]):
        make_image(w, h, i).save(folder / f"{i}.png")
    base = ["--model", "tiny", "--device", "cpu", "--images", str(folder)]
    assert main([*base, "--out", str(tmp_path / "a"), "--dim", "6"]) == 0
    x = np.load(tmp_path / "a" / "embeddings.npy")
    files = [folder / f"{i}.png" for i in range(3)]
    np.testing.assert_allclose(x, numpy_prefix(embedder.encode_image(files, normalize=False), 6, True), atol=1e-6)
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["dim"] == 6 and meta["options"]["dim"] == 6
    with pytest.raises(SystemExit, match=r"--dim 0: must be >= 1"):
        main([*base, "--out", str(tmp_path / "b"), "--dim", "0"])
    with pytest.raises(SystemExit, match=rf"dim={hidden + 1} is wider than the hidden size {hidden}") as err:
        main([*base, "--out", str(tmp_path / "c"), "--dim", str(hidden + 1)])
    assert "\n" not in str(err.value).strip()
    assert not (tmp_path / "c" / "embeddings.npy").exists()


def test_eval_fingerprint_identity_names_dim_only_when_set() -> None:
    """A prefix is another embedding: the eval cache must not hand back full vectors for it; without dim the
    identity (and so every earlier fingerprint) is unchanged."""
    from e5v.config import compose
    from eval.model import ModelHandle

    def ident(*extra: str) -> dict:
        return ModelHandle(compose("eval", ["backbone=tiny", "suite=mini", *extra])).identity()

    assert "dim" not in ident() and ident() == ident("embedder.dim=null")
    assert ident("embedder.dim=8")["dim"] == 8 and ident("embedder.dim=8") != ident()
