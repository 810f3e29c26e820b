"""Per-dimension (Matryoshka) evaluation: ``matryoshka_dims`` scores the same cached vectors' prefixes.

The per-dimension numbers are checked against references computed here from the full vectors (read back from
the run's embedding cache) truncated by hand: STS Spearman and Flickr30K R@1.

Run: ``.venv/bin/python -m pytest -q tests/eval/test_matryoshka_eval.py``
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from e5v.errors import ConfigError
from e5v.matryoshka import check_dims, prefix
from eval.runner import evaluate, select_benchmarks

from evalkit import compose_eval

DIMS = [8, 16, 64]  # the tiny model is 64 wide


# ---------------------------------------------------------------- e5v.matryoshka


def test_prefix_numpy_and_torch() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 10)).astype(np.float32)
    p = prefix(x, 4)
    by_hand = x[:, :4] / np.sqrt((x[:, :4] ** 2).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(p, by_hand, rtol=1e-6, atol=1e-7)
    assert p.dtype == np.float32 and p.shape == (3, 4)
    np.testing.assert_array_equal(prefix(x, 4, normalize=False), x[:, :4])
    whole = prefix(x, None)
    np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(prefix(x, 10), whole)
    assert prefix(x, None, normalize=False) is x
    t = torch.from_numpy(x).to(torch.float64)
    pt = prefix(t, 4)
    assert pt.dtype == torch.float64 and pt.shape == (3, 4)
    np.testing.assert_allclose(pt.numpy(), by_hand, rtol=1e-6, atol=1e-7)
    batch = prefix(torch.from_numpy(x).reshape(1, 3, 10), 4)  # (..., d)
    np.testing.assert_allclose(batch[0].numpy(), by_hand, rtol=1e-6, atol=1e-7)
    with pytest.raises(ConfigError, match="dim: 11 exceeds the embedding width 10"):
        prefix(x, 11)
    with pytest.raises(ConfigError, match="0 must be >= 1"):
        prefix(t, 0)
    with pytest.raises(ValueError, match="all zero"):
        prefix(np.zeros((1, 4), np.float32), 2)


def test_check_dims() -> None:
    assert check_dims(None, 64) == []
    assert check_dims([8, 16, 64], 64) == [8, 16, 64]
    assert check_dims([8, 4096], None) == [8, 4096]  # width unknown: not checked
    for bad, needle in [([16, 8], "8 after 16"), ([8, 8], "8 after 8"), ([65], "65 exceeds the embedding width 64"),
                        ([0], "0 must be >= 1"), (["8"], "'8' is not an int"), ([], "[] is empty"),
                        ("8", "'8' is not a list"), ([True], "True is not an int")]:
        with pytest.raises(ConfigError) as err:
            check_dims(bad, 64, key="matryoshka_dims")
        assert needle in str(err.value) and str(err.value).startswith("matryoshka_dims: ")


# ---------------------------------------------------------------- e5v-eval matryoshka_dims


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("matryoshka")


def _cfg(base: Path, *extra: str) -> Any:
    return compose_eval(base, base / "mini", "benchmarks=[sts,flickr30k]", "report.plot=false", *extra)


@pytest.fixture(scope="module")
def run(base: Path, tiny_dir: Path) -> dict[str, Any]:
    cfg = _cfg(base, f"matryoshka_dims=[{','.join(map(str, DIMS))}]")
    return evaluate(cfg, output_dir=base / "out")


@pytest.fixture(scope="module")
def full_vectors(run: dict[str, Any], base: Path) -> tuple[Any, dict[str, Any]]:
    """The full raw vectors of every STS sentence and Flickr30K item, read back from the run's cache."""
    from e5v.prompts import PromptSet
    from eval.cache import EmbeddingCache
    from eval.encode import Encoder
    from eval.loaders.senteval import load_sts
    from eval.model import ModelHandle

    cfg = _cfg(base)
    root = Path(str(cfg.cache.dir))
    enc = Encoder(ModelHandle(cfg, memo_dir=root), PromptSet.from_config(cfg.prompt), EmbeddingCache(root),
                  progress=False)
    benches = select_benchmarks(cfg)
    sts = {}
    for task in benches["sts"].tasks:
        pairs = load_sts(benches["sts"].root, task)
        sts[task] = (pairs, enc.sts(pairs.sent_a), enc.sts(pairs.sent_b))
    fl = benches["flickr30k"]
    data = fl.load()
    flickr = (data, enc.image(data.images, template=fl.image_template, normalize=False),
              enc.text(data.captions, template=fl.text_template, normalize=False))
    assert enc.total_stats()["encoded"] == 0  # everything came from the run's cache
    return enc, {"sts": sts, "flickr": flickr}


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank."""
    order = sorted(range(len(v)), key=lambda i: v[i])
    r = np.empty(len(v))
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for t in range(i, j + 1):
            r[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return r


def _spearman_x100(a: np.ndarray, b: np.ndarray, gold: list[float]) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)  # identical sentences tie exactly, as in the metric
    cos = [float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y))) for x, y in zip(a, b)]
    return 100.0 * float(np.corrcoef(_ranks(np.array(cos)), _ranks(np.array(gold, dtype=np.float64)))[0, 1])


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_sts_per_dim_equals_hand_truncation(run: dict[str, Any], full_vectors: Any) -> None:
    _, vec = full_vectors
    per_dim = run["matryoshka"]["metrics"]
    assert run["matryoshka"]["width"] == 64 and run["matryoshka"]["dims"] == ["8", "16", "64"]
    assert per_dim["64"]["sts"] == run["metrics"]["sts"]
    for k in DIMS:
        ref = {t: _spearman_x100(a[:, :k], b[:, :k], p.gold) for t, (p, a, b) in vec["sts"].items()}
        ref["avg"] = float(np.mean(list(ref.values())))
        got = per_dim[str(k)]["sts"]
        assert set(got) == set(ref)
        for t in ref:
            assert got[t] == pytest.approx(ref[t], abs=1e-6), (k, t)
    assert per_dim["8"]["sts"] != per_dim["64"]["sts"]  # the prefix is really scored


def test_flickr_r1_per_dim_equals_hand_truncation(run: dict[str, Any], full_vectors: Any) -> None:
    _, vec = full_vectors
    data, images, captions = vec["flickr"]
    truth = np.asarray(data.caption_image)
    differs = False
    for k in DIMS:
        img, cap = _unit_rows(images[:, :k]), _unit_rows(captions[:, :k])
        sims = cap @ img.T  # (captions, images)
        t2i = 100.0 * float(np.mean(sims.argmax(axis=1) == truth))
        i2t = 100.0 * float(np.mean([truth[j] == i for i, j in enumerate(sims.argmax(axis=0))]))
        got = run["matryoshka"]["metrics"][str(k)]["flickr30k"]
        assert got["t2i_R@1"] == pytest.approx(t2i, abs=1e-9), k
        assert got["i2t_R@1"] == pytest.approx(i2t, abs=1e-9), k
        differs |= got != run["metrics"]["flickr30k"]
    assert differs


def test_report_keys_table_and_no_reencoding(run: dict[str, Any], base: Path) -> None:
    flat = run["metrics_flat"]
    assert flat["sts/avg"] == flat["sts@64/avg"] == run["metrics"]["sts"]["avg"]
    assert flat["flickr30k@8/t2i_R@1"] == run["matryoshka"]["metrics"]["8"]["flickr30k"]["t2i_R@1"]
    assert {f"sts@{k}/avg" for k in DIMS} <= set(flat)
    for k in ("8", "16"):  # the prefix runs read every item from the cache
        stats = run["matryoshka"]["cache"][k]
        assert stats["encoded"] == 0 and stats["cached"] == stats["unique"] > 0
    saved = json.loads((base / "out" / "results.json").read_text())
    assert saved["matryoshka"]["metrics"] == run["matryoshka"]["metrics"]
    md = (base / "out" / "results.md").read_text()
    assert "| benchmark | metric | 8 | 16 | 64 (full) |" in md
    m = run["matryoshka"]["metrics"]
    row = f"| sts | avg | {m['8']['sts']['avg']:.2f} | {m['16']['sts']['avg']:.2f} | {m['64']['sts']['avg']:.2f} |"
    assert row in md
    history = json.loads((base / "history.jsonl").read_text().splitlines()[-1])
    assert history["metrics"]["sts@8/avg"] == m["8"]["sts"]["avg"]


def test_dim_above_the_configured_width_fails_before_the_model_loads(
    base: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from eval.model import ModelHandle

    def no_model(self: Any) -> Any:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ModelHandle, "embedder", property(no_model))
    with pytest.raises(ConfigError) as err:
        evaluate(_cfg(base, "matryoshka_dims=[8,128]"), output_dir=base / "too_wide")
    assert str(err.value) == "matryoshka_dims: 128 exceeds the embedding width 64; give prefix sizes <= 64"
    with pytest.raises(ConfigError, match="8 after 16"):
        evaluate(_cfg(base, "matryoshka_dims=[16,8]"), output_dir=base / "unordered")
    assert not (base / "too_wide").exists() and not (base / "unordered").exists()


def test_dim_above_an_unknown_width_fails_on_the_vectors(
    run: dict[str, Any], base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import eval.dims

    monkeypatch.setattr(eval.dims, "config_width", lambda model: None)
    with pytest.raises(ConfigError, match="matryoshka_dims: 128 exceeds the embedding width 64"):
        evaluate(_cfg(base, "matryoshka_dims=[128]", "benchmarks=[sts]"), output_dir=base / "unknown_width")


def test_disabled_cache_still_scores_prefixes_without_reencoding(
    run: dict[str, Any], base: Path, tmp_path: Path
) -> None:
    cfg = compose_eval(tmp_path, base / "mini", "benchmarks=[sts]", "report.plot=false", "cache.enabled=false",
                       "matryoshka_dims=[8]")
    res = evaluate(cfg, output_dir=tmp_path / "out")
    assert res["matryoshka"]["cache"]["8"]["encoded"] == 0 and res["cache"]["encoded"] > 0
    assert res["matryoshka"]["dims"] == ["8", "64"]
    for t, v in run["matryoshka"]["metrics"]["8"]["sts"].items():
        assert res["matryoshka"]["metrics"]["8"]["sts"][t] == pytest.approx(v, abs=1e-6)
