"""A tiny random LLaVA-NeXT built offline: byte-level BPE tokenizer trained on the fly, a Llama
(``tiny``) or Mistral (``tiny_mistral``: LLaVA-1.6-Mistral's text model) language model, CLIP vision
tower and an anyres grid. Deterministic from a seed; saved with ``save_pretrained`` into a cache
directory and then loaded through the SAME path as real checkpoints (:func:`e5v.backbones.llava_next.load`).
Tests and the demo use it; nothing touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from e5v.backbones import llava_next, registry

# Bump when the recipe below changes so cached copies are rebuilt.
TINY_VERSION = 1

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
SPECIAL_TOKENS = [BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>"]
# Language-model variants: the text config class and the tokenizer's special tokens (BOS, EOS, others).
# Mistral's [INST] / [/INST] are plain text in LLaVA-1.6-Mistral's tokenizer, as here.
VARIANTS: dict[str, dict[str, Any]] = {
    "llama3": {"config": "LlamaConfig", "bos": BOS, "eos": EOS, "special": SPECIAL_TOKENS},
    "mistral": {"config": "MistralConfig", "bos": "<s>", "eos": "</s>", "special": ["<s>", "</s>", "<unk>", "<image>"]},
}

DEFAULT_SIZES: dict[str, Any] = {
    "vocab_size": 640,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "vision_image_size": 32,
    "vision_patch_size": 8,
    "vision_hidden_size": 32,
    "vision_intermediate_size": 64,
    "vision_layers": 2,
    "vision_heads": 4,
    "image_grid_pinpoints": [[32, 64], [64, 32], [64, 64]],
}

_CORPUS_WORDS = (
    "a an the this that is are was were of in on at to with and or but not no one two three word "
    "summary above sentence image describe modify modified change style based its in one word "
    "red green blue yellow purple orange black white gray brown pink small large big tiny huge "
    "circle square triangle star ring cross shape shapes left right top bottom middle center near "
    "man woman person people dog cat child children street water ball car tree house playing sitting "
    "standing walking running holding looking wearing shirt dress toptee sleeves darker lighter "
    "picture photo scene background foreground there some many few more less has have"
)


def tiny_corpus() -> list[str]:
    """Training text for the tiny tokenizer: prompt strings plus a fixed vocabulary, deterministic."""
    from e5v.prompts import PromptSet  # noqa: F401  (keeps the corpus in step with prompt vocabulary)

    words = _CORPUS_WORDS.split()
    lines = [
        "Summary above sentence in one word:",
        "Summary above image in one word:",
        "Describe this image in one word:",
        'Modify this image with "", desribe modified image in one word:',
        "Describe this dress in one word based on its style:",
        "change the style of this shirt to\n Desribe this modified shirt in one word based on its style:",
        "user assistant [INST] [/INST] <|user|> <|end|> <|assistant|> <|image_1|>",
    ]
    for i in range(len(words)):
        lines.append(" ".join(words[i : i + 7]))
        lines.append(" ".join(reversed(words[max(0, i - 5) : i + 1])).capitalize() + ".")
    return lines


def build_tokenizer(vocab_size: int = DEFAULT_SIZES["vocab_size"], variant: str = "llama3") -> Any:
    """A byte-level BPE tokenizer (any text encodes, no unknowns) with the variant's special tokens
    (Llama-3's chat tokens, or Mistral's ``<s>``/``</s>``) and ``<image>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    v = _variant(variant)
    bos, eos = v["bos"], v["eos"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=v["special"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=DEFAULT_SIZES["max_position_embeddings"],
    )


def _variant(variant: str) -> dict[str, Any]:
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}; choose one of {sorted(VARIANTS)}")
    return VARIANTS[variant]


def build_config(tokenizer: Any, sizes: dict[str, Any], variant: str = "llama3") -> Any:
    import transformers
    from transformers import CLIPVisionConfig, LlavaNextConfig

    text_config_class = getattr(transformers, _variant(variant)["config"])
    extra = {"sliding_window": None} if variant == "mistral" else {}
    text = text_config_class(
        vocab_size=len(tokenizer),
        hidden_size=sizes["hidden_size"],
        intermediate_size=sizes["intermediate_size"],
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        num_key_value_heads=sizes["num_key_value_heads"],
        max_position_embeddings=sizes["max_position_embeddings"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **extra,
    )
    vision = CLIPVisionConfig(
        image_size=sizes["vision_image_size"],
        patch_size=sizes["vision_patch_size"],
        hidden_size=sizes["vision_hidden_size"],
        intermediate_size=sizes["vision_intermediate_size"],
        num_hidden_layers=sizes["vision_layers"],
        num_attention_heads=sizes["vision_heads"],
        projection_dim=sizes["vision_hidden_size"],
    )
    return LlavaNextConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=sizes["image_grid_pinpoints"],
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )


def build_image_processor(sizes: dict[str, Any]) -> Any:
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    s = sizes["vision_image_size"]
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": s},
        crop_size={"height": s, "width": s},
        image_grid_pinpoints=sizes["image_grid_pinpoints"],
        do_pad=True,
    )


def fingerprint(seed: int, sizes: dict[str, Any], variant: str = "llama3") -> str:
    recipe: dict[str, Any] = {"v": TINY_VERSION, "seed": seed, "sizes": sizes}
    if variant != "llama3":  # the llama3 fingerprint (and every cached build, tiny_world's too) stays as it was
        recipe["variant"] = variant
    blob = json.dumps(recipe, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def save_tiny(path: str | Path, seed: int = 0, variant: str = "llama3", **size_overrides: Any) -> Path:
    """Build the tiny model from ``seed`` and write it to ``path`` with ``save_pretrained`` (safetensors)."""
    from transformers import LlavaNextForConditionalGeneration

    sizes = {**DEFAULT_SIZES, **size_overrides}
    unknown = set(size_overrides) - set(DEFAULT_SIZES)
    if unknown:
        raise KeyError(f"unknown tiny size key(s) {sorted(unknown)}; known: {sorted(DEFAULT_SIZES)}")
    path = Path(path)
    tokenizer = build_tokenizer(sizes["vocab_size"], variant)
    config = build_config(tokenizer, sizes, variant)
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration(config).eval()
    processor = llava_next.build_processor(config, tokenizer, build_image_processor(sizes))
    path.mkdir(parents=True, exist_ok=True)
    # is_main_process: inside a process group transformers would write only on rank 0, leaving the
    # other ranks (each building into its own temporary directory) with an incomplete copy.
    model.save_pretrained(path, safe_serialization=True, is_main_process=True)
    processor.save_pretrained(path)
    (path / "e5v_tiny.json").write_text(
        json.dumps({"seed": seed, "version": TINY_VERSION, "variant": variant, "sizes": sizes}, indent=2) + "\n"
    )
    return path


def cache_root() -> Path:
    root = os.environ.get("E5V_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "e5v"
    return Path(root)



def family_tiny_folder(cfg: Any, name: str, recipe: dict[str, Any], save: Any, build: bool) -> Path:
    """The build folder of a family's tiny variant: ``<cache_dir or $E5V_CACHE/tiny>/<name>-seed<seed>-<hash of
    recipe>``; with ``build``, built once by ``save(tmp)`` (atomically, marker ``e5v_tiny.json``)."""
    from e5v.data.atomic import build_dir_once

    seed = int(cfg.get("seed") or 0)
    blob = json.dumps(recipe, sort_keys=True)
    root = Path(cfg["cache_dir"]) if cfg.get("cache_dir") else cache_root() / "tiny"
    target = root / f"{name}-seed{seed}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
    return build_dir_once(target, save, "e5v_tiny.json") if build else target

def tiny_dir(seed: int = 0, cache_dir: str | Path | None = None, variant: str = "llama3",
             **size_overrides: Any) -> Path:
    """Where the tiny model for ``seed`` is (or will be) built."""
    sizes = {**DEFAULT_SIZES, **size_overrides}
    root = Path(cache_dir) if cache_dir else cache_root() / "tiny"
    return root / f"seed{seed}-{fingerprint(seed, sizes, variant)}"


def ensure_tiny(seed: int = 0, cache_dir: str | Path | None = None, variant: str = "llama3",
                **size_overrides: Any) -> Path:
    """Directory of the tiny model for ``seed`` (built once, atomically, then reused)."""
    from e5v.data.atomic import build_dir_once

    target = tiny_dir(seed, cache_dir, variant, **size_overrides)
    return build_dir_once(
        target, lambda tmp: save_tiny(tmp, seed=seed, variant=variant, **size_overrides), "e5v_tiny.json"
    )


def _folder(cfg: Any, build: bool = False) -> Path:
    """The build folder a ``tiny`` / ``tiny_mistral`` backbone config loads (built when ``build``)."""
    fn = ensure_tiny if build else tiny_dir
    return fn(int(cfg.get("seed") or 0), cfg.get("cache_dir"), str(cfg.get("variant") or "llama3"),
              **dict(cfg.get("sizes") or {}))


def load(
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "cpu",
    cache_dir: str | None = None,
    attn_implementation: str | None = "sdpa",
    max_tiles: int | None = None,
    sizes: dict[str, Any] | None = None,
    variant: str = "llama3",
) -> llava_next.LlavaNextBackbone:
    """Build (or reuse) the tiny model and load it through the real LLaVA-NeXT loading path."""
    path = ensure_tiny(seed=seed, cache_dir=cache_dir, variant=variant, **dict(sizes or {}))
    backbone = llava_next.load(
        str(path),
        dtype=dtype,
        device=device,
        local_files_only=True,
        attn_implementation=attn_implementation,
        max_tiles=max_tiles,
        family="tiny" if variant == "llama3" else f"tiny_{variant}",
    )
    backbone.info["seed"] = seed
    return backbone


def _build(cfg: Any) -> Path:
    return _folder(cfg, build=True)


registry.register(registry.BackboneSpec(
    name="tiny", loader=load, builtin=True, tiny=True, folder=_folder, build=_build,
    description="tiny random LLaVA-NeXT (Llama text model), built offline from a seed",
))
registry.register(registry.BackboneSpec(
    name="tiny_mistral", loader=load, kwargs={"variant": "mistral"}, builtin=True, tiny=True,
    folder=_folder, build=_build,
    description="tiny random LLaVA-NeXT with a Mistral text model (LLaVA-1.6-Mistral), built offline",
))
