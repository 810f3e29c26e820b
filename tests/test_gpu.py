"""CUDA checks on the tiny model (bf16): parity with float32, batch invariance, packed vs padded batches, workers
with pinned memory, and DeepSpeed ZeRO-2 training steps (plain and GradCache; on CUDA ``trainer.packing=auto``
packs them, image-caption batches are prepared in DataLoader workers) through the real Trainer.

Marked ``gpu``: skipped by default (``addopts``), run by ``scripts/gpu_check.sh`` or
``pytest -m gpu``. Tolerances were set at 10x what the same comparisons give in bf16 on a CPU.
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

from test_embedder import TEXTS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cuda_fp32(tiny_dir):
    from e5v import Embedder

    return Embedder.from_pretrained("tiny", device="cuda", dtype="float32", batch_size=8)


@pytest.fixture(scope="module")
def cuda_bf16(tiny_dir):
    from e5v import Embedder

    return Embedder.from_pretrained("tiny", device="cuda", dtype="bfloat16", batch_size=8)


def _inputs(images):
    return {
        "text": TEXTS,
        "image": images,
        "interleaved": [(im, t) for im, t in zip(images, TEXTS + ["make it blue"])],
    }


def _encode(emb, kind, x, **kw):
    return {"text": emb.encode_text, "image": emb.encode_image, "interleaved": emb.encode_interleaved}[kind](x, **kw)


@pytest.mark.parametrize("kind", ["text", "image", "interleaved"])
def test_bf16_matches_fp32(cuda_fp32, cuda_bf16, images, kind) -> None:
    x = _inputs(images)[kind]
    a, b = _encode(cuda_fp32, kind, x), _encode(cuda_bf16, kind, x)
    assert a.shape == b.shape and np.isfinite(b).all()
    cos = (a * b).sum(1)
    assert cos.min() > 0.999, cos
    assert np.abs(a - b).max() < 0.03


@pytest.mark.parametrize("kind", ["text", "image", "interleaved"])
def test_bf16_batch_invariance(cuda_bf16, images, kind) -> None:
    x = _inputs(images)[kind]
    batched = _encode(cuda_bf16, kind, x, batch_size=len(x))
    alone = np.stack([_encode(cuda_bf16, kind, [xi])[0] for xi in x])
    assert np.abs(batched - alone).max() < 0.01
    assert (batched * alone).sum(1).min() > 0.9995


@pytest.mark.parametrize("kind", ["text", "image", "interleaved"])
def test_bf16_packed_matches_padded(cuda_bf16, images, kind) -> None:
    """Packed batches (several rows per pack, block-diagonal mask from the positions) on CUDA in bf16: as close
    to the padded batches as batch invariance is (the fp32 exactness is tests/test_packing.py, on the CPU)."""
    from e5v import Embedder

    x = _inputs(images)[kind]
    padded = Embedder(cuda_bf16.backbone, cuda_bf16.prompt, batch_size=8, packing="false")
    packed = Embedder(cuda_bf16.backbone, cuda_bf16.prompt, batch_size=8, packing="true", pack_tokens=160)
    a, b = _encode(padded, kind, x), _encode(packed, kind, x)
    assert packed.last_packed and not padded.last_packed
    assert np.abs(a - b).max() < 0.01 and (a * b).sum(1).min() > 0.9995


def test_cuda_fp32_matches_cpu(embedder, cuda_fp32, images) -> None:
    np.testing.assert_allclose(cuda_fp32.encode_text(TEXTS), embedder.encode_text(TEXTS), atol=5e-3)
    np.testing.assert_allclose(cuda_fp32.encode_image(images), embedder.encode_image(images), atol=5e-3)


def _released(emb, prompt: str, image=None) -> np.ndarray:
    """The released recipe on CUDA: one item, full model, hidden_states[-1][:, -1], L2-normalised."""
    import torch.nn.functional as F

    if image is None:
        enc = emb.tokenizer([prompt], return_tensors="pt")
    else:
        enc = emb.processor(text=[prompt], images=[image], return_tensors="pt")
    dtype = emb.backbone.dtype
    enc = {k: (v.to("cuda", dtype) if v.is_floating_point() else v.to("cuda")) for k, v in enc.items()}
    with torch.no_grad():
        out = emb.model(**enc, output_hidden_states=True)
    return F.normalize(out.hidden_states[-1][:, -1].float(), dim=-1)[0].cpu().numpy()


def test_bf16_recipe_parity(cuda_bf16, images) -> None:
    """Ours (batched, decoder only) vs the released recipe (one item, full model) in bf16 on CUDA."""
    ours = cuda_bf16.encode_text(TEXTS)
    for i, t in enumerate(TEXTS):
        assert float(ours[i] @ _released(cuda_bf16, cuda_bf16.prompt.render("text", t))) > 0.999
    ours = cuda_bf16.encode_image(images)
    for i, im in enumerate(images):
        assert float(ours[i] @ _released(cuda_bf16, cuda_bf16.prompt.render("image"), im)) > 0.999


def test_workers_pinned_identical(cuda_bf16, images) -> None:
    from e5v import Embedder

    fast = Embedder(cuda_bf16.backbone, cuda_bf16.prompt, batch_size=2, num_workers=2, pin_memory=True,
                    max_batch_tokens=4096)
    np.testing.assert_allclose(fast.encode_image(images), cuda_bf16.encode_image(images, batch_size=2), atol=1e-6)


@pytest.mark.parametrize("data", ["mini_nli", "mini_pairs"])
@pytest.mark.parametrize("grad_cache", [False, True])
def test_deepspeed_zero2_step_on_cuda(tmp_path, grad_cache, data) -> None:
    """Two optimizer steps of ZeRO-2 bf16 LoRA training on CUDA through the real entry point: text
    triplets (E5-V) and image-caption pairs (Table 7: image anchors through the frozen vision tower)."""
    out = tmp_path / "out"
    args = [
        sys.executable, "-m", "e5v.train", "experiment=tiny_cpu", "trainer.precision=bf16", "trainer.max_steps=2",
        "trainer.save_every=2", "logger=none", "run_name=gpu", f"paths.output_dir={out}", f"data={data}",
        f"paths.data_dir={tmp_path / 'data'}", f"trainer.grad_cache={str(grad_cache).lower()}",
    ]
    if grad_cache:
        args += ["trainer.global_batch=32", "trainer.micro_batch=8"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    path = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)  # keep the check's wheels
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", E5V_NO_PROGRESS="1", PYTHONPATH=path)
    p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-5000:]
    run = out / "train" / "gpu"
    m = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in m] == [1, 2]
    assert all(np.isfinite(r["train/loss"]) and r["train/peak_mem_gb"] > 0 for r in m)
    if grad_cache:
        assert m[-1]["train/gradcache_replay_err"] < 0.05  # bf16 replay of the same chunk
    assert (run / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors").is_file()
    info = json.loads((run / "train_info.json").read_text())
    assert info["data"]["anchor_kind"] == ("image" if data == "mini_pairs" else "text")
