"""Qwen3-VL (Qwen/Qwen3-VL-2B/4B/8B-Instruct): native to transformers 5, no remote code. Beyond the paper: the
E5-V prompts in Qwen3-VL's own chat template (``configs/prompt/e5v_qwen3_vl.yaml``: no default system message,
unlike Qwen2-VL's).

The Qwen2-VL machinery (:mod:`e5v.backbones.qwen2_vl`) carries over as it is, because what it relies on did
not change in transformers' Qwen3-VL:

* ``get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=, attention_mask=)`` has the same signature and
  drops the masked (left padding) tokens before numbering, so a left-padded row gets the positions it has
  alone (tested); text rows get the mask's positions. Qwen3-VL numbers an image's height / width rows from the
  image's first position and lays the three rows out interleaved in the rotary dimensions
  (``mrope_section`` [24, 20, 20]): both inside the model, from those positions.
* DeepStack (features of some vision layers added to the first decoder layers' hidden states at the image
  tokens) runs inside ``Qwen3VLModel.forward`` from ``pixel_values`` and ``image_grid_thw``: the family's
  forward passes what Qwen2-VL's passes.
* Packing: text only (a packed text batch gives the 4-row positions the text model splits into the text
  row and the three rotary rows); images stay padded, as Qwen2-VL's.

LoRA on ``model.language_model.layers.*`` (q, k, v, o, gate, up, down), the vision tower with its mergers
(``model.visual``) frozen. ``tiny_qwen3_vl``: a random tiny variant built offline from a seed, the hub's
Qwen3-VL-4B-Instruct config shrunk (widths, depths, vocabulary; M-RoPE sections in the hub's 24:20:20 proportion,
3 DeepStack layers; every other field the hub's, tied word embeddings included) with the hub's image geometry and
normalisation (16 px patches, merge 2, temporal patch 2, mean / std 0.5), both checked field by field against the
checkpoint's files in tests/fixtures/hub/.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from e5v.backbones import qwen2_vl, registry
from e5v.backbones.qwen2_vl import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, Qwen2VLBackbone

# model_type -> (model class, processor class) in transformers
CLASSES = {"qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor")}

# The tiny variant's chat template, written here: for system / user / assistant messages of text and images it
# renders what Qwen3-VL-Instruct's own template renders (the hub's chat_template.json, ~5.3k characters with tool
# calling; no default system message, unlike Qwen2-VL's). Real checkpoints bring their own template; the E5-V
# prompts are checked against the hub's in tests/test_backbone_contract.py where its file is stored.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Qwen3VLBackbone(Qwen2VLBackbone):
    """Qwen3-VL: Qwen2-VL's forward (the model's own ``get_rope_index`` with the mask; DeepStack inside the
    model), Qwen3-VL's chat template."""

    prompt_name = "e5v_qwen3_vl"


def load(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "auto",
    revision: str | None = None,
    local_files_only: bool | None = None,
    attn_implementation: str | None = "sdpa",
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    trust_remote_code: bool = False,
    quantize: str | None = None,
    family: str | None = None,
) -> Qwen3VLBackbone:
    """Load a Qwen3-VL checkpoint (hub id or local directory). ``min_pixels`` / ``max_pixels``: the image
    processor's pixel bounds (None: the checkpoint's)."""
    return qwen2_vl.load_checkpoint(CLASSES, Qwen3VLBackbone, name_or_path, dtype=dtype, device=device,
                                    revision=revision, local_files_only=local_files_only,
                                    attn_implementation=attn_implementation, min_pixels=min_pixels,
                                    max_pixels=max_pixels, trust_remote_code=trust_remote_code, quantize=quantize,
                                    family=family)


# ---------------------------------------------------------------------- tiny offline variant
TINY_VERSION = 1
# Qwen3-VL-4B-Instruct's config (tests/fixtures/hub), shrunk; the fields it keeps (rope theta, activations, tied
# embeddings, patch and merge sizes, image mean / std) are in HUB.
TINY_SIZES: dict[str, Any] = {
    "vocab_size": 640,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 1024,
    "mrope_section": [6, 5, 5],  # the hub's [24, 20, 20] over a rotary half-dim of 64, here of 16
    "vision_depth": 4,
    "vision_hidden_size": 32,
    "vision_intermediate_size": 64,
    "vision_heads": 4,
    "num_position_embeddings": 64,  # an 8 x 8 grid of learned positions (the hub's: 48 x 48)
    "deepstack_visual_indexes": [0, 1, 2],  # 3 vision layers' features into the first 3 decoder layers, as the hub's
    "min_pixels": 64 * 64,  # at least 2 x 2 image tokens (merged 32 px patches), as the hub's 256 x 256 gives 8 x 8
    "max_pixels": 128 * 128,  # at most 16 image tokens
}
HUB = {  # the hub's values that the tiny keeps (Qwen3-VL-4B-Instruct config.json, preprocessor_config.json)
    "rope_theta": 5000000.0, "rms_norm_eps": 1e-6, "hidden_act": "silu", "vision_hidden_act": "gelu_pytorch_tanh",
    "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "tie_word_embeddings": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
}


def build_config(tokenizer: Any, s: dict[str, Any] = TINY_SIZES) -> Any:
    from transformers import Qwen3VLConfig

    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in
           (("image", IMAGE_PAD), ("video", VIDEO_PAD), ("start", VISION_START), ("end", VISION_END))}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"], head_dim=s["head_dim"],
        max_position_embeddings=s["max_position_embeddings"], hidden_act=HUB["hidden_act"],
        rms_norm_eps=HUB["rms_norm_eps"], attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": HUB["rope_theta"], "mrope_interleaved": True,
                         "mrope_section": list(s["mrope_section"])},
        # as the hub's: BOS is <|endoftext|> (Qwen's tokenizer adds none), no pad id in the model config
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None, tie_word_embeddings=HUB["tie_word_embeddings"],
    )
    vision = dict(
        depth=s["vision_depth"], hidden_size=s["vision_hidden_size"], intermediate_size=s["vision_intermediate_size"],
        num_heads=s["vision_heads"], hidden_act=HUB["vision_hidden_act"], in_channels=3,
        patch_size=HUB["patch_size"], spatial_merge_size=HUB["spatial_merge_size"],
        temporal_patch_size=HUB["temporal_patch_size"], out_hidden_size=s["hidden_size"],
        num_position_embeddings=s["num_position_embeddings"],
        deepstack_visual_indexes=list(s["deepstack_visual_indexes"]),
    )
    return Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["image"], video_token_id=ids["video"],
        vision_start_token_id=ids["start"], vision_end_token_id=ids["end"],
        tie_word_embeddings=HUB["tie_word_embeddings"],
    )


def save_tiny(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny Qwen3-VL from ``seed`` and ``save_pretrained`` it (with its tokenizer and image processor)."""
    from transformers import Qwen3VLForConditionalGeneration

    s = TINY_SIZES
    tokenizer = qwen2_vl.build_tokenizer(s["vocab_size"], chat_template=CHAT_TEMPLATE)
    config = build_config(tokenizer, s)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config).eval()
    image_processor = qwen2_vl.image_processor_class()(
        min_pixels=s["min_pixels"], max_pixels=s["max_pixels"], patch_size=HUB["patch_size"],
        merge_size=HUB["spatial_merge_size"], temporal_patch_size=HUB["temporal_patch_size"],
        image_mean=HUB["image_mean"], image_std=HUB["image_std"],
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True, is_main_process=True)
    tokenizer.save_pretrained(path)  # the chat template goes with the tokenizer
    image_processor.save_pretrained(path)
    (path / "e5v_tiny.json").write_text(
        json.dumps({"seed": seed, "version": TINY_VERSION, "model_type": "qwen3_vl", "sizes": s}, indent=2) + "\n"
    )
    return path


def tiny_folder(cfg: Any, build: bool = False) -> Path:
    """The build folder of the tiny Qwen3-VL config (built once, atomically, when ``build``)."""
    from e5v.backbones.tiny import family_tiny_folder

    seed = int(cfg.get("seed") or 0)
    recipe = {"v": TINY_VERSION, "seed": seed, "sizes": TINY_SIZES, "hub": HUB,
              "template": hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()}
    return family_tiny_folder(cfg, "qwen3_vl", recipe, lambda tmp: save_tiny(tmp, seed), build)


def load_tiny(
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "cpu",
    cache_dir: str | None = None,
    attn_implementation: str | None = "sdpa",
) -> Qwen3VLBackbone:
    """Build (or reuse) the tiny Qwen3-VL and load it through :func:`load`."""
    path = tiny_folder({"seed": seed, "cache_dir": cache_dir}, build=True)
    backbone = load(str(path), dtype=dtype, device=device, local_files_only=True,
                    attn_implementation=attn_implementation, family="tiny_qwen3_vl")
    backbone.info["seed"] = seed
    return backbone


registry.register(registry.BackboneSpec(
    name="qwen3_vl", loader=load, model_types=tuple(CLASSES), family=Qwen3VLBackbone,
    description="Qwen3-VL (2B, 4B, 8B) Instruct, native to transformers",
))
registry.register(registry.BackboneSpec(
    name="tiny_qwen3_vl", loader=load_tiny, builtin=True, tiny=True, folder=tiny_folder,
    build=lambda cfg: tiny_folder(cfg, build=True), description="tiny random Qwen3-VL built offline from a seed",
))
