"""Training through the DeepSpeed engine on the tiny backbone (CPU, gloo), in subprocesses.

One shared 1-process run (tiny_cpu: 40 steps, mini NLI) backs the loss / frozen-tower / merge /
learning-signal tests; gradient equality, resume, NaN and two-process runs launch their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", E5V_NO_PROGRESS="1",
        TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
    )
    env.pop("RANK", None)
    env.update(extra or {})
    return env


def run_train(out: Path, *overrides: str, nproc: int = 1, env: dict[str, str] | None = None,
              check: bool = True, inject: str | None = None) -> subprocess.CompletedProcess:
    """``e5v-train experiment=tiny_cpu`` into ``out``; ``inject="kill-after-step:3"`` ... installs that fault first
    (tests/faults/inject.py, one process)."""
    args = [
        "experiment=tiny_cpu", f"paths.output_dir={out}", f"paths.data_dir={out.parent / 'data'}", "run_name=run",
        *overrides,
    ]
    if inject:
        env = {**(env or {}), "E5V_INJECT": inject}
        cmd = [sys.executable, str(REPO / "tests" / "faults" / "inject.py"), "train", *args]
    elif nproc == 1:
        cmd = [sys.executable, "-m", "e5v.train", *args]
    else:
        cmd = [str(VENV_BIN / "torchrun"), f"--nproc_per_node={nproc}", f"--master_port={_free_port()}", "-m", "e5v.train", *args]
    p = subprocess.run(cmd, cwd=REPO, env=_env(env), capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"training failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "out"
    run_train(out, "logger=wandb", "logger.wandb.log_adapter=true")
    return out / "train" / "run"


def test_training_reduces_loss_and_logs(trained: Path) -> None:
    m = metrics(trained)
    assert [r["step"] for r in m] == list(range(1, 41))
    first, last = np.mean([r["train/loss"] for r in m[:5]]), np.mean([r["train/loss"] for r in m[-5:]])
    assert last < 0.5 * first, (first, last)
    for key in ("train/acc", "train/lr", "train/grad_norm", "train/samples_per_s", "train/tokens_per_s",
                "train/peak_mem_gb"):
        assert key in m[-1] and np.isfinite(m[-1][key])
    info = json.loads((trained / "run_info.json").read_text())
    assert info["packages"]["deepspeed"] and "sha" in info["git"]  # the same record as results.json's "git"
    assert (trained / "config.yaml").is_file()
    runs = list((trained / "wandb").glob("offline-run-*"))
    assert runs
    # the adapter went to W&B as an artifact (offline: recorded in the run's transaction log)
    logs = [f for f in runs[0].rglob("*.wandb")]
    assert logs and any(b"adapter-run" in f.read_bytes() for f in logs), "adapter artifact not logged"
    state = json.loads((trained / "checkpoints" / "step-000040" / "trainer_state.json").read_text())
    assert state["step"] == 40 and len(state["losses"]) == 40
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["step-000020", "step-000040"]


def test_lora_only_touches_language_model(trained: Path) -> None:
    from e5v.backbones import tiny
    from e5v.lora import apply_adapter

    adapter = trained / "checkpoints" / "step-000040" / "adapter"
    keys = load_file(str(adapter / "adapter_model.safetensors")).keys()
    assert keys and all(".language_model.layers." in k and "lora_" in k for k in keys)
    assert not any("vision_tower" in k or "lm_head" in k for k in keys)
    base = tiny.load(seed=0, device="cpu").model
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = apply_adapter(tiny.load(seed=0, device="cpu").model, adapter)
    after = merged.state_dict()
    frozen = [k for k in before if "vision_tower" in k or "multi_modal_projector" in k or "lm_head" in k
              or "image_newline" in k or "embed_tokens" in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    changed = [k for k in before if ".language_model.layers." in k and not torch.equal(before[k], after[k])]
    assert any("q_proj" in k for k in changed) and any("down_proj" in k for k in changed)


def test_merge_loads_everywhere_and_matches_adapter(trained: Path, tmp_path) -> None:
    from transformers import LlavaNextForConditionalGeneration

    from e5v import Embedder
    from e5v.lora import load_adapter_into_embedder

    adapter = trained / "checkpoints" / "step-000040" / "adapter"
    out = tmp_path / "merged"
    p = subprocess.run([str(VENV_BIN / "e5v-merge"), str(adapter), str(out)], env=_env(), capture_output=True,
                       text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    plain = LlavaNextForConditionalGeneration.from_pretrained(str(out))
    assert plain.config.model_type == "llava_next"
    merged = Embedder.from_pretrained(str(out), device="cpu")
    applied = load_adapter_into_embedder(Embedder.from_pretrained("tiny", device="cpu"), adapter)
    texts = ["A small red circle at the top.", "Two blue squares."]
    np.testing.assert_allclose(merged.encode_text(texts), applied.encode_text(texts), atol=1e-5)
    from PIL import Image

    img = [Image.new("RGB", (40, 30), (200, 30, 30))]
    np.testing.assert_allclose(merged.encode_image(img), applied.encode_image(img), atol=1e-5)
    with pytest.raises(SystemExit):
        from e5v.cli.merge import main

        main([str(adapter)])  # missing OUT: argparse error


def test_trained_model_scores_higher_on_heldout_sts(trained: Path) -> None:
    """A learning signal: graded mini-world sentence pairs never seen in training."""
    from scipy.stats import spearmanr

    from e5v import Embedder
    from e5v.mini.world import sts_pairs
    from e5v.lora import load_adapter_into_embedder

    pairs = sts_pairs(150, seed=4242)
    gold = [g for _, _, g in pairs]

    def score(emb: Embedder) -> float:
        a, b = emb.encode_sts([p[0] for p in pairs]), emb.encode_sts([p[1] for p in pairs])
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        return float(spearmanr(cos, gold).statistic)

    before = score(Embedder.from_pretrained("tiny", device="cpu"))
    after = score(load_adapter_into_embedder(Embedder.from_pretrained("tiny", device="cpu"),
                                             trained / "checkpoints" / "step-000040" / "adapter"))
    assert after > before + 0.3 and after > 0.5, (before, after)


# ---------------------------------------------------------------------- gradients
def _probe(tmp: Path, name: str, *overrides: str, nproc: int = 1, packed_too: bool = False) -> dict[str, torch.Tensor]:
    """LoRA gradients of one step (padded batches when ``packed_too``, which also checks that the same step with
    packed batches, every forward holding fewer rows than inputs, gives the same gradients: fp32, 1e-5)."""
    out = tmp / f"{name}.safetensors"
    script = str(REPO / "tests" / "helpers" / "grad_probe.py")
    args = [script, str(out), f"paths.data_dir={tmp / 'data'}", "lora.dropout=0", *overrides]
    if packed_too:
        args.append("--packed-too")
    cmd = [sys.executable, *args] if nproc == 1 else [str(VENV_BIN / "torchrun"), f"--nproc_per_node={nproc}",
                                                      f"--master_port={_free_port()}", *args]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-5000:]
    grads = load_file(str(out))
    if packed_too:
        import ast

        from safetensors import safe_open

        packed_file = str(out).replace(".safetensors", ".packed.safetensors")
        with safe_open(packed_file, "pt") as f:
            forwards = ast.literal_eval(f.metadata()["forwards"])  # [(inputs, (packed rows, width)), ...]
        assert forwards and all(shape[0] < rows for rows, shape in forwards), forwards  # really packed
        _assert_equal_grads(grads, load_file(packed_file))
    return grads


def _assert_equal_grads(ref: dict[str, torch.Tensor], *others: dict[str, torch.Tensor]) -> None:
    assert len(ref) == 28 and all(o.keys() == ref.keys() for o in others)
    assert max(v.abs().max().item() for v in ref.values()) > 1e-3  # gradients are not trivially zero
    for k in ref:
        for o in others:
            torch.testing.assert_close(o[k], ref[k], atol=1e-5, rtol=0)


def test_gradients_two_process_and_grad_cache_equal_full_batch(tmp_path) -> None:
    """Padded and packed batches (each probe checks packed == padded on the same step), 1 process, GradCache, 2."""
    full = _probe(tmp_path, "full", "trainer.micro_batch=32", packed_too=True)  # 1 process, the global batch of 32
    gc = _probe(tmp_path, "gc", "trainer.micro_batch=8", "trainer.grad_cache=true", packed_too=True)  # 4 chunks of 8
    two = _probe(tmp_path, "two", "trainer.micro_batch=16", nproc=2, packed_too=True)  # 2 ranks x 16
    _assert_equal_grads(full, gc, two)


@pytest.mark.slow
def test_release_gradient_scale_through_the_trainer_is_full_over_world(tmp_path) -> None:
    # the released code's scale (tests/test_release_fidelity.py derives it on 2 and 4 processes): full / world
    full = _probe(tmp_path, "full", "trainer.micro_batch=32")
    release = _probe(tmp_path, "release", "trainer.micro_batch=16", "loss.gradient_scale=release", nproc=2)
    _assert_equal_grads({k: v / 2 for k, v in full.items()}, release)


@pytest.mark.slow
def test_gradients_zero3_and_activation_checkpointing_equal_full_batch(tmp_path) -> None:
    full = _probe(tmp_path, "full", "trainer.micro_batch=32")
    z3 = _probe(tmp_path, "z3", "trainer=deepspeed_zero3", "trainer.micro_batch=8", "trainer.grad_cache=true",
                nproc=2)  # ZeRO-3, 2 ranks, GradCache chunks of 8
    ac = _probe(tmp_path, "ac", "trainer.micro_batch=8", "trainer.grad_cache=true",
                "trainer.activation_checkpointing=true")  # GradCache + activation checkpointing
    _assert_equal_grads(full, z3, ac)


@pytest.mark.slow  # make test time (23 s); two-process gradients == full batch stays in make test
def test_two_process_training_reduces_loss(tmp_path) -> None:
    out = tmp_path / "out"
    run_train(out, "trainer.max_steps=16", "trainer.save_every=8", "logger=none", nproc=2)
    m = metrics(out / "train" / "run")
    assert len(m) == 16
    assert np.mean([r["train/loss"] for r in m[-3:]]) < 0.7 * np.mean([r["train/loss"] for r in m[:3]])
    state = json.loads((out / "train" / "run" / "checkpoints" / "step-000016" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert (out / "train" / "run" / "checkpoints" / "step-000016" / "rng-rank1.safetensors").is_file()


# ---------------------------------------------------------------------- resume and faults
def _adapter(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:06d}" / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("grad_cache", [False, pytest.param(True, marks=pytest.mark.slow)])  # make test time
def test_resume_after_kill_is_exact(tmp_path, grad_cache: bool) -> None:
    common = ["trainer.max_steps=6", "trainer.save_every=2", "logger=none", "trainer.keep_checkpoints=null",
              f"trainer.grad_cache={str(grad_cache).lower()}", "trainer.micro_batch=8"]
    ref = tmp_path / "ref"
    run_train(ref, *common)
    crash = tmp_path / "crash"
    p = run_train(crash, *common, inject="kill-after-step:3", check=False)
    assert p.returncode != 0  # SIGKILL
    run_dir = crash / "train" / "run"
    assert sorted(d.name for d in (run_dir / "checkpoints").iterdir() if d.name.startswith("step-")) == ["step-000002"]
    run_train(crash, *common)  # resume=auto
    ref_state = json.loads((ref / "train" / "run" / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    state = json.loads((run_dir / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    np.testing.assert_allclose(state["losses"], ref_state["losses"], atol=1e-6, rtol=0)
    a, b = _adapter(ref / "train" / "run", 6), _adapter(run_dir, 6)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    # a finished run resumed again does nothing more
    run_train(crash, *common)
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]  # step 3 redone after the kill, logged once


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path) -> None:
    out = tmp_path / "out"
    p = run_train(out, "trainer.max_steps=6", "trainer.save_every=2", "logger=none",
                  inject="nan-at-step:5", check=False)
    assert p.returncode != 0
    assert "non-finite loss at step 5" in p.stderr and "step-000004" in p.stderr
    ckpts = sorted(d.name for d in (out / "train" / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-000002", "step-000004"]


def test_missing_columns_fail_before_model_load(tmp_path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("sent0,sent1\na,b\n")
    out = tmp_path / "out"
    # a backbone path that does not exist: had the model been loaded first, that error would show instead
    p = run_train(out, f"data.loader.path={bad}", "data=nli", "backbone=e5v",
                  f"backbone.name_or_path={tmp_path / 'no-such-model'}", "logger=none", check=False)
    assert p.returncode != 0
    assert "missing column(s) ['hard_neg']" in p.stderr
    assert "e5v.backbones" not in p.stderr and "config.json" not in p.stderr


def test_global_batch_must_divide(tmp_path) -> None:
    p = run_train(tmp_path / "out", "trainer.global_batch=30", "trainer.micro_batch=8", "logger=none", check=False)
    assert p.returncode != 0 and "not divisible by trainer.micro_batch=8" in p.stderr


def test_bad_rows_skipped_or_rejected(tmp_path) -> None:
    from e5v.data.nli import DataError, load_triplets

    f = tmp_path / "nli.csv"
    f.write_text("sent0,sent1,hard_neg\na,b,c\n,b,c\nd,  ,f\ng,h,i\n")
    t = load_triplets(path=str(f))
    assert t.anchors == ["a", "g"] and t.skipped == {"missing": 1, "empty": 1}
    with pytest.raises(DataError, match=r"row 3: column 'sent0'"):
        load_triplets(path=str(f), on_bad_row="error")


def test_step_sampler_is_deterministic_and_world_free() -> None:
    from e5v.data.nli import StepSampler

    s = StepSampler(100, 16, seed=1)
    assert s.steps_per_epoch == 6
    one = s.rows(7)
    two = np.concatenate([s.rows(7, r, 2) for r in range(2)])
    np.testing.assert_array_equal(one, two)
    assert not np.array_equal(s.rows(0), StepSampler(100, 16, seed=2).rows(0))
    assert len(set(np.concatenate([s.rows(k) for k in range(6)]))) == 96  # no repeats within an epoch


@pytest.mark.slow  # make test time (13 s); the same handler under SIGINT stays in make test
  # (tests/user_paths/test_train_paths.py::test_ctrl_c_checkpoints_the_current_step_and_exits_without_a_traceback)
def test_sigterm_writes_a_checkpoint_then_exits(tmp_path) -> None:
    import signal
    import time

    out = tmp_path / "out"
    args = ["experiment=tiny_cpu", f"paths.output_dir={out}", f"paths.data_dir={tmp_path / 'data'}", "run_name=run",
            "trainer.max_steps=100000", "trainer.save_every=100000", "logger=none"]
    proc = subprocess.Popen([sys.executable, "-m", "e5v.train", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = out / "train" / "run"
    deadline = time.time() + 240
    while time.time() < deadline:
        f = run_dir / "metrics.jsonl"
        if f.is_file() and len(f.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    last = metrics(run_dir)[-1]["step"]
    ckpts = [d.name for d in (run_dir / "checkpoints").iterdir()]
    assert ckpts == [f"step-{last:06d}"], (ckpts, last)
    assert "SIGTERM received" in stdout + err
