"""LLaVA-NeXT family (royokong/e5-v, llava-hf LLaVA-NeXT Llama-3 8B and Mistral 7B, tiny test models).

Loads from a hub id or a local directory (``save_pretrained`` layout), safetensors only, no remote
code. The processor is rebuilt here with every field that broke the released code on newer
transformers set explicitly from the MODEL config (``patch_size``, ``vision_feature_select_strategy``,
``num_additional_image_tokens``, grid pinpoints), so no saved processor config can leave them unset
or inconsistent.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from e5v.backbones import batching, registry
from e5v.backbones.base import (
    Backbone,
    Inputs,
    hf_model,
    has_torchvision,
    resolve_attn_implementation,
    resolve_device,
    resolve_dtype,
    left_padded,
)

log = logging.getLogger(__name__)

# Vision towers that prepend a CLS token to the patch sequence.
_CLS_VISION_TYPES = {"clip_vision_model", "clip"}


def hub_kwargs(revision: str | None, local_files_only: bool | None) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if revision:
        kw["revision"] = revision
    if local_files_only is not None:
        kw["local_files_only"] = local_files_only
    return kw


def load_image_processor(path: str, **kw: Any) -> Any:
    """The LLaVA-NeXT image processor: the torchvision one when available, else the PIL one."""
    if has_torchvision():
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(path, **kw)
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil.from_pretrained(path, **kw)


def build_processor(config: Any, tokenizer: Any, image_processor: Any, max_tiles: int | None = None) -> Any:
    """A LlavaNextProcessor whose fields are all derived from the model config."""
    from transformers import LlavaNextProcessor

    vision = config.vision_config
    pinpoints = [list(p) for p in config.image_grid_pinpoints]
    saved = getattr(image_processor, "image_grid_pinpoints", None)
    if saved is not None and [list(p) for p in saved] != pinpoints:
        log.warning("image processor grid pinpoints %s differ from the model config's; using the model's", saved)
    if max_tiles is not None:
        pinpoints = restrict_pinpoints(pinpoints, int(vision.image_size), max_tiles)
        config.image_grid_pinpoints = pinpoints  # the model counts tiles from its config: keep both in step
    image_processor.image_grid_pinpoints = pinpoints
    # The anyres base tile and the crop must be the vision tower's input size.
    size = int(vision.image_size)
    image_processor.size = {"shortest_edge": size}
    image_processor.crop_size = {"height": size, "width": size}

    left_padded(tokenizer)  # as released: EOS doubles as padding
    image_token = "<image>"
    if tokenizer.convert_tokens_to_ids(image_token) != config.image_token_id:
        raise ValueError(
            f"tokenizer id of {image_token!r} is {tokenizer.convert_tokens_to_ids(image_token)} but the model "
            f"config's image_token_id is {config.image_token_id}: tokenizer and model do not belong together"
        )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=int(vision.patch_size),
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if vision.model_type in _CLS_VISION_TYPES else 0,
        image_token=image_token,
    )


def restrict_pinpoints(pinpoints: list[list[int]], tile: int, max_tiles: int) -> list[list[int]]:
    """Keep only grid resolutions with at most ``max_tiles`` anyres tiles (the base tile excluded)."""
    kept = [p for p in pinpoints if (p[0] // tile) * (p[1] // tile) <= max_tiles]
    if not kept:
        raise ValueError(f"max_tiles={max_tiles} leaves no grid pinpoint of {pinpoints} (tile {tile}px)")
    return kept


def quantized_device_map(device: torch.device, env: Mapping[str, str] | None = None) -> dict[str, int]:
    """The ``device_map`` for a bitsandbytes-quantised load (its weights cannot be moved afterwards).

    ``cuda:N`` keeps N. A bare ``cuda`` is this process's own GPU: ``LOCAL_RANK`` as set by the
    launcher (torchrun, deepspeed), as the release does (``{"": LOCAL_RANK}``); 0 without a launcher.
    Without this every rank of a multi-GPU QLoRA run would load onto GPU 0.
    """
    if device.type != "cuda":
        raise ValueError(f"a quantised model loads on a CUDA device, not {device}")
    if device.index is not None:
        return {"": int(device.index)}
    env = os.environ if env is None else env
    raw = str(env.get("LOCAL_RANK") or "0").strip()
    try:
        index = int(raw)
    except ValueError:
        raise ValueError(f"LOCAL_RANK={raw!r} is not a GPU index; the launcher sets it to an integer") from None
    if index < 0:
        raise ValueError(f"LOCAL_RANK={index} is negative")
    return {"": index}


def quantization_config(
    kind: str, compute_dtype: torch.dtype, device: torch.device, skip: Sequence[str] | None = None
) -> Any:
    """QLoRA as released: 4-bit NF4 with double quantisation (bitsandbytes, CUDA only). ``skip``: modules
    kept unquantised (default LLaVA-NeXT's vision tower, projector and lm_head)."""
    if kind != "4bit":
        raise ValueError(f"quantize must be null or '4bit', got {kind!r}")
    if device.type != "cuda":
        raise RuntimeError("quantize=4bit (QLoRA) needs a CUDA device and bitsandbytes; set lora.quantize=null on CPU")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(skip or ["vision_tower", "multi_modal_projector", "lm_head"]),
    )


class LlavaNextInputs(Inputs):
    """One image-processor call per batch; each prompt's single image placeholder is expanded to the
    image's token count from its size, exactly what the processor's text expansion + tokenizing would
    give, without tokenizing a ~2,900-token string again (tests/test_embedder_perf.py). Packed image
    batches carry each row's image (``pixel_values``, ``image_sizes``) in the order of the rows in the packs:
    the model scatters image features into the image-token positions in that order."""

    packed_row_keys = ("pixel_values", "image_sizes")

    def images(self, rows: Sequence[tuple[Sequence[int], str]], images: Sequence[Any]) -> dict[str, torch.Tensor]:
        if self.image_token_id is None:
            raise RuntimeError("the LLaVA-NeXT tokenizer has no image token")
        vis = self.processor.image_processor(list(images), return_tensors="pt")
        sizes = vis["image_sizes"]  # (B, 2) original (height, width)
        counts = self.image_tokens([tuple(int(x) for x in s) for s in sizes.tolist()])
        if counts is None:
            raise RuntimeError("the LLaVA-NeXT processor cannot count image tokens (transformers version?)")
        seqs = []
        for (ids, _), n in zip(rows, counts):
            pos = [j for j, t in enumerate(ids) if t == self.image_token_id]
            if len(pos) != 1:
                raise ValueError(f"expected one image token in the prompt, found {len(pos)}")
            j = pos[0]
            seqs.append([*ids[:j], *([self.image_token_id] * n), *ids[j + 1 :]])
        batch = batching.text_batch(seqs, self.pad_id)
        batch.update(pixel_values=vis["pixel_values"], image_sizes=sizes)
        return batch


class LlavaNextBackbone(Backbone):
    """Forward through ``LlavaNextModel`` only: no vocabulary projection, no per-layer hidden states.
    LoRA on ``model.language_model.layers.*`` (q, k, v, o, gate, up, down: all linear layers of the
    language model, as released); the CLIP tower, projector and image newline stay frozen. Text, images and
    image+text all pack (the vision tower runs per image; features go to the image tokens in packed order)."""

    inputs_class = LlavaNextInputs
    frozen_modules = ("model.vision_tower", "model.multi_modal_projector")
    packable = ("text", "image", "interleaved")

    def forward(self, batch: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> torch.Tensor:
        inner = hf_model(model if model is not None else self.model).model  # LlavaNextModel (post-norm)
        pixel_values = batch.get("pixel_values")
        if pixel_values is not None:  # the processor gives float32; the tower may be bf16/fp16
            pixel_values = pixel_values.to(next(inner.vision_tower.parameters()).dtype)
        out = inner(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),  # None in a packed batch: segments from the positions
            position_ids=batch.get("position_ids"),
            pixel_values=pixel_values,
            image_sizes=batch.get("image_sizes"),
            use_cache=False,
        )
        return self.pool(out.last_hidden_state, batch)  # (B, d)

    def default_prompt(self) -> str:
        """Mistral's ``[INST]`` wrapper for LLaVA-1.6-Mistral, Llama-3's for the others."""
        text = getattr(self.model.config, "text_config", None)
        return "e5v_mistral" if getattr(text, "model_type", "") == "mistral" else self.prompt_name

    def save_pretrained(self, path: str | os.PathLike, model: torch.nn.Module | None = None) -> None:
        """Also readable by transformers 4.x (the release's and mteb's): :mod:`e5v.export_compat`."""
        super().save_pretrained(path, model)
        from e5v.export_compat import make_transformers4_compatible

        make_transformers4_compatible(path)


def load(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "auto",
    revision: str | None = None,
    local_files_only: bool | None = None,
    attn_implementation: str | None = "sdpa",
    max_tiles: int | None = None,
    trust_remote_code: bool = False,
    family: str = "llava_next",
    quantize: str | None = None,
    processor_revision: str | None = None,
) -> LlavaNextBackbone:
    """Load a LLaVA-NeXT checkpoint (hub id or local directory) for embedding.

    ``processor_revision``: a hub revision for the tokenizer and image processor only (the weights come from
    ``revision``): the release pins LLaVA-1.6-Mistral's processor to a1d5213... because later tokenizer
    revisions changed its tokenization."""
    from transformers import AutoConfig, AutoTokenizer, LlavaNextForConditionalGeneration

    if trust_remote_code:
        raise ValueError("LLaVA-NeXT is built into transformers: trust_remote_code must stay false")
    kw = hub_kwargs(revision, local_files_only)
    path = str(name_or_path)
    from e5v.backbones.auto import locate_config

    locate_config(path, revision, local_files_only)  # a mistyped path or unknown name: one line, before transformers
    config = AutoConfig.from_pretrained(path, **kw)
    if config.model_type != "llava_next":
        raise ValueError(f"{path} is a '{config.model_type}' model, not llava_next; pick the matching backbone")
    pkw = hub_kwargs(processor_revision or revision, local_files_only)
    tokenizer = AutoTokenizer.from_pretrained(path, **pkw)
    processor = build_processor(config, tokenizer, load_image_processor(path, **pkw), max_tiles=max_tiles)
    torch_dtype = resolve_dtype(dtype, device)
    dev = resolve_device(device)
    attn_implementation = resolve_attn_implementation(attn_implementation, dev, torch_dtype)
    if quantize:
        kw["quantization_config"] = quantization_config(quantize, torch_dtype, dev)
        kw["device_map"] = quantized_device_map(dev)
    model = LlavaNextForConditionalGeneration.from_pretrained(
        path, dtype=torch_dtype, attn_implementation=attn_implementation, use_safetensors=True, **kw
    )
    if not quantize:
        model.to(dev)
    model.eval()
    if max_tiles is not None:
        # The model derives each image's tile count from ITS pinpoints: they must be the restricted set too.
        model.config.image_grid_pinpoints = [list(p) for p in processor.image_processor.image_grid_pinpoints]
    return LlavaNextBackbone(
        model=model,
        processor=processor,
        family=family,
        name_or_path=path,
        image_token="<image>",
        max_length=int(getattr(config.text_config, "max_position_embeddings", 0)) or None,
        info={"revision": revision, "processor_revision": processor_revision, "max_tiles": max_tiles,
              "attn_implementation": attn_implementation},
    )


registry.register(registry.BackboneSpec(
    name="llava_next",
    loader=load,
    model_types=("llava_next",),
    family=LlavaNextBackbone,
    description="LLaVA-NeXT / LLaVA-1.6 (Llama-3, Mistral, Vicuna language models), royokong/e5-v",
))
