"""The benchmark scripts: FLOP counting, alternating timing, outputs, small runs of the encode and search
benchmarks, and the GPU check's CPU dry run. No timing is asserted anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scripts import benchlib

REPO = Path(__file__).resolve().parents[1]


def test_flops_counts_the_model(embedder) -> None:
    model = embedder.model
    fl = benchlib.LlavaFlops.from_model(model)
    lm = model.model.language_model
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    expected = sum(p.numel() for n, p in lm.named_parameters() if any(f".{k}." in n for k in names))
    assert fl.lm_matmul_params == expected
    text = model.config.text_config
    assert fl.lm_layers == text.num_hidden_layers and fl.lm_hidden == text.hidden_size
    # vision_feature_layer=-2 on a 2-layer tower: the first layer's output is used
    assert fl.vision_layers_used == 1
    assert fl.vision_tokens_per_tile == (32 // 8) ** 2 + 1
    # a one-token sequence attends to itself only; a longer one adds causal attention
    assert fl.lm_sequence(1) == 2 * expected + 4 * fl.lm_layers * fl.lm_hidden
    assert fl.lm_sequence(10) == 2 * expected * 10 + 4 * fl.lm_layers * fl.lm_hidden * 55
    assert fl.vision_tiles(3) == 3 * fl.vision_tiles(1) > 0


def test_anyres_tiles_match_the_processor(embedder, images) -> None:
    ip = embedder.processor.image_processor
    for im in images:
        pixel_values = ip([im.convert("RGB")], return_tensors="pt")["pixel_values"]
        w, h = im.size
        assert benchlib.anyres_tiles(embedder.processor, h, w) == pixel_values.shape[1], im.size


def test_alternate_reverses_the_order_every_other_round() -> None:
    calls: list[str] = []
    times = benchlib.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert benchlib.spread([1.0]) == "1 run" and benchlib.spread([1.0, 1.1, 0.9]) == "±10%"


def test_outputs(tmp_path, monkeypatch) -> None:
    md = tmp_path / "docs" / "benchmarks.md"
    benchlib.append_markdown("### one\n\n| a |\n", md)
    benchlib.append_markdown("### two\n", md)
    text = md.read_text()
    assert text.startswith("# Benchmarks") and text.count("# Benchmarks") == 1
    assert text.index("### one") < text.index("### two")
    monkeypatch.delenv("OUT", raising=False)
    assert benchlib.write_out("x", {"a": 1}) is None
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    path = benchlib.write_out("x", {"a": 1}, "### x")
    assert json.loads(path.read_text()) == {"a": 1} and path.with_suffix(".md").read_text() == "### x\n"


def test_peak_flops_and_paper_suite() -> None:
    assert benchlib.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert benchlib.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert benchlib.peak_flops("NVIDIA H200") == 989e12
    assert benchlib.peak_flops("CPU (x86_64, 2 cores)") is None
    counts = benchlib.paper_suite_counts()
    assert counts == {"text": 67700, "image": 56148, "interleaved": 20361}
    assert benchlib.paper_suite_hours({"text": 67700 / 3600, "image": 56148 / 3600, "interleaved": 20361 / 3600}) == 3.0


def test_bench_encode_small_run(tiny_dir, tmp_path, monkeypatch) -> None:
    from scripts import bench_encode

    monkeypatch.setenv("OUT", str(tmp_path))
    data = bench_encode.main(
        ["--device", "cpu", "--n-text", "12", "--n-image", "3", "--batch-size", "4", "--rounds", "1", "--no-append"]
    )
    assert [r["kind"] for r in data["rows"]] == ["text", "image", "interleaved"]
    for r in data["rows"]:
        assert r["ours_items_s"] > 0 and r["released_items_s"] > 0 and r["mfu"] is None  # no peak on a CPU
        assert r["ours_tflops_s"] > 0
    assert data["paper_suite_hours"] > 0
    assert all(r["packed_items_s"] > 0 and r["compiled_items_s"] is None for r in data["rows"])  # packed by default
    saved = json.loads((tmp_path / "bench_encode.json").read_text())
    assert saved["name"] == "bench_encode" and (tmp_path / "bench_encode.md").read_text().startswith("### Encoding")


def test_bench_train_item_counts(embedder, images) -> None:
    """The stage-2 benchmark's per-item counts on a real LLaVA-NeXT image batch: lengths from the padded batch equal
    the packed batch's segment lengths and the trainer's token count; tiles equal the processor's own tiles, one
    image at a time (padded tile slots not counted)."""
    from e5v import packing
    from scripts.bench_train import image_tiles, item_lengths

    inputs = embedder.backbone.inputs()
    prompts = [f"<image>\nDescribe picture {i} in one word:" for i in range(len(images))]
    ids = inputs.tokenize(prompts)
    batch = inputs.images(list(zip(ids, prompts)), [im.convert("RGB") for im in images])
    lengths = item_lengths(batch)
    # independent: each row alone, through the processor's own image-token count
    sizes = [(im.size[1], im.size[0]) for im in images]
    alone = [len(i) - 1 + n for i, n in zip(ids, inputs.image_tokens(sizes))]
    assert lengths == alone and sum(lengths) == packing.real_tokens(batch)
    assert batch["input_ids"].numel() > sum(lengths)  # different sizes: the padded batch holds padding
    packed = inputs.pack(batch, 4 * max(lengths))
    assert packing.is_packed(packed) and packed["input_ids"].shape[0] < len(images)
    assert sorted(item_lengths(packed)) == sorted(lengths)
    ip = embedder.processor.image_processor
    expected = sum(int(ip([im.convert("RGB")], return_tensors="pt")["pixel_values"].shape[1]) for im in images)
    assert len({int(ip([im.convert("RGB")], return_tensors="pt")["pixel_values"].shape[1]) for im in images}) > 1
    assert image_tiles(batch, embedder.processor) == expected == image_tiles(packed, embedder.processor)
    assert image_tiles(inputs.text(ids), embedder.processor) == 0
    assert item_lengths({"input_ids": batch["input_ids"]}) == [batch["input_ids"].shape[1]] * len(images)


def test_bench_train_stage2_small_run(tiny_dir, tmp_path, monkeypatch) -> None:
    """--data stage2: the mini MMEB-train mixture through the real trainer, padded vs packed GradCache steps on the
    same rows (same items and real tokens, checked against the trainer's own count inside the run)."""
    from scripts import bench_train

    assert bench_train.stage2_rows_per_subset(64) == 256 and bench_train.stage2_rows_per_subset(1024) == 416
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    data = bench_train.main(
        ["--data", "stage2", "--data-dir", str(tmp_path / "data"), "--global-batch", "16", "--micro", "8",
         "--steps", "2", "--warmup", "0", "--rounds", "1", "--lora-r", "4", "--pack-tokens", "400",
         "--variants", "grad_cache,grad_cache_packed", "--no-append"]
    )
    assert (tmp_path / "data" / "mini_train" / "mmeb_train" / "mini_mmeb_train.json").is_file()  # generated once, there
    rows = data["rows"]
    padded, packed = rows["grad_cache"], rows["grad_cache_packed"]
    for r in (padded, packed):
        assert r["global_batch"] == 16 and r["items_per_row"] == 2 and r["items_step"] == 2 * 16
        assert r["steps_timed"] == 2 and r["samples_s"] > 0 and r["tokens_s"] > 0 and r["mfu"] is None
        # image queries, image + text and text rows: some items carry an image, and most of the tokens
        assert 0 < r["image_items_share"] < 1 and r["image_tokens_share"] > r["image_items_share"]
        assert r["tiles_step"] >= r["image_items_share"] * r["items_step"]  # at least one tile per image
    assert packed["tokens_step"] == padded["tokens_step"] and packed["tiles_step"] == padded["tiles_step"]
    assert packed["pack_tokens"] == 400 and padded["pack_tokens"] is None
    assert 0 < padded["padding"] < 1 and 0 <= packed["padding"] < 1
    assert data["gradcache_overhead"] is None and set(data["packed_vs_padded"]) == {"grad_cache"}
    md = (tmp_path / "out" / "bench_train.md").read_text()
    assert md.startswith("### Training (stage 2, mini MMEB-train): tiny on CPU")
    assert "x2 items per row: query, positive" in md and "packs of at most 400 tokens" in md
    saved = json.loads((tmp_path / "out" / "bench_train.json").read_text())
    assert saved["args"]["data"] == "stage2" and set(saved["rows"]) == {"grad_cache", "grad_cache_packed"}


def test_synthetic_search_data() -> None:
    from scripts.bench_search import Synthetic, dense_topk, streamed_exact

    import torch

    data = Synthetic(130, 32, seed=1, chunk=50)
    g = data.all()
    assert g.shape == (130, 32) and np.allclose(np.linalg.norm(g, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(data.chunk_at(1), g[50:100])  # chunks regenerate identically
    q = data.queries(20)
    assert q.shape == (20, 32)
    _, ids = dense_topk(torch.from_numpy(q), torch.from_numpy(g), 10)
    streamed, _ = streamed_exact(data, q, 10, torch.device("cpu"))
    np.testing.assert_array_equal(np.sort(streamed, 1), np.sort(ids, 1))


def test_bench_search_small_run(tmp_path, monkeypatch) -> None:
    from scripts import bench_search

    monkeypatch.setenv("OUT", str(tmp_path))
    data = bench_search.main(
        ["--sizes", "3000", "--dim", "32", "--queries", "50", "--pq-m", "8", "--nprobe", "4,128", "--ef-search", "64",
         "--repeats", "1", "--no-append"]
    )
    rows = {r["method"]: r for r in data["rows"]}
    assert rows["faiss flat (exact)"]["recall_at_10"] == 1.0
    ivf = [r for name, r in rows.items() if name.startswith("IVF-Flat")]
    assert len(ivf) == 2 and ivf[-1]["recall_at_10"] == 1.0  # nprobe >= nlist: IVF is exact
    assert any(name.startswith("HNSW") for name in rows)
    pq = [r for name, r in rows.items() if name.startswith("IVF-PQ")]
    assert pq and all(0 < r["recall_at_10"] <= 1 and r["memory_bytes"] < 3000 * 32 * 4 for r in pq)


# ---------------------------------------------------------------------- the GPU check
GPU_CHECK = REPO / "scripts" / "gpu_check.sh"


def _check(args: list[str], out: Path, python: str = sys.executable, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), PYTHON=python)
    return subprocess.run(["bash", str(GPU_CHECK), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_gpu_check_plan_and_failure_reporting(tmp_path) -> None:
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)]).returncode == 0
    listed = _check(["--list"], tmp_path).stdout.split("\n")
    budgets = dict(line.split()[:2] for line in listed if line and not line.startswith("total"))
    assert set(budgets) == {"env", "tests", "encode", "compile", "train", "train2"}
    total = [line for line in listed if line.startswith("total")][0].split()
    # the check is one device command (600 s at most), the machine's start on top (15 min of device time)
    assert sum(int(v) for v in budgets.values()) == int(total[1]) <= int(total[3].rstrip(")")) <= 580
    # a stage that fails is reported and turns the exit status to 1
    p = _check(["--dry-run", "--only", "tests"], tmp_path, python="false")
    assert p.returncode == 1
    summary = (tmp_path / "gpu_check.md").read_text()
    assert "| tests | FAILED" in summary and "| encode | skipped |" in summary
    assert _check(["--bogus"], tmp_path).returncode == 2


@pytest.mark.slow
def test_gpu_check_dry_run(tiny_dir, tmp_path) -> None:
    """Everything but the CUDA work, on this CPU (~3 min): imports, gpu test collection, the encode, compile and
    training benchmarks (stage 1 and stage 2) in their CPU form, figures written to $OUT."""
    p = _check(["--dry-run"], tmp_path)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    summary = (tmp_path / "gpu_check.md").read_text()
    for stage in ("env", "tests", "encode", "compile", "train", "train2"):
        assert f"| {stage} | ok" in summary
    # every gpu test is collected (none lost to an import error): as many as `def test_` x parameters
    src = (Path(__file__).parent / "test_gpu.py").read_text()
    expected = 3 + 3 + 3 + 1 + 1 + 1 + 2 * 2  # parity, invariance, packed x3 kinds, cpu, recipe, workers, deepspeed 2x2
    assert src.count("\ndef test_") == 7, "update the expected gpu test count"
    assert f"{expected} tests collected" in (tmp_path / "gpu_check.log").read_text()
    enc = json.loads((tmp_path / "bench_encode.json").read_text())
    train = json.loads((tmp_path / "bench_train.json").read_text())
    assert {r["kind"] for r in enc["rows"]} == {"text", "image", "interleaved"}
    assert all(r["packed_vs_padded"] > 0 and 0 <= r["padding"] < 1 for r in enc["rows"])
    assert set(train["rows"]) == {"plain", "grad_cache", "plain_packed", "grad_cache_packed"}
    assert train["gradcache_overhead"] > 0 and set(train["packed_vs_padded"]) == {"plain", "grad_cache"}
    stage2 = json.loads((tmp_path / "stage2" / "bench_train.json").read_text())
    assert stage2["args"]["data"] == "stage2" and set(stage2["packed_vs_padded"]) == {"plain", "grad_cache"}
    assert all(0 < r["image_items_share"] < 1 for r in stage2["rows"].values())
    assert "### Training (stage 2, mini MMEB-train)" in summary
    compiled = json.loads((tmp_path / "compile" / "bench_encode.json").read_text())
    assert [r["kind"] for r in compiled["rows"]] == ["text"]
    assert compiled["rows"][0]["compiled_vs_eager"] > 0 and compiled["rows"][0]["compile_warmup_s"] > 0


def test_exact_search_blas_block_is_tuned_once() -> None:
    """Evaluation's FAISS gets gallery blocks large enough for BLAS speed, unless someone chose a size."""
    from eval.index import BLAS_DATABASE_BLOCK, _faiss

    faiss = _faiss()
    cvar = faiss.cvar
    before = cvar.distance_compute_blas_database_bs
    try:
        cvar.distance_compute_blas_database_bs = 1024  # FAISS's default
        assert _faiss().cvar.distance_compute_blas_database_bs == BLAS_DATABASE_BLOCK
        cvar.distance_compute_blas_database_bs = 2048  # a user's choice is kept
        assert _faiss().cvar.distance_compute_blas_database_bs == 2048
    finally:
        cvar.distance_compute_blas_database_bs = before
