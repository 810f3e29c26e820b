"""Qwen2-VL and Qwen2.5-VL (Qwen/Qwen2-VL-2B/7B-Instruct, Qwen/Qwen2.5-VL-3B/7B-Instruct): native to
transformers 5, no remote code. Beyond the paper: the E5-V prompts in Qwen's own chat template
(``configs/prompt/e5v_qwen2_vl.yaml``).

* Processor: tokenizer + Qwen2-VL image processor (dynamic resolution: ``min_pixels`` / ``max_pixels``
  bound the image tokens), built here for images only (no video processor: transformers' class check
  needs torchvision for one, and E5-V embeds no video). One batched call per image batch, left padded.
* Positions: multimodal rotary positions (3 rows: time, height, width for image tokens; equal for text)
  from the model's OWN ``get_rope_index`` with the attention mask, so left padding does not shift them;
  for text-only batches the mask's positions (what ``get_rope_index`` gives for text, tested).
* Forward: ``Qwen2VLModel`` (vision tower + language model, post-norm), last token; no vocabulary
  projection. LoRA on ``model.language_model.layers.*`` (q, k, v, o, gate, up, down), the vision tower
  and merger (``model.visual``) frozen.
* ``tiny_qwen2_vl`` / ``tiny_qwen2_5_vl``: random tiny variants built offline from a seed (byte-level BPE
  tokenizer with Qwen's special tokens and chat template), saved and loaded through the same path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from e5v.backbones import registry
from e5v.backbones.base import (
    Backbone,
    Inputs,
    hf_model,
    image_processor_class as base_image_processor_class,
    images_only,
    read_chat_template,
    resolve_attn_implementation,
    resolve_device,
    resolve_dtype,
    left_padded,
)

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_TOKEN = VISION_START + IMAGE_PAD + VISION_END  # what a prompt writes for one image
# model_type -> (model class, processor class) in transformers
CLASSES = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
}

# Qwen2-VL / Qwen2.5-VL Instruct chat template (the hub's; both models use this one; equal character for
# character to Qwen2-VL-2B-Instruct's tokenizer_config.json template, 1,017 characters, checked 2026-12-02):
# a default system message, then each message; images as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def image_processor_class() -> type:
    return base_image_processor_class("Qwen2VLImageProcessor", "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl",
                                      "Qwen2VLImageProcessorPil")


def build_processor(model_type: str, tokenizer: Any, image_processor: Any, chat_template: str | None,
                    classes: dict[str, tuple[str, str]] = CLASSES) -> Any:
    import transformers

    left_padded(tokenizer)
    cls = images_only(getattr(transformers, classes[model_type][1]))
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


class Qwen2VLBackbone(Backbone):
    """Qwen2-VL / Qwen2.5-VL: the E5-V forward with multimodal rotary positions from ``get_rope_index``.

    Packing: text only. A packed text batch passes its restarting positions in Qwen's 4-row form (the text row
    + time, height, width rows, all equal for text), from which transformers builds the block-diagonal mask."""

    inputs_class = Inputs  # one batched processor call (left padded), positions from the mask
    frozen_modules = ("model.visual",)
    prompt_name = "e5v_qwen2_vl"
    packable = ("text",)
    packing_note = ("image inputs: their multimodal rotary positions come from get_rope_index on the padded "
                    "batch, not per packed segment")
    save_processor_parts = True  # an images-only processor
    # "mrope": image tokens get the model's 3-row positions (get_rope_index). "text": every token, image tokens
    # included, the mask's 1-D position in all three rows: what VLM2Vec's own Qwen2-VL code computes for its
    # bare <|image_pad|> prompts (its get_rope_index finds images only after <|vision_start|>).
    image_positions = "mrope"

    def forward(self, batch: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> torch.Tensor:
        inner = hf_model(model if model is not None else self.model).model  # Qwen2VLModel / Qwen2_5_VLModel
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        grid, types = batch.get("image_grid_thw"), batch.get("mm_token_type_ids")
        positions = batch.get("position_ids")
        pixel_values = batch.get("pixel_values")
        if mask is None and grid is None and positions is not None and positions.ndim == 2:
            # packed text: (4, P, L) = the text positions (segments) + the three rotary rows (equal for text)
            positions = positions.unsqueeze(0).expand(4, -1, -1)
        if grid is not None:
            if types is None:
                types = (ids == self.model.config.image_token_id).int()
            if self.image_positions == "text":  # (3, B, L): the mask's positions, left padding skipped
                m = mask if mask is not None else torch.ones_like(ids)
                positions = (m.long().cumsum(-1) - 1).clamp(min=0).unsqueeze(0).expand(3, -1, -1)
            else:  # the model's own 3-row positions; with the mask, so left padding does not shift them
                positions, _ = inner.get_rope_index(ids, types, image_grid_thw=grid, attention_mask=mask)
            pixel_values = pixel_values.to(inner.visual.dtype)
        out = inner(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            pixel_values=pixel_values,
            image_grid_thw=grid,
            mm_token_type_ids=types,
            use_cache=False,
        )
        return self.pool(out.last_hidden_state, batch)  # (B, d)



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
    image_token: str | None = None,
    image_positions: str = "mrope",
) -> Qwen2VLBackbone:
    """Load a Qwen2-VL or Qwen2.5-VL checkpoint (hub id or local directory). ``min_pixels`` /
    ``max_pixels``: the image processor's pixel bounds (fewer pixels, fewer image tokens; None: the
    checkpoint's). ``image_token``: what a prompt writes for one image (None: Qwen's
    ``<|vision_start|><|image_pad|><|vision_end|>``; VLM2Vec-Qwen2VL was trained on a bare ``<|image_pad|>``).
    ``image_positions``: ``mrope`` (the model's multimodal rotary positions) or ``text`` (1-D positions for
    image tokens too, as VLM2Vec's own Qwen2-VL code gives its bare ``<|image_pad|>`` prompts)."""
    if image_positions not in ("mrope", "text"):
        raise ValueError(f"image_positions must be 'mrope' or 'text', got {image_positions!r}")
    backbone = load_checkpoint(CLASSES, Qwen2VLBackbone, name_or_path, dtype=dtype, device=device, revision=revision,
                               local_files_only=local_files_only, attn_implementation=attn_implementation,
                               min_pixels=min_pixels, max_pixels=max_pixels, trust_remote_code=trust_remote_code,
                               quantize=quantize, family=family, image_token=image_token)
    backbone.image_positions = image_positions
    backbone.info["image_positions"] = image_positions
    return backbone


def load_checkpoint(
    classes: dict[str, tuple[str, str]],
    backbone_class: type[Qwen2VLBackbone],
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
    image_token: str | None = None,
) -> Any:
    """The loading path of every Qwen-VL generation (Qwen2-VL, Qwen2.5-VL here; Qwen3-VL in
    :mod:`e5v.backbones.qwen3_vl`): ``classes`` maps the model types it accepts to (model class, processor
    class) in transformers, and ``backbone_class`` is the :class:`Qwen2VLBackbone` subclass it returns."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    from e5v.backbones.auto import locate_config
    from e5v.backbones.llava_next import hub_kwargs, quantization_config, quantized_device_map

    if trust_remote_code:
        raise ValueError(f"{backbone_class.__name__.removesuffix('Backbone')} is built into transformers: "
                         "trust_remote_code must stay false")
    path = str(name_or_path)
    kw = hub_kwargs(revision, local_files_only)
    locate_config(path, revision, local_files_only)
    config = AutoConfig.from_pretrained(path, **kw)
    if config.model_type not in classes:
        raise ValueError(f"{path} is a '{config.model_type}' model, not one of {sorted(classes)}")
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    pix: dict[str, Any] = {}
    if min_pixels:
        pix["min_pixels"] = int(min_pixels)
    if max_pixels:
        pix["max_pixels"] = int(max_pixels)
    image_processor = image_processor_class().from_pretrained(path, **kw, **pix)
    template = read_chat_template(path, kw) or getattr(tokenizer, "chat_template", None)
    processor = build_processor(config.model_type, tokenizer, image_processor, template, classes)
    torch_dtype, dev = resolve_dtype(dtype, device), resolve_device(device)
    attn = resolve_attn_implementation(attn_implementation, dev, torch_dtype)
    if quantize:
        kw["quantization_config"] = quantization_config(quantize, torch_dtype, dev, skip=["visual", "lm_head"])
        kw["device_map"] = quantized_device_map(dev)
    model_class = getattr(transformers, classes[config.model_type][0])
    model = model_class.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn, use_safetensors=True, **kw)
    if not quantize:
        model.to(dev)
    model.eval()
    return backbone_class(
        model=model,
        processor=processor,
        family=family or config.model_type,
        name_or_path=path,
        image_token=image_token or IMAGE_TOKEN,
        max_length=int(getattr(config.text_config, "max_position_embeddings", 0)) or None,
        info={"revision": revision, "attn_implementation": attn, "min_pixels": min_pixels, "max_pixels": max_pixels},
    )


# ---------------------------------------------------------------------- tiny offline variants
TINY_VERSION = 1
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
TINY_SIZES: dict[str, Any] = {
    "vocab_size": 640,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "mrope_section": [2, 3, 3],  # rotary half-dim (head 16 -> 8) split over time, height, width
    "vision_depth": 2,
    "vision_hidden_size": 32,
    "vision_heads": 4,
    "patch_size": 8,
    "merge_size": 2,
    "min_pixels": 16 * 16,      # at least one merged 16x16 patch
    "max_pixels": 64 * 64,      # at most 16 image tokens
}


def build_tokenizer(vocab_size: int, chat_template: str = CHAT_TEMPLATE) -> Any:
    """A byte-level BPE tokenizer with Qwen's special tokens and ``chat_template`` (no BOS, as Qwen)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from e5v.backbones.tiny import tiny_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([*tiny_corpus(), "system You are a helpful assistant. user assistant"], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=TINY_SIZES["max_position_embeddings"],
        chat_template=chat_template,
    )


def build_config(model_type: str, tokenizer: Any, s: dict[str, Any]) -> Any:
    import transformers

    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in
           (("image", IMAGE_PAD), ("video", VIDEO_PAD), ("start", VISION_START), ("end", VISION_END))}
    text = dict(
        vocab_size=len(tokenizer), hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_hidden_layers"], num_attention_heads=s["num_attention_heads"],
        num_key_value_heads=s["num_key_value_heads"], max_position_embeddings=s["max_position_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(s["mrope_section"])},
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    common = dict(depth=s["vision_depth"], num_heads=s["vision_heads"], patch_size=s["patch_size"],
                  spatial_merge_size=s["merge_size"], temporal_patch_size=2, in_channels=3)
    if model_type == "qwen2_vl":
        vision = dict(common, embed_dim=s["vision_hidden_size"], hidden_size=s["hidden_size"], mlp_ratio=2)
        cls = transformers.Qwen2VLConfig
    else:
        unit = s["patch_size"] * s["merge_size"]
        vision = dict(common, hidden_size=s["vision_hidden_size"], intermediate_size=2 * s["vision_hidden_size"],
                      out_hidden_size=s["hidden_size"], window_size=2 * unit,
                      fullatt_block_indexes=[s["vision_depth"] - 1])
        cls = transformers.Qwen2_5_VLConfig
    return cls(
        text_config=text, vision_config=vision, image_token_id=ids["image"], video_token_id=ids["video"],
        vision_start_token_id=ids["start"], vision_end_token_id=ids["end"], tie_word_embeddings=False,
    )


def save_tiny(path: str | Path, model_type: str, seed: int = 0) -> Path:
    """Build the tiny model of ``model_type`` from ``seed`` and ``save_pretrained`` it (with processor files)."""
    import transformers

    s = TINY_SIZES
    tokenizer = build_tokenizer(s["vocab_size"])
    config = build_config(model_type, tokenizer, s)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, CLASSES[model_type][0])(config).eval()
    image_processor = image_processor_class()(
        min_pixels=s["min_pixels"], max_pixels=s["max_pixels"], patch_size=s["patch_size"],
        merge_size=s["merge_size"], temporal_patch_size=2,
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True, is_main_process=True)
    # the parts (ProcessorMixin.save_pretrained wants a video processor); the chat template goes with the tokenizer
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    (path / "e5v_tiny.json").write_text(
        json.dumps({"seed": seed, "version": TINY_VERSION, "model_type": model_type, "sizes": s}, indent=2) + "\n"
    )
    return path


def tiny_folder(cfg: Any, build: bool = False) -> Path:
    """The build folder of a tiny Qwen backbone config (built once, atomically, when ``build``)."""
    from e5v.backbones.tiny import family_tiny_folder

    model_type, seed = str(cfg.get("model_type") or "qwen2_vl"), int(cfg.get("seed") or 0)
    return family_tiny_folder(cfg, model_type, {"v": TINY_VERSION, "seed": seed, "model_type": model_type,
                                                "sizes": TINY_SIZES}, lambda tmp: save_tiny(tmp, model_type, seed), build)


def load_tiny(
    model_type: str = "qwen2_vl",
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "cpu",
    cache_dir: str | None = None,
    attn_implementation: str | None = "sdpa",
) -> Qwen2VLBackbone:
    """Build (or reuse) a tiny Qwen2-VL / Qwen2.5-VL and load it through :func:`load`."""
    if model_type not in CLASSES:
        raise ValueError(f"model_type must be one of {sorted(CLASSES)}, got {model_type!r}")
    path = tiny_folder({"model_type": model_type, "seed": seed, "cache_dir": cache_dir}, build=True)
    backbone = load(str(path), dtype=dtype, device=device, local_files_only=True,
                    attn_implementation=attn_implementation, family=f"tiny_{model_type}")
    backbone.info["seed"] = seed
    return backbone


registry.register(registry.BackboneSpec(
    name="qwen2_vl", loader=load, model_types=tuple(CLASSES), family=Qwen2VLBackbone,
    description="Qwen2-VL (2B, 7B) and Qwen2.5-VL (3B, 7B) Instruct, native to transformers",
))
for _mt in CLASSES:
    registry.register(registry.BackboneSpec(
        name=f"tiny_{_mt}", loader=load_tiny, kwargs={"model_type": _mt}, builtin=True, tiny=True,
        folder=tiny_folder, build=lambda cfg: tiny_folder(cfg, build=True),
        description=f"tiny random {_mt.replace('_', '-')} built offline from a seed",
    ))
