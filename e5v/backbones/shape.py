"""``llava_next_8b_shape``: the full LLaVA-NeXT-8B architecture (Llama-3-8B + CLIP ViT-L/14-336 +
anyres) with random weights, for throughput and memory benchmarks without downloading weights.

The model is created on the meta device (no memory), then every parameter is materialised directly
on the target device in the target dtype (N(0, 0.02) for matrices, ones/zeros for norms and biases),
so an 8B model never exists twice or in float32 on the host. Buffers (rotary frequencies, position
ids) are built normally. The tokenizer is the tiny one (ids < its vocabulary), so text token counts
differ from Llama-3's; image token counts are exactly LLaVA-NeXT-8B's.
"""

from __future__ import annotations

from typing import Any

import torch

from e5v.backbones import llava_next, registry, tiny
from e5v.backbones.base import resolve_attn_implementation, resolve_device, resolve_dtype

# LLaVA-NeXT-8B (llava-hf/llama3-llava-next-8b-hf) dimensions.
TEXT = dict(
    vocab_size=128320,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
VISION = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
)
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def build_config(image_token_id: int, num_hidden_layers: int | None = None) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    text = dict(TEXT)
    if num_hidden_layers:
        text["num_hidden_layers"] = int(num_hidden_layers)
    return LlavaNextConfig(
        text_config=LlamaConfig(**text),
        vision_config=CLIPVisionConfig(**VISION),
        image_token_index=image_token_id,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )


def build_meta_model(config: Any, attn_implementation: str | None = "sdpa") -> torch.nn.Module:
    """The model with parameters on the meta device and real buffers on the CPU."""
    from accelerate import init_empty_weights
    from transformers import LlavaNextForConditionalGeneration

    config._attn_implementation = attn_implementation
    with init_empty_weights(include_buffers=False):
        return LlavaNextForConditionalGeneration(config)


@torch.no_grad()
def materialise(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Replace every meta parameter by a freshly initialised tensor on ``device`` in ``dtype``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for mod_name, module in model.named_modules():
        for p_name, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            t = torch.empty(p.shape, device=device, dtype=dtype)
            full = f"{mod_name}.{p_name}"
            if p.ndim == 1 and p_name == "bias":
                t.zero_()
            elif p.ndim == 1 and ("norm" in full or "layernorm" in full or "layer_norm" in full):
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=gen)
            module._parameters[p_name] = torch.nn.Parameter(t, requires_grad=p.requires_grad)
    model.to(device)  # buffers
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"parameters left on the meta device: {left[:5]}")
    return model


def load(
    seed: int = 0,
    dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device | None = "auto",
    attn_implementation: str | None = "sdpa",
    num_hidden_layers: int | None = None,
    max_tiles: int | None = None,
) -> llava_next.LlavaNextBackbone:
    tokenizer = tiny.build_tokenizer()
    config = build_config(tokenizer.convert_tokens_to_ids("<image>"), num_hidden_layers)
    dev, torch_dtype = resolve_device(device), resolve_dtype(dtype, device)
    attn_implementation = resolve_attn_implementation(attn_implementation, dev, torch_dtype)
    model = materialise(build_meta_model(config, attn_implementation), dev, torch_dtype, seed)
    model.eval()
    image_processor = tiny.build_image_processor(
        {"vision_image_size": VISION["image_size"], "image_grid_pinpoints": PINPOINTS}
    )
    processor = llava_next.build_processor(config, tokenizer, image_processor, max_tiles=max_tiles)
    return llava_next.LlavaNextBackbone(
        model=model,
        processor=processor,
        family="llava_next_8b_shape",
        name_or_path="llava_next_8b_shape",
        max_length=TEXT["max_position_embeddings"],
        info={
            "seed": seed,
            "num_hidden_layers": config.text_config.num_hidden_layers,
            "max_tiles": max_tiles,
            "attn_implementation": attn_implementation,
        },
    )


registry.register(registry.BackboneSpec(
    name="llava_next_8b_shape", loader=load, builtin=True,
    description="the LLaVA-NeXT-8B architecture with random weights (GPU throughput / memory benchmarks)",
))
