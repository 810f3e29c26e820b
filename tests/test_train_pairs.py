"""Image-caption training (the paper's Table 7 setting): the LLaVA-Pretrain format loader, the mini
world's pairs, and training with image anchors through the DeepSpeed trainer (tiny backbone, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file
from test_train import REPO, _assert_equal_grads, _env, _probe, metrics, run_train

from e5v.data.nli import DataError
from e5v.data.pairs import load_image_caption_pairs
from e5v.data.paths import UnsafePathError
from e5v.mini.train_data import mini_image_caption_pairs


def _row(rid: str, image: str | None, caption: str | None, gpt: bool = True) -> dict:
    row: dict = {"id": rid, "conversations": [{"from": "human", "value": "<image>\nDescribe the photo."}]}
    if image is not None:
        row["image"] = image
    if gpt:
        row["conversations"].append({"from": "gpt", "value": caption})
    return row


@pytest.fixture()
def small_set(tmp_path: Path) -> tuple[Path, Path]:
    """Six rows in LLaVA-Pretrain's layout: two good, one of each bad kind."""
    from PIL import Image

    root = tmp_path / "images"
    for name in ("00000/000000001.jpg", "00000/000000002.jpg", "00000/000000005.jpg", "00000/000000006.jpg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (200, 30, 30)).save(root / name)
    rows = [
        _row("1", "00000/000000001.jpg", " a red square on white. "),
        _row("2", "00000/000000002.jpg", "a blue circle"),
        _row("3", None, "a text-only row"),  # row 2: no image key
        _row("4", "00000/000000004.jpg", "a caption whose image is missing"),  # row 3: no such file
        _row("5", "00000/000000005.jpg", None, gpt=False),  # row 4: no gpt turn
        _row("6", "00000/000000006.jpg", "   "),  # row 5: empty caption
    ]
    f = tmp_path / "pairs.json"
    f.write_text(json.dumps(rows))
    return f, root


def test_loader_skips_and_counts_bad_rows(small_set: tuple[Path, Path]) -> None:
    f, root = small_set
    p = load_image_caption_pairs(f, root)
    assert p.anchor_kind == "image" and p.negatives is None and len(p) == 2
    assert p.anchors == [str((root / "00000/000000001.jpg").resolve()), str((root / "00000/000000002.jpg").resolve())]
    assert p.positives == ["a red square on white.", "a blue circle"] and p.ids == ["1", "2"]
    assert p.skipped == {"missing_image": 1, "image_not_found": 1, "missing_caption": 1, "empty_caption": 1}
    assert p.source == str(f)
    assert len(load_image_caption_pairs(f, root, limit=1)) == 1
    assert load_image_caption_pairs(f, root, check_files=False).skipped["image_not_found"] == 0


@pytest.mark.parametrize(
    "bad, pattern",
    [
        (2, r"row 2 \(id '3'\): key 'image' is missing"),
        (3, r"row 2 \(id '4'\): key 'image': file .*000000004\.jpg not found"),
        (4, r"row 2 \(id '5'\): key 'conversations' has no turn from 'gpt'"),
        (5, r"row 2 \(id '6'\): key 'conversations': the 'gpt' caption is empty"),
    ],
)
def test_loader_error_names_file_row_and_key(small_set: tuple[Path, Path], bad: int, pattern: str) -> None:
    f, root = small_set
    rows = json.loads(f.read_text())
    f.write_text(json.dumps(rows[:2] + [rows[bad]] + rows[:1]))  # the bad row is row 2 (0-based)
    with pytest.raises(DataError, match=pattern) as err:
        load_image_caption_pairs(f, root, on_bad_row="error")
    assert str(f) in str(err.value) and "on_bad_row=skip" in str(err.value)
    with pytest.raises(ValueError, match="on_bad_row must be one of"):
        load_image_caption_pairs(f, root, on_bad_row="ignore")


def test_loader_refuses_paths_outside_the_image_root(small_set: tuple[Path, Path], tmp_path: Path) -> None:
    f, root = small_set
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"x")
    (root / "link.jpg").symlink_to(outside)
    for rel in ("../secret.jpg", str(outside), "00000/../../secret.jpg", "link.jpg"):
        f.write_text(json.dumps([_row("1", "00000/000000001.jpg", "ok"), _row("x", rel, "escape")]))
        for mode in ("skip", "error"):  # refused whatever on_bad_row says
            with pytest.raises(UnsafePathError, match=r"row 1, key 'image'"):
                load_image_caption_pairs(f, root, on_bad_row=mode)


def test_loader_missing_or_broken_files_are_named(small_set: tuple[Path, Path], tmp_path: Path) -> None:
    f, root = small_set
    with pytest.raises(DataError, match=r"no-such\.json not found.*liuhaotian/LLaVA-Pretrain"):
        load_image_caption_pairs(tmp_path / "no-such.json", root)
    with pytest.raises(DataError, match=r"image root .*no-images not found"):
        load_image_caption_pairs(f, tmp_path / "no-images")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "1", "image": "a.jpg",\n')
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON at line 2"):
        load_image_caption_pairs(broken, root)
    broken.write_text('{"id": "1"}')
    with pytest.raises(DataError, match=r"expected a JSON list"):
        load_image_caption_pairs(broken, root)
    only_bad = tmp_path / "only_bad.json"
    only_bad.write_text(json.dumps([_row("1", None, "x")]))
    with pytest.raises(DataError, match="no usable rows"):
        load_image_caption_pairs(only_bad, root)


def test_mini_pairs_round_trip_written_once(tmp_path: Path) -> None:
    f, root = tmp_path / "mini" / "pairs.json", tmp_path / "mini" / "images"
    p = mini_image_caption_pairs(f, root, n_rows=12, seed=3)
    assert len(p) == 12 and p.skipped == {"missing_image": 0, "image_not_found": 0, "missing_caption": 0,
                                          "empty_caption": 0}
    rows = json.loads(f.read_text())
    assert [r["image"] for r in rows][:2] == ["00000/000000000.jpg", "00000/000000001.jpg"]
    assert all(r["conversations"][0]["from"] == "human" and "<image>" in r["conversations"][0]["value"] and
               r["conversations"][1]["from"] == "gpt" for r in rows)
    assert p.positives == [r["conversations"][1]["value"] for r in rows]
    assert len(set(p.positives)) == 12
    from PIL import Image

    sizes = {Image.open(a).size for a in p.anchors}
    assert len(sizes) == 3  # several aspect ratios (different image token counts: padded batches)
    # a second call rewrites nothing; other parameters regenerate
    stamp = {x: x.stat().st_mtime_ns for x in [f, *root.rglob("*.jpg")]}
    again = mini_image_caption_pairs(f, root, n_rows=12, seed=3)
    assert again.positives == p.positives and {x: x.stat().st_mtime_ns for x in stamp} == stamp
    other = mini_image_caption_pairs(f, root, n_rows=8, seed=4)
    assert len(other) == 8 and other.positives != p.positives[:8]
    assert len(list(root.rglob("*.jpg"))) == 8
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("x")
    with pytest.raises(DataError, match="not a mini-pairs image folder"):
        mini_image_caption_pairs(f, tmp_path / "taken", n_rows=8)


def test_mini_training_pairs_are_not_the_evaluation_scenes(tmp_path: Path) -> None:
    """Training captions come from their own stream and avoid the mini evaluation's images."""
    from e5v.mini.eval_data import generate

    out = generate(tmp_path / "mini-eval", seed=0, images=32, cirr_groups=2, fiq_images=4, sts_pairs=2)
    coco = json.loads((out / "coco" / "dataset_coco.json").read_text())
    eval_captions = {img["sentences"][0]["raw"] for img in coco["images"]}
    import pyarrow.parquet as pq

    table = pq.read_table(out / "flickr30k" / "data" / "test-00000-of-00001.parquet").to_pylist()
    eval_captions |= {r["caption"][0] for r in table}
    assert len(eval_captions) == 72
    pairs = mini_image_caption_pairs(tmp_path / "p.json", tmp_path / "img", n_rows=512, seed=0)
    assert not eval_captions & set(pairs.positives)


def test_configs_compose_and_point_at_the_real_layout(tmp_path: Path) -> None:
    from e5v.config import compose, instantiate

    cfg = compose("train", ["data=mini_pairs", f"paths.data_dir={tmp_path}", "run_name=x"])
    assert cfg.data.loader.path == f"{tmp_path}/mini_train/pairs/mini_pairs.json"
    data = instantiate(cfg.data.loader)
    assert len(data) == 512 and data.anchor_kind == "image"
    cfg = compose("train", ["data=llava_pretrain_558k", f"paths.data_dir={tmp_path}", "run_name=x"])
    assert cfg.data.loader.path.endswith("llava_pretrain/blip_laion_cc_sbu_558k.json")
    with pytest.raises(DataError, match="blip_laion_cc_sbu_558k.json not found"):
        instantiate(cfg.data.loader)


# ---------------------------------------------------------------------- training
def test_training_on_image_caption_pairs(tmp_path: Path) -> None:
    """The real entry point (python -m e5v.train) with data=mini_pairs and GradCache (LoRA dropout on), images
    decoded in 2 DataLoader workers, packed batches: finite loss, exact replay, adapter saved with LoRA on the
    language model only, data recorded."""
    out = tmp_path / "out"
    run_train(out, "data=mini_pairs", "trainer.max_steps=4", "trainer.save_every=2", "logger=none",
              "trainer.grad_cache=true", "trainer.micro_batch=8", "trainer.num_workers=2", "trainer.packing=true")
    run = out / "train" / "run"
    m = metrics(run)
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    assert all(np.isfinite(r["train/loss"]) and r["train/loss"] > 0 for r in m)
    assert m[0]["train/loss"] == pytest.approx(np.log(32), abs=0.3)  # 32 candidates (global batch), no hard negatives
    assert all(r["train/gradcache_replay_err"] == 0.0 for r in m)  # images + dropout replayed exactly
    info = json.loads((run / "train_info.json").read_text())
    assert info["data"]["anchor_kind"] == "image" and info["data"]["rows"] == 512
    assert info["data"]["source"].endswith("mini_train/pairs/mini_pairs.json")
    adapter = run / "checkpoints" / "step-000004" / "adapter"
    keys = load_file(str(adapter / "adapter_model.safetensors")).keys()
    assert len(keys) == 28 and all(".language_model.layers." in k and "lora_" in k for k in keys)
    assert (run / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors").is_file()


def test_image_anchors_match_embedder_and_frozen_towers_stay_bit_identical(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "probe.json"
    p = subprocess.run([sys.executable, str(REPO / "tests" / "helpers" / "pairs_probe.py"), str(out), "3",
                        f"paths.data_dir={tmp_path / 'data'}"], cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(out.read_text())
    # the image forward is the embedder's (full MLLM, left padding, positions from the mask)
    assert r["padded_rows"] > 0 and r["embed_max_diff"] < 1e-5, r["embed_max_diff"]
    frozen = r["frozen"]
    for part in ("vision_tower", "multi_modal_projector", "lm_head", "embed_tokens"):
        assert any(part in n for n in frozen), part
    assert r["frozen_changed"] == [] and r["frozen_with_grad"] == []
    assert r["lora_changed"] == r["lora_total"] == 28
    assert all(np.isfinite(r["losses"]))
    assert r["lm_training"] and not r["towers_training"]  # frozen towers run in eval mode (no dropout)


@pytest.fixture(scope="module")
def full_batch_grads(tmp_path_factory) -> dict:
    """LoRA gradients of one step on the whole global batch of 32 image-caption pairs, one process."""
    return _probe(tmp_path_factory.mktemp("pairs-grads"), "full", "data=mini_pairs", "trainer.micro_batch=32",
                  packed_too=True)  # also: the same step with packed images and captions, same gradients


def test_grad_cache_equals_full_batch_for_image_anchors(full_batch_grads: dict, tmp_path: Path) -> None:
    gc = _probe(tmp_path, "gc", "data=mini_pairs", "trainer.micro_batch=8", "trainer.grad_cache=true",
                packed_too=True)  # 4 chunks, padded and packed
    _assert_equal_grads(full_batch_grads, gc)


@pytest.mark.slow  # make test time (16 s); two processes, padded and packed, stay in make test for text triplets
def test_two_process_equals_full_batch_for_image_anchors(full_batch_grads: dict, tmp_path: Path) -> None:
    """2 ranks x 16 pairs, each rank padding its own image batch; captions gathered across ranks."""
    two = _probe(tmp_path, "two", "data=mini_pairs", "trainer.micro_batch=16", nproc=2, packed_too=True)
    _assert_equal_grads(full_batch_grads, two)


def test_undecodable_training_image_is_named(tmp_path: Path) -> None:
    from e5v.data.nli import StepSampler

    data = tmp_path / "data"
    pairs = mini_image_caption_pairs(data / "mini_train" / "pairs" / "mini_pairs.json", data / "mini_train" / "pairs" / "images")
    first = int(StepSampler(len(pairs), 32, seed=42).rows(0)[0])  # tiny_cpu: global batch 32, seed 42
    victim = Path(pairs.anchors[first])
    victim.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    p = run_train(tmp_path / "out", "data=mini_pairs", "trainer.max_steps=2", "logger=none", check=False)
    assert p.returncode != 0
    assert f"bad image {victim}" in p.stderr, p.stderr[-3000:]
