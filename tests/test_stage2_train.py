"""Stage-2 training (general contrastive rows) through the real trainer: the gradients of every new batch
composition (homogeneous sub-batches with in-batch negatives of the same task, hard negatives gathered across
ranks, several positives per query, Matryoshka prefixes; queries and candidates of every kind: text, image,
image + text with instructions) equal the single-process full-batch step's, with GradCache and on 2 processes
(fp32, 1e-5); continuing a stage-1 LoRA; the row-count checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import REPO, VENV_BIN, _env, _free_port

from safetensors.torch import load_file


def _items(rng, pairs, k: int, exclude: int) -> list[int]:
    pool = [i for i in range(len(pairs.anchors)) if i != exclude]
    return rng.sample(pool, k)


@pytest.fixture(scope="module")
def jsonl_data(tmp_path_factory) -> tuple[Path, Path]:
    """Two JSONL datasets over the mini world's training images: ``i2t`` (image query with an instruction ->
    two captions; a hard negative caption) and ``t2it`` (caption -> the image with a short text, and the bare
    caption again; a hard negative image + text). Every row: 2 positives, 1 hard negative."""
    import random

    from e5v.mini.train_data import mini_image_caption_pairs

    root = tmp_path_factory.mktemp("stage2")
    pairs = mini_image_caption_pairs(root / "pairs.json", root / "images", n_rows=48)
    rel = [str(Path(a).relative_to((root / "images").resolve())) for a in pairs.anchors]
    rng = random.Random(0)
    a, b = [], []
    for i in range(24):
        n = _items(rng, pairs, 1, i)[0]
        a.append({"id": f"a{i}", "query": {"image": rel[i], "instruction": "Represent the given image."},
                  "positives": [{"text": pairs.positives[i]}, {"text": f"a picture: {pairs.positives[i]}"}],
                  "negatives": [{"text": pairs.positives[n]}]})
    for i in range(24, 48):
        n = _items(rng, pairs, 1, i)[0]
        b.append({"id": f"b{i}", "query": {"text": pairs.positives[i]},
                  "positives": [{"image": rel[i], "text": "a photo"}, {"text": pairs.positives[i]}],
                  "negatives": [{"image": rel[n], "text": "a photo"}]})
    fa, fb = root / "i2t.jsonl", root / "t2it.jsonl"
    fa.write_text("".join(json.dumps(r) + "\n" for r in a))
    fb.write_text("".join(json.dumps(r) + "\n" for r in b))
    return root, root / "images"


def _data_overrides(root: Path, images: Path) -> list[str]:
    ds = (f"[{{format: jsonl, path: '{root / 'i2t.jsonl'}', image_root: '{images}', name: i2t}},"
          f"{{format: jsonl, path: '{root / 't2it.jsonl'}', image_root: '{images}', name: t2it}}]")
    return ["data=jsonl", f"data.loader.datasets={ds}", "trainer.global_batch=16", "prompt.mmeb.instruction=keep"]


def _probe(tmp: Path, name: str, data: list[str], *overrides: str, nproc: int = 1) -> dict[str, torch.Tensor]:
    out = tmp / f"{name}.safetensors"
    script = str(REPO / "tests" / "helpers" / "grad_probe.py")
    args = [script, str(out), f"paths.data_dir={tmp / 'data'}", "lora.dropout=0", *data, *overrides]
    cmd = [sys.executable, *args] if nproc == 1 else [str(VENV_BIN / "torchrun"), f"--nproc_per_node={nproc}",
                                                      f"--master_port={_free_port()}", *args]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-5000:]
    return load_file(str(out))


def _assert_equal_grads(ref: dict[str, torch.Tensor], *others: dict[str, torch.Tensor]) -> float:
    """Every LoRA gradient equal to 1e-5, absolute, or relative to the largest gradient entry where that is above 1
    (fp32: differently padded batches round at ~1e-5 absolute, and the losses with every option summed, up to 3
    Matryoshka terms over 2 positives, reach gradients of ~10). Returns the largest difference over that tolerance."""
    assert len(ref) == 28 and all(o.keys() == ref.keys() for o in others)
    scale = max(v.abs().max().item() for v in ref.values())
    assert scale > 1e-3  # gradients are not trivially zero
    worst = max((o[k] - ref[k]).abs().max().item() for o in others for k in ref) / max(1.0, scale)
    assert worst <= 1e-5, worst
    return worst


ALL = ("data.sub_batch=4", "loss.negatives_scope=sub_batch", "loss.matryoshka_dims=[16,32]")


def test_stage2_gradients_plain_gradcache_two_process_equal_full_batch(tmp_path, jsonl_data) -> None:
    """Every composition at once (2 positives, gathered hard negatives, sub-batch scope, Matryoshka; image,
    text and image + text items with instructions): full batch == GradCache chunks == 2 ranks."""
    data = _data_overrides(*jsonl_data)
    full = _probe(tmp_path, "full", data, "trainer.micro_batch=16", *ALL)
    gc = _probe(tmp_path, "gc", data, "trainer.micro_batch=4", "trainer.grad_cache=true", *ALL)
    two = _probe(tmp_path, "two", data, "trainer.micro_batch=8", *ALL, nproc=2)
    _assert_equal_grads(full, gc, two)
    # the options change the gradient (a probe that ignored them would pass the equalities above)
    plain = _probe(tmp_path, "plain", data, "trainer.micro_batch=16")
    scale = max(v.abs().max().item() for v in full.values())
    assert max((plain[k] - full[k]).abs().max().item() for k in full) > 1e-2 * scale


COMPOSITIONS = {
    "sub_batches": ("data.sub_batch=4", "loss.negatives_scope=sub_batch", "data.negatives_per_query=0",
                    "data.positives_per_query=1"),
    "hard_negatives": ("data.positives_per_query=1",),
    "several_positives": ("data.negatives_per_query=0",),
    "matryoshka": ("loss.matryoshka_dims=[16,32,64]", "loss.matryoshka_weights=[1.0,0.5,2.0]"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMPOSITIONS))
def test_each_composition_plain_gradcache_two_process_equal_full_batch(tmp_path, jsonl_data, name) -> None:
    data = _data_overrides(*jsonl_data)
    opts = COMPOSITIONS[name]
    full = _probe(tmp_path, "full", data, "trainer.micro_batch=16", *opts)
    gc = _probe(tmp_path, "gc", data, "trainer.micro_batch=4", "trainer.grad_cache=true", *opts)
    two = _probe(tmp_path, "two", data, "trainer.micro_batch=8", *opts, nproc=2)
    _assert_equal_grads(full, gc, two)


def test_row_counts_are_checked_before_the_model_loads(tmp_path, jsonl_data) -> None:
    from e5v.config import compose
    from e5v.errors import ConfigError, DataError
    from e5v.train.trainer import Trainer

    def setup(*extra: str) -> Trainer:
        cfg = compose("train", ["experiment=tiny_cpu", "logger=none", "run_name=x", f"paths.output_dir={tmp_path}",
                                *_data_overrides(*jsonl_data), *extra])
        t = Trainer(cfg, tmp_path / "run")
        t.setup()
        return t

    with pytest.raises(DataError, match=r"fewer than data.positives_per_query=3 positives \(first: a0 with 2\)"):
        setup("data.positives_per_query=3")
    with pytest.raises(ConfigError, match=r"data.sub_batch=5: must divide trainer.global_batch=16"):
        setup("data.sub_batch=5")
    with pytest.raises(ConfigError, match=r"negatives_scope=sub_batch needs data.sub_batch"):
        setup("loss.negatives_scope=sub_batch")
    with pytest.raises(ValueError, match=r"128"):
        setup("loss.matryoshka_dims=[16,128]")  # wider than the tiny model (64)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    """A 2-step stage-1 run (text-only NLI, experiment=tiny_cpu): its run folder."""
    out = tmp_path_factory.mktemp("stage1")
    args = ["-m", "e5v.train", "experiment=tiny_cpu", "logger=none", "run_name=s1", "trainer.max_steps=2",
            "trainer.save_every=2", f"paths.output_dir={out}", f"paths.data_dir={out / 'data'}"]
    p = subprocess.run([sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return out / "train" / "s1"


@pytest.fixture
def process_group(monkeypatch):
    """A one-process group (DeepSpeed's engine needs one), removed afterwards with its environment."""
    from e5v import distributed as D

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    D.init_from_env("gloo")
    yield
    D.shutdown()


def _stage2(tmp_path: Path, *extra: str):
    from e5v.config import compose
    from e5v.train.trainer import Trainer

    cfg = compose("train", ["experiment=stage2_tiny", "logger=none", "run_name=s2", f"paths.output_dir={tmp_path}",
                            f"paths.data_dir={tmp_path / 'data'}", "data.loader.n_rows=16", *extra])
    t = Trainer(cfg, tmp_path / "run")
    t.setup()
    return t


def test_stage2_continues_the_stage1_lora_and_records_it(tmp_path, stage1, process_group) -> None:
    from safetensors.torch import load_file

    t = _stage2(tmp_path, f"lora.init_from={stage1}")
    saved = load_file(str(stage1 / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors"))
    own = {n: p for n, p in t.peft_model.named_parameters() if "lora_" in n}
    assert len(saved) == len(own) == 28
    for name, value in saved.items():  # peft's file drops the adapter name: ...lora_A.weight <-> ...lora_A.default.weight
        mine = own[name.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")]
        assert torch.equal(mine.detach(), value), name
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)  # stage 1 moved B off its zero init
    assert t.init_from["step"] == 2 and t.init_from["run"] == str(stage1) and len(t.init_from["sha256"]) == 64
    assert t.adapter_meta["init_from"] == t.init_from  # written beside every checkpoint's adapter (e5v_adapter.json)


def test_stage2_refuses_a_stage1_adapter_of_another_shape(tmp_path, stage1, process_group) -> None:
    from e5v.errors import ConfigError

    with pytest.raises(ConfigError, match=r"the adapter has r=8, this run lora.r=4; use the stage-1 run's lora.r"):
        _stage2(tmp_path, f"lora.init_from={stage1}", "lora.r=4")
    with pytest.raises(ConfigError, match=r"the adapter has lora_alpha=16, this run lora.alpha=32.0"):
        _stage2(tmp_path, f"lora.init_from={stage1}", "lora.alpha=32")  # same shapes, another scale
    with pytest.raises(ConfigError, match=r"does not fit this run's LoRA .*use the stage-1 run's lora.r"):
        _stage2(tmp_path, f"lora.init_from={stage1}", "lora.targets=[q_proj,v_proj]")


def test_stage2_experiment_needs_its_stage1_or_null(tmp_path, process_group) -> None:
    from e5v.errors import ConfigError

    with pytest.raises(ConfigError, match=r"lora.init_from"):
        _stage2(tmp_path)
    t = _stage2(tmp_path, "lora.init_from=null")  # stage 2 alone (VLM2Vec's recipe): a fresh LoRA
    assert t.init_from is None and all(p.abs().max() == 0 for n, p in t.peft_model.named_parameters() if "lora_B" in n)


def _fake_mined(tmp_path: Path) -> Path:
    """A mined-negatives folder in e5v-mine's format for the 16-row mini MMEB-train: each row's negative is the
    positive of the next row of its subset."""
    from e5v.mini.stage2_data import mini_mmeb_train

    mix = mini_mmeb_train(tmp_path / "data" / "mini_train" / "mmeb_train", n_rows=16)
    folder = tmp_path / "mined"
    folder.mkdir()
    (folder / "provenance.json").write_text(json.dumps({"checkpoint": "test"}))
    for d in mix.datasets:
        root = Path(d.image_root)
        lines = []
        for i, rid in enumerate(d.ids):
            neg = d.positives[(i + 1) % len(d)][0]
            img = str(Path(neg.image).relative_to(root)) if neg.image else None
            lines.append(json.dumps({"id": rid, "negatives": [{"text": neg.text, "image": img,
                                                               "instruction": neg.instruction}],
                                     "scores": [0.5], "positive_score": 0.9}))
        (folder / f"{d.name}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_mined_negatives_reach_the_batches_and_unused_ones_refuse(tmp_path, process_group) -> None:
    from e5v.errors import ConfigError

    mined = _fake_mined(tmp_path)
    with pytest.raises(ConfigError, match=r"mined negatives would go unused; set data.negatives_per_query"):
        _stage2(tmp_path, "lora.init_from=null", f"data.loader.mined={mined}")
    t = _stage2(tmp_path, "lora.init_from=null", f"data.loader.mined={mined}", "data.negatives_per_query=1")
    assert t.rows.negatives == 1
    rows = t.sampler.rows(0)[:4]
    items = t.preparer.items_for(rows)
    assert len(items) == 3 * 4  # queries, positives, the mined negatives
    for j, r in enumerate(rows):  # the mined negative: the next row's positive in the row's own subset
        d = t.data.dataset_of(int(r))
        i = int(r) - int(t.data.offsets[int(t.data.dataset_index[r])])
        assert items[8 + j][0] == d.positives[(i + 1) % len(d)][0] != items[4 + j][0]
    with torch.no_grad():
        assert t.encode(rows).shape == (3, 4, 64)


def test_stage1_then_mine_then_stage2_then_eval_through_the_clis(tmp_path, stage1) -> None:
    """The user's path, offline on the mini data: e5v-mine with the stage-1 run, e5v-train experiment=stage2_tiny
    from the stage-1 LoRA with the mined negatives, e5v-eval of the stage-2 run on MMEB-mini per dimension."""
    paths = [f"paths.output_dir={tmp_path / 'out'}", f"paths.data_dir={tmp_path / 'data'}",
             f"paths.cache_dir={tmp_path / 'cache'}"]
    small = ["data.loader.n_rows=16"]

    def run(module: str, *args: str) -> None:
        p = subprocess.run([sys.executable, "-m", module, *args, *paths], cwd=REPO, env=_env(), capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, (module, p.stderr[-3000:])

    run("eval.mining", "data=mini_mmeb_train", *small, f"checkpoint={stage1}", "max_score_ratio=null", "k=2")
    mined = tmp_path / "out" / "mined" / "mini_mmeb_train"
    prov = json.loads((mined / "provenance.json").read_text())
    assert str(stage1) in json.dumps(prov["checkpoint"]) and set(prov["per_dataset"]) == {
        "MiniShape", "MiniColour-VQA", "MiniScene_t2i", "MiniScene_i2t", "MiniGrounding"}
    run("e5v.train", "experiment=stage2_tiny", *small, f"lora.init_from={stage1}", f"data.loader.mined={mined}",
        "data.loader.mined_k=1", "data.negatives_per_query=1", "trainer.max_steps=2", "trainer.save_every=2",
        "run_name=s2", "logger=none")
    run_dir = tmp_path / "out" / "train" / "s2"
    info = json.loads((run_dir / "train_info.json").read_text())
    assert info["rows_per_query"]["hard_negatives"] == 1 and f"mined {mined}" in info["data"]["source"]
    assert info["init_from"]["run"] == str(stage1) and info["init_from"]["step"] == 2
    meta = json.loads((run_dir / "checkpoints" / "step-000002" / "adapter" / "e5v_adapter.json").read_text())
    assert meta["init_from"]["sha256"] == info["init_from"]["sha256"] and meta["prompt"]["mmeb"]["instruction"] == "keep"
    run("eval.cli", f"checkpoint={run_dir}", "suite=mini", "benchmarks=[mmeb]", "matryoshka_dims=[16,32]",
        "suite.mini.mmeb_queries=4", "suite.mini.mmeb_candidates=4")
    res = json.loads(next((tmp_path / "out" / "eval").rglob("results.json")).read_text())
    assert 0 <= res["metrics"]["mmeb"]["overall/hit@1"] <= 100
    assert res["matryoshka"]["dims"] == ["16", "32", "64"]


def test_stage2_refuses_a_missing_or_foreign_stage1_before_the_model_loads(tmp_path, stage1, monkeypatch) -> None:
    from e5v.errors import ConfigError
    from e5v.lora import AdapterBaseError
    from e5v.train import setup as S

    monkeypatch.setattr(S, "build_backbone", lambda cfg: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match=r"lora.init_from=<the stage-1 run, step or adapter folder> continues"):
        _stage2(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"/nonexistent: no LoRA adapter here"):
        _stage2(tmp_path, "lora.init_from=/nonexistent")
    with pytest.raises(AdapterBaseError, match=r"trained on base tiny .* tiny_mistral .* stage-1 run's backbone"):
        _stage2(tmp_path, f"lora.init_from={stage1}", "backbone=tiny_mistral")
