"""Peak GPU memory of embedding a batch of images with Phi-3-V at the real shape: an estimate from the config
(weights plus the largest live activations), for our forward (final norm, last token) against the released
one (the full causal LM with ``output_hidden_states=True``: fp32 logits over every position and the vocabulary,
and all hidden states).

  python -m scripts.phi3v_memory [--config tests/fixtures/hub/microsoft__Phi-3-vision-128k-instruct/config.json]
                                 [--images 32] [--rows 4 --cols 4] [--bytes 2]

Counted: weights (``--bytes`` per parameter, bf16 = 2); the vision stage (CLIP on ``VISION_CHUNK`` crops at a
time, their features, the merged / projected image tokens); the decoder's largest layer working set (the MLP:
residual, normed input, gate_up, act(gate), product; the RMSNorm's fp32 upcast is smaller) with attention that
stores no (L x L) scores (FlashAttention-2 / SDPA, as configured); the released path adds its logits (bf16, then
the fp32 copy) and the 33 hidden states it returns. Not counted: the CUDA context, allocator fragmentation,
the processor's CPU tensors. A 4 x 4-crop image (any square image at num_crops 16) is the largest: 17 crops,
2,509 tokens. An estimate, not a measurement (no GPU in this session).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HUB_CONFIG = REPO / "tests" / "fixtures" / "hub" / "microsoft__Phi-3-vision-128k-instruct" / "config.json"
GB = 1e9


def estimate(cfg: dict[str, Any], images: int = 32, rows: int = 4, cols: int = 4, nbytes: int = 2) -> dict[str, Any]:
    from e5v.backbones.phi3_v_model import CLIP_VIT_L14_336, VISION_CHUNK

    v = {**CLIP_VIT_L14_336, **(cfg["img_processor"].get("e5v_vision_config") or {})}
    h, i, n_layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = h // heads
    c, ci, vl = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    grid = v["image_size"] // v["patch_size"]
    g = grid // 2
    per_image = (rows * cols + 1) * g * g + 1 + (rows + 1) * g  # image tokens
    prompt = 20  # the E5-V image prompt's text tokens around the image
    t = images * (per_image + prompt)
    crops = images * (rows * cols + 1)
    # parameters
    text_layer = h * (heads + 2 * kv) * head_dim + heads * head_dim * h + h * 2 * i + i * h + 2 * h
    vision_layer = 4 * c * c + 4 * c + 2 * c * ci + ci + c + 4 * c
    params = {
        "embed_tokens": vocab * h, "decoder_layers": n_layers * text_layer, "norm": h, "lm_head": vocab * h,
        "clip": vl * vision_layer + (grid * grid + 1) * c + 3 * v["patch_size"] ** 2 * c + c + 4 * c,
        "projector_separators": 4 * c * h + h + h * h + h + 8 * c,
    }
    weights = sum(params.values()) * nbytes
    tok = t * h * nbytes  # one (tokens, hidden) activation
    # vision stage: one chunk of CLIP (embeddings/residual, normed, attention out, fc1, activation) + features so far
    chunk = min(VISION_CHUNK, crops) * (grid * grid + 1)
    clip_chunk = chunk * (3 * c + 2 * ci) * nbytes
    features = crops * grid * grid * c * nbytes
    merged = images * per_image * 4 * c * nbytes
    projected = images * per_image * 2 * h * nbytes  # linear 1 + GELU outputs (the second linear's replaces them)
    vision_peak = max(features + clip_chunk, features + merged, merged + projected) + tok  # + the token embeddings
    # decoder: the MLP of one layer (residual, normed input, gate_up, act(gate), act * up)
    mlp = 2 * tok + t * (2 * i + 2 * i) * nbytes
    attention = 2 * tok + t * (heads + 2 * kv) * head_dim * nbytes + 3 * tok  # qkv, rotated q/k, output
    norm_fp32 = tok + t * h * 4
    decoder_peak = max(mlp, attention, norm_fp32)
    ours = weights + max(vision_peak, decoder_peak)
    logits_bf16 = t * vocab * nbytes
    logits_fp32 = t * vocab * 4
    hidden_states = (n_layers + 1) * tok
    released = weights + max(vision_peak, hidden_states + max(decoder_peak, logits_bf16 + logits_fp32))
    return {
        "images": images, "crops_per_image": rows * cols + 1, "tokens_per_image": per_image + prompt, "tokens": t,
        "params_billion": round(sum(params.values()) / 1e9, 3),
        "GB": {k: round(x / GB, 2) for k, x in {
            "weights": weights, "vision_stage_peak": vision_peak, "decoder_layer_peak": decoder_peak,
            "ours_peak": ours, "released_logits_fp32": logits_fp32, "released_logits_bf16": logits_bf16,
            "released_hidden_states": hidden_states, "released_extra": logits_fp32 + hidden_states,
            "released_peak": released}.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=HUB_CONFIG)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--cols", type=int, default=4)
    ap.add_argument("--bytes", type=int, default=2, help="bytes per parameter / activation (bf16: 2)")
    a = ap.parse_args(argv)
    print(json.dumps(estimate(json.loads(a.config.read_text()), a.images, a.rows, a.cols, a.bytes), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
