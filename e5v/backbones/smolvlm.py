"""SmolVLM (HuggingFaceTB/SmolVLM-256M-Instruct, -500M-Instruct): the small model for cheap experiments,
native to transformers 5, no remote code. Beyond the paper: the E5-V prompts in SmolVLM's own chat
template (``configs/prompt/e5v_smolvlm.yaml``).

Two config types load here: ``smolvlm`` and ``idefics3``. The hub's 256M / 500M Instruct checkpoints are
``idefics3``-typed (``Idefics3ForConditionalGeneration``, ``Idefics3Processor``); transformers' SmolVLM and
Idefics3 classes share the layout (weights ``model.vision_model.*``, ``model.connector.*``,
``model.text_model.*``, ``lm_head``) and, with the same weights, embed identically (tested: difference 0).
Each checkpoint loads with the classes its config names.

Why SmolVLM rather than LLaVA-OneVision-0.5B: 256M parameters in all (SigLIP-93M + SmolLM2-135M) against
~0.9B, and 64 image tokens per 512 px tile (pixel shuffle) against 729 per 384 px crop, so an image costs
~0.1-1.1k tokens instead of up to ~7.3k: embedding a benchmark's images is an order of magnitude cheaper.
Its processor needs the small ``num2words`` package (requirements.txt).

* Processor: tokenizer + SmolVLM image processor (tiles of ``max_image_size`` plus a global view), built for
  images only; ``image_seq_len`` derived from the MODEL config (patches per tile / scale factor^2). One
  batched call per image batch (each prompt with its one image), left padded, positions from the mask.
* Forward: ``SmolVLMModel`` (vision tower, connector, language model; post-norm), last token. LoRA on
  ``model.text_model.layers.*`` (q, k, v, o, gate, up, down); the vision tower and connector frozen.
* ``tiny_smolvlm`` / ``tiny_smolvlm_idefics3``: random tiny variants built offline from a seed (the same
  weights, typed ``smolvlm`` / ``idefics3``), saved and loaded through :func:`load`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from e5v.backbones import batching, registry
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

# model_type -> (model class, processor class, image processor: torchvision class, PIL module, PIL class)
CLASSES: dict[str, tuple[str, str, tuple[str, str, str]]] = {
    "smolvlm": ("SmolVLMForConditionalGeneration", "SmolVLMProcessor",
                ("SmolVLMImageProcessor", "transformers.models.smolvlm.image_processing_pil_smolvlm",
                 "SmolVLMImageProcessorPil")),
    "idefics3": ("Idefics3ForConditionalGeneration", "Idefics3Processor",
                 ("Idefics3ImageProcessor", "transformers.models.idefics3.image_processing_pil_idefics3",
                  "Idefics3ImageProcessorPil")),
}

# SmolVLM-256M/500M-Instruct chat template (the hub's chat_template.json, 403 characters, equal character for
# character, checked 2026-12-02): "User:" then ":" before an image,
# ": " before text, each message closed by <end_of_utterance>, then "Assistant:".
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def image_seq_len(config: Any) -> int:
    """Image tokens per tile: (image_size / patch_size)^2 patches, merged by scale_factor^2 (pixel shuffle)."""
    v = config.vision_config
    return int((int(v.image_size) // int(v.patch_size)) ** 2 // int(config.scale_factor) ** 2)


class SmolVLMInputs(Inputs):
    """One batched processor call (each prompt with its one image); positions from the mask. Packed image
    batches carry each row's tiles (``pixel_values``, ``pixel_attention_mask``) in packed row order."""

    packed_row_keys = ("pixel_values", "pixel_attention_mask")

    def images(self, rows: Sequence[tuple[Sequence[int], str]], images: Sequence[Any]) -> dict[str, torch.Tensor]:
        enc = self.processor(text=[p for _, p in rows], images=[[im] for im in images], padding=True,
                             return_tensors="pt")
        tensors = {k: v for k, v in dict(enc).items() if isinstance(v, torch.Tensor)}
        tensors["attention_mask"] = tensors["attention_mask"].long()
        return batching.with_positions(tensors)

    def image_tokens(self, sizes_hw: Sequence[tuple[int, int]]) -> list[int] | None:
        """APPROXIMATE tokens per image (for length sorting and token budgets only): tiles after the
        longest-edge resize, plus the global view, each ``image_seq_len`` tokens and its markers."""
        ip = self.processor.image_processor
        longest, tile = int(ip.size["longest_edge"]), int(ip.max_image_size["longest_edge"])
        seq = int(self.processor.image_seq_len)
        out = []
        for h, w in sizes_hw:
            scale = longest / max(h, w)
            rows, cols = (math.ceil(h * scale / tile), math.ceil(w * scale / tile)) if ip.do_image_splitting else (0, 0)
            tiles = rows * cols if rows * cols > 1 else 0
            out.append((tiles + 1) * (seq + 2) + rows)
        return out


class SmolVLMBackbone(Backbone):
    inputs_class = SmolVLMInputs
    language_model_path = "model.text_model"
    frozen_modules = ("model.vision_model", "model.connector")
    prompt_name = "e5v_smolvlm"
    packable = ("text", "image", "interleaved")
    save_processor_parts = True  # an images-only processor

    def forward(self, batch: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> torch.Tensor:
        inner = hf_model(model if model is not None else self.model).model  # SmolVLMModel
        pixel_values = batch.get("pixel_values")
        if pixel_values is not None:
            pixel_values = pixel_values.to(next(inner.vision_model.parameters()).dtype)
        out = inner(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),  # None in a packed batch: segments from the positions
            position_ids=batch.get("position_ids"),
            pixel_values=pixel_values,
            pixel_attention_mask=batch.get("pixel_attention_mask"),
            use_cache=False,
        )
        return self.pool(out.last_hidden_state, batch)  # (B, d)


def image_processor_class(model_type: str = "smolvlm") -> type:
    """The image processor class of a ``model_type`` checkpoint (its torchvision class, or the PIL twin)."""
    return base_image_processor_class(*CLASSES[model_type][2])


def processor_class(model_type: str) -> type:
    """The processor class of a ``model_type`` checkpoint. SmolVLM's is built for images only (its video
    processor needs torchvision) and then renders chat templates without it; Idefics3's has no video part."""
    import transformers
    from transformers.processing_utils import ProcessorMixin

    cls = getattr(transformers, CLASSES[model_type][1])
    if model_type != "smolvlm":
        return cls

    class SmolVLMImagesOnly(images_only(cls)):  # type: ignore[misc, valid-type]
        def apply_chat_template(self, conversation: Any, chat_template: str | None = None, **kwargs: Any) -> Any:
            # SmolVLMProcessor's own reads the video processor's frame settings first; without one (no video in
            # E5-V) the generic rendering is what it would do for image and text messages
            if self.video_processor is None:
                return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)
            return super().apply_chat_template(conversation, chat_template, **kwargs)  # pragma: no cover

    SmolVLMImagesOnly.__name__ = SmolVLMImagesOnly.__qualname__ = cls.__name__
    return SmolVLMImagesOnly


# the tokens of SmolVLM's chat template (configs/prompt/e5v_smolvlm.yaml writes them)
CHAT_TOKENS = ("<|im_start|>", "<end_of_utterance>")


def check_chat_tokens(tokenizer: Any, where: str) -> None:
    """Refuse a checkpoint whose tokenizer lacks SmolVLM's chat tokens: idefics3 is also Idefics3-8B's model type,
    whose Llama-3 chat template the SmolVLM prompts are not (its embeddings would be wrong without an error)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    missing = [t for t in CHAT_TOKENS if tokenizer.convert_tokens_to_ids(t) in (None, unk)]
    if missing:
        raise ValueError(f"{where}: the tokenizer has no {', '.join(missing)} token, so this is not a SmolVLM "
                         "checkpoint (e.g. Idefics3-8B, also model_type idefics3, has another chat template); the "
                         "smolvlm family loads SmolVLM checkpoints (HuggingFaceTB/SmolVLM-256M/500M-Instruct)")


def build_processor(config: Any, tokenizer: Any, image_processor: Any, chat_template: str | None,
                    where: str = "checkpoint") -> Any:
    left_padded(tokenizer)
    if tokenizer.convert_tokens_to_ids("<image>") != config.image_token_id:
        raise ValueError("the tokenizer's <image> id is not the model config's image_token_id: they do not belong together")
    check_chat_tokens(tokenizer, where)
    parts: dict[str, Any] = {"video_processor": None} if config.model_type == "smolvlm" else {}
    return processor_class(config.model_type)(image_processor=image_processor, tokenizer=tokenizer, **parts,
                                              image_seq_len=image_seq_len(config), chat_template=chat_template)


def load(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "auto",
    revision: str | None = None,
    local_files_only: bool | None = None,
    attn_implementation: str | None = "sdpa",
    trust_remote_code: bool = False,
    quantize: str | None = None,
    family: str | None = None,
) -> SmolVLMBackbone:
    """Load a SmolVLM checkpoint (hub id or local directory), ``smolvlm``- or ``idefics3``-typed (the hub's
    256M / 500M Instruct), with the model, processor and image processor classes its config names."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    from e5v.backbones.auto import locate_config
    from e5v.backbones.llava_next import hub_kwargs, quantization_config, quantized_device_map

    if trust_remote_code:
        raise ValueError("SmolVLM is built into transformers: trust_remote_code must stay false")
    path = str(name_or_path)
    kw = hub_kwargs(revision, local_files_only)
    locate_config(path, revision, local_files_only)
    config = AutoConfig.from_pretrained(path, **kw)
    if config.model_type not in CLASSES:
        raise ValueError(f"{path} is a '{config.model_type}' model, not one of {sorted(CLASSES)}")
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    image_processor = image_processor_class(config.model_type).from_pretrained(path, **kw)
    template = read_chat_template(path, kw) or getattr(tokenizer, "chat_template", None)
    processor = build_processor(config, tokenizer, image_processor, template, where=path)
    torch_dtype, dev = resolve_dtype(dtype, device), resolve_device(device)
    attn = resolve_attn_implementation(attn_implementation, dev, torch_dtype)
    if quantize:
        kw["quantization_config"] = quantization_config(quantize, torch_dtype, dev,
                                                        skip=["vision_model", "connector", "lm_head"])
        kw["device_map"] = quantized_device_map(dev)
    model_class = getattr(transformers, CLASSES[config.model_type][0])
    model = model_class.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn, use_safetensors=True, **kw)
    if not quantize:
        model.to(dev)
    model.eval()
    return SmolVLMBackbone(
        model=model,
        processor=processor,
        family=family or config.model_type,
        name_or_path=path,
        image_token="<image>",
        max_length=int(getattr(config.text_config, "max_position_embeddings", 0)) or None,
        info={"revision": revision, "attn_implementation": attn},
    )


# ---------------------------------------------------------------------- tiny offline variant
TINY_VERSION = 1
ROW_COL = [f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<global-img>",
           "<image>", *ROW_COL]
TINY_SIZES: dict[str, Any] = {
    "vocab_size": 640, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
    "vision_image_size": 32, "vision_patch_size": 8, "vision_hidden_size": 32, "vision_layers": 2,
    "vision_heads": 4, "scale_factor": 2,  # 4 image tokens per 32 px tile
    "longest_edge": 64,  # images resized to a 64 px longest edge: at most 2 x 2 tiles + the global view
}


def build_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from e5v.backbones.tiny import tiny_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([*tiny_corpus(), "User: Assistant:"], trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|endoftext|>",
        padding_side="left", model_max_length=TINY_SIZES["max_position_embeddings"], chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                              "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"},
    )


def save_tiny(path: str | Path, seed: int = 0, model_type: str = "smolvlm") -> Path:
    """Build the tiny model from ``seed``, typed ``model_type`` (smolvlm | idefics3: the same weights for a seed,
    in the classes of that type), and ``save_pretrained`` it with its tokenizer and image processor."""
    import transformers

    s = TINY_SIZES
    tokenizer = build_tokenizer(s["vocab_size"])
    config_class = getattr(transformers, CLASSES[model_type][0].replace("ForConditionalGeneration", "Config"))
    config = config_class(
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=s["hidden_size"],
                         intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_hidden_layers"],
                         num_attention_heads=s["num_attention_heads"], num_key_value_heads=s["num_key_value_heads"],
                         max_position_embeddings=s["max_position_embeddings"], pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False),
        vision_config=dict(hidden_size=s["vision_hidden_size"], intermediate_size=2 * s["vision_hidden_size"],
                           num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_heads"],
                           image_size=s["vision_image_size"], patch_size=s["vision_patch_size"]),
        scale_factor=s["scale_factor"], image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, CLASSES[model_type][0])(config).eval()
    image_processor = image_processor_class(model_type)(size={"longest_edge": s["longest_edge"]},
                                                        max_image_size={"longest_edge": s["vision_image_size"]},
                                                        do_image_splitting=True)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True, is_main_process=True)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    (path / "e5v_tiny.json").write_text(
        json.dumps({"seed": seed, "version": TINY_VERSION, "model_type": model_type, "sizes": s}, indent=2) + "\n"
    )
    return path


def tiny_folder(cfg: Any, build: bool = False) -> Path:
    from e5v.backbones.tiny import family_tiny_folder

    model_type, seed = str(cfg.get("model_type") or "smolvlm"), int(cfg.get("seed") or 0)
    recipe = {"v": TINY_VERSION, "seed": seed, "sizes": TINY_SIZES}
    if model_type != "smolvlm":  # (smolvlm keeps the folder name it had before idefics3 typing)
        recipe["model_type"] = model_type
    return family_tiny_folder(cfg, model_type, recipe, lambda tmp: save_tiny(tmp, seed, model_type), build)


def load_tiny(
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "cpu",
    cache_dir: str | None = None,
    attn_implementation: str | None = "sdpa",
    model_type: str = "smolvlm",
) -> SmolVLMBackbone:
    """Build (or reuse) the tiny SmolVLM typed ``model_type`` (smolvlm | idefics3) and load it through :func:`load`."""
    if model_type not in CLASSES:
        raise ValueError(f"model_type must be one of {sorted(CLASSES)}, got {model_type!r}")
    path = tiny_folder({"model_type": model_type, "seed": seed, "cache_dir": cache_dir}, build=True)
    backbone = load(str(path), dtype=dtype, device=device, local_files_only=True,
                    attn_implementation=attn_implementation, family=TINY_NAMES[model_type])
    backbone.info["seed"] = seed
    return backbone


TINY_NAMES = {"smolvlm": "tiny_smolvlm", "idefics3": "tiny_smolvlm_idefics3"}
registry.register(registry.BackboneSpec(
    name="smolvlm", loader=load, model_types=tuple(CLASSES), family=SmolVLMBackbone,
    description="SmolVLM 256M / 500M Instruct (the small model for cheap experiments; smolvlm- or idefics3-typed, "
                "as the hub's), native to transformers",
))
registry.register(registry.BackboneSpec(
    name="tiny_smolvlm", loader=load_tiny, builtin=True, tiny=True, folder=tiny_folder,
    build=lambda cfg: tiny_folder(cfg, build=True), description="tiny random SmolVLM built offline from a seed",
))
registry.register(registry.BackboneSpec(
    name="tiny_smolvlm_idefics3", loader=load_tiny, kwargs={"model_type": "idefics3"}, builtin=True, tiny=True,
    folder=tiny_folder, build=lambda cfg: tiny_folder(cfg, build=True),
    description="tiny random SmolVLM typed idefics3, as the hub's 256M / 500M (tiny_smolvlm's weights)",
))
