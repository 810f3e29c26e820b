"""Phi-3-Vision (microsoft/Phi-3-vision-128k-instruct), loaded natively on transformers 5: no remote code.

The hub ships Phi-3-V's modelling and processing code inside the checkpoint, and that code no longer imports
on transformers 5. Here the model is transformers' own Phi-3 decoder and CLIP tower with Phi-3-V's HD image
embedding written in :mod:`e5v.backbones.phi3_v_model`, and the processor in
:mod:`e5v.backbones.phi3_v_processing`; the hub's safetensors load by name (every key checked). Verified
against the hub's remote code under transformers 4.44 on a random checkpoint of the real layout
(``scripts/phi3v_remote_parity.py``; figures in docs/backbones.md). ``trust_remote_code`` is refused: nothing
from the checkpoint folder is imported.

As released (kongds/E5-V ``retrieval.py``, ``ft_llm.py``):

* the processor takes ONE string (split on ``<|image_N|>`` tags, each chunk tokenized with its own BOS), so
  image batches call it one item at a time, ``processor(prompt, [image])``; the items are then left padded into
  one batch (ids, mask, position ids; ``pixel_values`` zero-padded to the most crops, as the processor pads);
* LoRA targets ``model.layers.{i}.self_attn.{qkv_proj,o_proj}`` and ``model.layers.{i}.mlp.{gate_up_proj,
  down_proj}``; the image embedding (CLIP, separators, projection: ``model.vision_embed_tokens``) stays frozen.

Not as released: the forward stops at the final norm and pools the last token (the release ran the full causal
LM with ``output_hidden_states=True``: fp32 logits over 32,064 words and all 33 hidden states, then took the
last one, the same state), and CLIP runs only on the crops an image has (the remote code also runs it on the
zero padding up to ``num_crops + 1`` crops and drops the result). Packed batches: text, images and image+text
(1-D rotary positions restarting per row; image features follow their rows).

``tiny_phi3_v``: a random tiny Phi-3-V in the hub's layout (config.json with the hub's architectures, auto_map,
``embd_layer`` and ``img_processor``; the hub's weight names; preprocessor_config.json), built offline from a seed
and loaded through :func:`load`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from e5v.backbones import batching, registry
from e5v.backbones.base import (
    Backbone,
    Inputs,
    hf_model,
    left_padded,
    resolve_attn_implementation,
    resolve_device,
    resolve_dtype,
)
from e5v.backbones.llava_next import hub_kwargs

NO_REMOTE_CODE = ("Phi-3-V loads natively (e5v.backbones.phi3_v_model: transformers' Phi-3 and CLIP with Phi-3-V's "
                  "image embedding); the checkpoint's remote code is never run, so trust_remote_code must stay false")


class Phi3VInputs(Inputs):
    """The Phi-3-V processor called once per item with one string, as released; items left padded."""

    packed_row_keys = ("pixel_values", "image_sizes")

    def image_tokens(self, sizes_hw: Sequence[tuple[int, int]]) -> list[int] | None:
        calc = getattr(getattr(self.processor, "image_processor", None), "calc_num_image_tokens_from_image_size", None)
        if calc is None:
            return None
        return [int(calc(w, h)) for h, w in sizes_hw]

    def images(self, rows: Sequence[tuple[Sequence[int], str]], images: Sequence[Any]) -> dict[str, torch.Tensor]:
        parts = [self.processor(prompt, [image], return_tensors="pt") for (_, prompt), image in zip(rows, images)]
        ids = batching.pad_rows([p["input_ids"] for p in parts], self.pad_id)
        mask = batching.pad_rows([p["attention_mask"].long() for p in parts], 0)
        crops = max(p["pixel_values"].shape[1] for p in parts)
        pixel_values = torch.cat([
            torch.nn.functional.pad(p["pixel_values"], (0, 0, 0, 0, 0, 0, 0, crops - p["pixel_values"].shape[1]))
            for p in parts
        ])  # (B, crops, 3, H, W): padded crops are zeros, as the processor pads a multi-image call
        out = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values,
               "image_sizes": torch.cat([p["image_sizes"] for p in parts])}
        return batching.with_positions(out)


class Phi3VBackbone(Backbone):
    inputs_class = Phi3VInputs
    language_model_path = "model"
    lora_targets = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # ft_llm.py's Phi-3 targets
    frozen_modules = ("model.vision_embed_tokens",)
    prompt_name = "e5v_phi3"
    packable = ("text", "image", "interleaved")

    def forward(self, batch: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> torch.Tensor:
        out = hf_model(model if model is not None else self.model)(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),  # None in a packed batch: segments from the positions
            position_ids=batch.get("position_ids"),
            pixel_values=batch.get("pixel_values"),
            image_sizes=batch.get("image_sizes"),
        )
        return self.pool(out.last_hidden_state, batch)  # (B, d): final norm, last token; no logits


def load(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "auto",
    revision: str | None = None,
    local_files_only: bool | None = None,
    attn_implementation: str | None = "auto",
    trust_remote_code: bool = False,
    quantize: str | None = None,
    family: str | None = None,
) -> Phi3VBackbone:
    """Load a Phi-3-V checkpoint (hub id or local folder in the hub's layout) natively."""
    from transformers import AutoTokenizer

    from e5v.backbones.auto import locate_config
    from e5v.backbones.llava_next import quantization_config, quantized_device_map
    from e5v.backbones.phi3_v_model import load_config, load_model, vision_config
    from e5v.backbones.phi3_v_processing import Phi3VImageProcessor, Phi3VProcessor

    if trust_remote_code:
        raise ValueError(NO_REMOTE_CODE)
    path = str(name_or_path)
    kw = hub_kwargs(revision, local_files_only)
    locate_config(path, revision, local_files_only)
    config = load_config(path, **kw)
    tokenizer = left_padded(AutoTokenizer.from_pretrained(path, config=config, **kw))
    image_processor = Phi3VImageProcessor.from_pretrained(path, **kw)
    vcfg = vision_config(config)
    merged = vcfg.image_size // vcfg.patch_size // 2
    if (image_processor.crop_size, image_processor.num_img_tokens) != (vcfg.image_size, merged * merged):
        raise ValueError(f"{path}: the image processor crops {image_processor.crop_size} px into "
                         f"{image_processor.num_img_tokens} tokens but the vision tower takes {vcfg.image_size} px "
                         f"crops of {merged * merged} tokens: they do not belong together")
    torch_dtype, dev = resolve_dtype(dtype, device), resolve_device(device)
    attn = resolve_attn_implementation(attn_implementation, dev, torch_dtype)
    model_kw = dict(kw)
    if quantize:  # QLoRA as released (CUDA, bitsandbytes): the image embedding and lm_head stay unquantised
        model_kw["quantization_config"] = quantization_config(quantize, torch_dtype, dev,
                                                              skip=["vision_embed_tokens", "lm_head"])
        model_kw["device_map"] = quantized_device_map(dev)
    model = load_model(path, config, torch_dtype, attn, **model_kw)
    if not quantize:
        model.to(dev)
    model.eval()
    return Phi3VBackbone(
        model=model,
        processor=Phi3VProcessor(image_processor, tokenizer),
        family=family or "phi3_v",
        name_or_path=path,
        image_token="<|image_1|>",
        max_length=int(config.max_position_embeddings) or None,
        info={"revision": revision, "attn_implementation": attn},
    )


# ---------------------------------------------------------------------- tiny offline variant
TINY_VERSION = 1
# the hub tokenizer's special tokens (tokenizer_config.json's added tokens that the E5-V prompts use)
SPECIAL = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>", "<|image|>"]
# the hub's chat template (tokenizer_config.json)
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + "
                 "'<|end|>\n' }}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
                 "{{- '<|assistant|>\n' -}}{% endif %}")
TINY_SIZES: dict[str, Any] = {
    "vocab_size": 640, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "vision_image_size": 32, "vision_patch_size": 8, "vision_hidden_size": 32, "vision_intermediate_size": 64,
    "vision_layers": 2, "vision_heads": 4,  # 4 x 4 patches per crop -> 2 x 2 = 4 image tokens per crop
    "num_crops": 4,
}


def build_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer with the hub's special tokens, BOS ``<s>`` added, pad/EOS ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from e5v.backbones.tiny import tiny_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(tiny_corpus(), trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>", padding_side="right",
                                   model_max_length=131072, chat_template=CHAT_TEMPLATE,
                                   additional_special_tokens=["<|system|>", "<|end|>", "<|user|>"])


def rope_factors(n: int) -> tuple[list[float], list[float]]:
    """Deterministic LongRoPE factors (the hub's run 1.05 -> 3.05 short, 1.03 -> 64.8 long)."""
    short = [round(1.05 + 2.0 * i / max(n - 1, 1), 6) for i in range(n)]
    long = [round(1.03 * (64.81 / 1.03) ** (i / max(n - 1, 1)), 6) for i in range(n)]
    return short, long


def tiny_config(tokenizer: Any, s: dict[str, Any]) -> dict[str, Any]:
    """config.json of a tiny Phi-3-V in the hub's layout (its fields, architectures and auto_map)."""
    from e5v.backbones.phi3_v_model import CLIP_VIT_L14_336, HUB_AUTO_MAP, HUB_CLIP, VISION_KEY

    short, long = rope_factors(s["hidden_size"] // s["num_attention_heads"] // 2)
    vision = {"hidden_size": s["vision_hidden_size"], "intermediate_size": s["vision_intermediate_size"],
              "num_hidden_layers": s["vision_layers"], "num_attention_heads": s["vision_heads"],
              "image_size": s["vision_image_size"], "patch_size": s["vision_patch_size"]}
    grid = s["vision_image_size"] // s["vision_patch_size"]
    img = {"image_dim_out": s["vision_hidden_size"], "model_name": HUB_CLIP, "name": "clip_vision_model",
           "num_img_tokens": (grid // 2) ** 2}
    tower = {k: v for k, v in vision.items() if CLIP_VIT_L14_336[k] != v}
    if tower:  # the tower, where it is not the hub's CLIP ViT-L/14-336 (read by e5v and the parity script)
        img[VISION_KEY] = tower
    return {
        "architectures": ["Phi3VForCausalLM"], "auto_map": dict(HUB_AUTO_MAP), "model_type": "phi3_v",
        "attention_dropout": 0.0, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                       "use_hd_transform": True, "with_learnable_separator": True},
        "hidden_act": "silu", "hidden_size": s["hidden_size"],
        "img_processor": img,
        "initializer_range": 0.02, "intermediate_size": s["intermediate_size"],
        "max_position_embeddings": s["max_position_embeddings"], "num_attention_heads": s["num_attention_heads"],
        "num_hidden_layers": s["num_hidden_layers"], "num_key_value_heads": s["num_key_value_heads"],
        "original_max_position_embeddings": s["original_max_position_embeddings"], "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": long, "short_factor": short, "type": "su"}, "rope_theta": 10000.0,
        "sliding_window": s["max_position_embeddings"], "tie_word_embeddings": False, "use_cache": True,
        "vocab_size": len(tokenizer),
    }


def random_model(config: Any, seed: int) -> Any:
    """A :class:`~e5v.backbones.phi3_v_model.Phi3VForCausalLM` of ``config`` with random weights from ``seed`` (the
    separators, zeros at init, drawn too, so that tests see them)."""
    from e5v.backbones.phi3_v_model import Phi3VForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Phi3VForCausalLM(config).eval()
        with torch.no_grad():
            for p in (model.model.vision_embed_tokens.glb_GN, model.model.vision_embed_tokens.sub_GN):
                p.normal_(0.0, 1.0)
    return model


def write_random_weights(path: str | Path, seed: int = 0) -> Path:
    """Random weights for the Phi-3-V ``config.json`` in ``path``, written there as ``model.safetensors`` under the
    hub's names (the config file is left as it is). For checkpoints shrunk from the hub's files: a tower other
    than CLIP ViT-L/14-336 is named in ``img_processor.e5v_vision_config``."""
    from safetensors.torch import save_file

    from e5v.backbones.phi3_v_model import load_config

    model = random_model(load_config(str(path)), seed)
    out = Path(path) / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out), metadata={"format": "pt"})
    return out


def save_tiny(path: str | Path, seed: int = 0, sizes: dict[str, Any] | None = None) -> Path:
    """Build the tiny Phi-3-V from ``seed`` (``sizes`` over :data:`TINY_SIZES`) into ``path``, hub layout."""
    from e5v.backbones.phi3_v_model import load_config
    from e5v.backbones.phi3_v_processing import Phi3VImageProcessor

    s = {**TINY_SIZES, **dict(sizes or {})}
    unknown = set(s) - set(TINY_SIZES)
    if unknown:
        raise KeyError(f"unknown tiny_phi3_v size key(s) {sorted(unknown)}; known: {sorted(TINY_SIZES)}")
    tokenizer = build_tokenizer(s["vocab_size"])
    model = random_model(load_config(tiny_config(tokenizer, s)), seed)
    grid = s["vision_image_size"] // s["vision_patch_size"]
    image_processor = Phi3VImageProcessor(num_crops=s["num_crops"], num_img_tokens=(grid // 2) ** 2,
                                          crop_size=s["vision_image_size"])
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True, is_main_process=True)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    (path / "e5v_tiny.json").write_text(
        json.dumps({"seed": seed, "version": TINY_VERSION, "model_type": "phi3_v", "sizes": s}, indent=2) + "\n")
    return path


def tiny_folder(cfg: Any, build: bool = False) -> Path:
    from e5v.backbones.tiny import family_tiny_folder

    seed = int(cfg.get("seed") or 0)
    sizes = {**TINY_SIZES, **dict(cfg.get("sizes") or {})}
    return family_tiny_folder(cfg, "phi3_v", {"v": TINY_VERSION, "seed": seed, "sizes": sizes},
                              lambda tmp: save_tiny(tmp, seed, sizes), build)


def load_tiny(
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "cpu",
    cache_dir: str | None = None,
    attn_implementation: str | None = "sdpa",
    sizes: dict[str, Any] | None = None,
) -> Phi3VBackbone:
    """Build (or reuse) the tiny Phi-3-V and load it through :func:`load`."""
    path = tiny_folder({"seed": seed, "cache_dir": cache_dir, "sizes": sizes}, build=True)
    backbone = load(str(path), dtype=dtype, device=device, local_files_only=True,
                    attn_implementation=attn_implementation, family="tiny_phi3_v")
    backbone.info["seed"] = seed
    return backbone


registry.register(registry.BackboneSpec(
    name="phi3_v", loader=load, model_types=("phi3_v",), family=Phi3VBackbone,
    description="Phi-3-Vision, native (transformers' Phi-3 + CLIP, Phi-3-V's HD image embedding; no remote code)",
))
registry.register(registry.BackboneSpec(
    name="tiny_phi3_v", loader=load_tiny, builtin=True, tiny=True, folder=tiny_folder,
    build=lambda cfg: tiny_folder(cfg, build=True),
    description="tiny random Phi-3-V in the hub's layout, built offline from a seed",
))
