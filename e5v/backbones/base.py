"""The backbone contract: what every MLLM family provides to the embedder AND the trainer.

A family module (``e5v/backbones/<family>.py``) subclasses two classes and registers its rows in
:mod:`e5v.backbones.registry`:

* :class:`Inputs` (picklable: the processor and the pad id only, so it also runs in DataLoader workers):
  tokenizing rendered prompts, text batches (left padding, position ids: :mod:`e5v.backbones.batching`)
  and image batches (the processor called the way the family needs: LLaVA-NeXT one batched call with the
  image placeholder expanded from the image size, Phi-3-V one item at a time with one string ...);
* :class:`Backbone` (the loaded model): :meth:`Backbone.forward` runs the decoder to the final-norm state
  at the last token, for the embedder and for training alike (training passes the LoRA-wrapped model);
  the LoRA target modules (:meth:`Backbone.lora_target_regex`), the frozen modules
  (:attr:`Backbone.frozen_modules`), the modalities it takes and its default prompt config.

Packing (:mod:`e5v.packing`) is part of the same contract, so the embedder and the trainer pack alike:
:attr:`Backbone.packable` names the input kinds whose packed forward is exact (tested against padded, fp32,
1e-5), :meth:`Backbone.pack_threshold` resolves an ``auto | true | false`` setting against it (and falls back
to padded batches, saying so, where a family cannot pack), :meth:`Backbone.default_pack_tokens` sets the pack
width, :meth:`Inputs.pack` / :meth:`Inputs.pack_text` build packed batches (in DataLoader workers too), and
:meth:`Backbone.pool` takes each row's last token of a padded or a packed forward.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from e5v import packing
from e5v.backbones import batching
from e5v.errors import E5VError

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """A dtype name (float32 | bfloat16 | float16, short forms fp32 / bf16 / fp16) or ``auto``: bfloat16 on
    CUDA (float16 on a GPU without bf16), float32 on the CPU (``device`` as :func:`resolve_device` takes it)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() == "auto":
        if resolve_device(device).type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto or one of {sorted(DTYPES)}") from None


def left_padded(tokenizer: Any) -> Any:
    """Every family's tokenizer set-up: left padding (the last token is each row's last real token), EOS as the
    pad token where the checkpoint has none (as the release does for LLaVA-NeXT). Returns the tokenizer."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def dtype_name(dtype: str | torch.dtype, device: str | torch.device | None = None) -> str:
    """The dtype a setting resolves to, by name (``auto`` -> float32 on the CPU, bfloat16 on CUDA ...): what
    results, caches and fingerprints record, so an ``auto`` run on a GPU never shares entries with a CPU one."""
    return str(resolve_dtype(dtype, device)).removeprefix("torch.")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device} was requested but CUDA is not available; use device=cpu")
    return device


ATTENTION = ("auto", "sdpa", "flash_attention_2", "eager")


def resolve_attn_implementation(attn: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """``auto``: FlashAttention-2 when the ``flash_attn`` package is installed, the device is CUDA and
    the dtype is half precision (what its kernels take); PyTorch SDPA otherwise. Explicit names pass."""
    if attn in (None, "auto"):
        import importlib.util

        if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and importlib.util.find_spec("flash_attn"):
            return "flash_attention_2"
        return "sdpa"
    if attn not in ATTENTION:
        raise ValueError(f"attn_implementation must be one of {ATTENTION}, got {attn!r}")
    return str(attn)


MODALITIES = ("text", "image", "interleaved")
# attention implementations that take packed sequences from restarting position ids (transformers 5: a
# block-diagonal mask for eager / sdpa / flex, variable-length kernels for flash attention)
PACKED_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
_WARNED: set[tuple[str, str, str]] = set()


class UnsupportedInputError(E5VError, ValueError):
    """An input kind (image, image+text) the loaded backbone cannot take; the message names the backbone."""


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a peft wrapper (LoRA layers are injected in place, so running the
    unwrapped model's submodules runs the adapters too); the model itself otherwise."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        return get_base()
    return model


def submodule(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """``model.<path>`` for a dotted attribute path (``model.language_model``)."""
    out = model
    for part in path.split("."):
        out = getattr(out, part)
    return out


# ---------------------------------------------------------------------- helpers for processors
def images_only(processor_class: type) -> type:
    """``processor_class`` that can be built without a video processor (E5-V embeds images only):
    transformers checks every sub-processor's class, and the video processor's needs torchvision."""

    class ImagesOnly(processor_class):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = processor_class.__name__
    return ImagesOnly


def read_chat_template(path: str, kw: dict[str, Any] | None = None) -> str | None:
    """The processor's chat template (``chat_template.jinja`` / ``chat_template.json`` beside the weights, local
    or from the hub with ``kw``: revision, local_files_only), None if there is none."""
    from pathlib import Path

    for name in ("chat_template.jinja", "chat_template.json"):
        f: Path | None = Path(path) / name
        if not Path(path).is_dir():
            try:
                from huggingface_hub import hf_hub_download

                f = Path(hf_hub_download(path, name, **dict(kw or {})))
            except Exception:  # not in the repository, or not cached while offline
                f = None
        if f is not None and f.is_file():
            text = f.read_text(encoding="utf-8")
            return str(json.loads(text)["chat_template"]) if name.endswith(".json") else text
    return None


class Inputs:
    """Turns rendered prompts (and images) into CPU tensors for one family. Holds only the processor and
    the pad id, so it pickles into DataLoader workers.

    ``tokenize`` and ``text`` are shared by every family; ``images`` and ``image_tokens`` are the
    family's processor calls (this base class: one batched processor call, as most processors take).
    ``pack_text`` and ``pack`` build packed batches (:mod:`e5v.packing`); a family whose image batches pack
    names its per-row image tensors in ``packed_row_keys``."""

    #: (B, L) per-token inputs moved with their tokens when a padded batch is packed
    packed_token_keys: ClassVar[tuple[str, ...]] = ("input_ids",)
    #: per-row inputs (dim 0 = row, one image per row) reordered with their rows when a batch is packed
    packed_row_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, processor: Any, pad_id: int, image_token: str = "<image>") -> None:
        self.processor = processor
        self.pad_id = int(pad_id)
        self.image_token = image_token
        tok = self.tokenizer
        tid = getattr(processor, "image_token_id", None)
        if tid is None and hasattr(tok, "convert_tokens_to_ids"):
            t = tok.convert_tokens_to_ids(getattr(processor, "image_token", image_token))
            tid = t if isinstance(t, int) and t != getattr(tok, "unk_token_id", None) else None
        self.image_token_id: int | None = tid

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    # -------------------------------------------------------------- text (every family)
    def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each rendered prompt (special tokens such as BOS added), one batched call."""
        return list(self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]) if prompts else []

    def text(self, seqs: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """A text batch: left padded ids, attention mask, position ids from the mask."""
        return batching.text_batch(seqs, self.pad_id)

    # -------------------------------------------------------------- images (per family)
    def image_tokens(self, sizes_hw: Sequence[tuple[int, int]]) -> list[int] | None:
        """Tokens each image of (height, width) expands to, from the processor's own rule; None when the
        processor cannot tell (then batches are sorted by text length only)."""
        helper = getattr(self.processor, "_get_num_multimodal_tokens", None)
        if helper is None:
            return None
        try:
            return [int(n) for n in helper(image_sizes=[list(s) for s in sizes_hw])["num_image_tokens"]]
        except Exception:  # a processor whose helper needs other inputs
            return None

    def images(self, rows: Sequence[tuple[Sequence[int], str]], images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """An image batch: ``rows`` are (token ids with one image placeholder, rendered prompt) and
        ``images`` the decoded PIL images, one per row. Default: one batched processor call, left padded
        by the tokenizer, position ids from the mask."""
        enc = self.processor(text=[p for _, p in rows], images=list(images), padding=True, return_tensors="pt")
        tensors = {k: v for k, v in dict(enc).items() if isinstance(v, torch.Tensor)}
        tensors["attention_mask"] = tensors["attention_mask"].long()
        return batching.with_positions(tensors)

    def prompt_images(self, prompt: str, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """``images`` (decoded) each in the same rendered ``prompt``, in the given order."""
        ids = self.tokenize([prompt])[0]
        return self.images([(ids, prompt)] * len(images), images)

    # -------------------------------------------------------------- packed batches (e5v.packing)
    def pack_text(
        self, seqs: Sequence[Sequence[int]], max_tokens: int | None = None, min_saving: float = 0.0
    ) -> dict[str, torch.Tensor]:
        """Token id lists packed into rows of at most ``max_tokens`` tokens (None: the longest row), no
        padding; the padded batch (:meth:`text`) instead when packing removes less than ``min_saving`` of its
        tokens."""
        if min_saving > 0 and packing.saving([len(s) for s in seqs], max_tokens) < min_saving:
            return self.text(seqs)
        return packing.pack_rows(seqs, max_tokens, self.pad_id).tensors()

    def pack(
        self, batch: dict[str, torch.Tensor], max_tokens: int | None = None, min_saving: float = 0.0
    ) -> dict[str, torch.Tensor]:
        """A left-padded batch of this family (``text`` or ``images``) packed, its image tensors reordered; the
        batch as it is when packing removes less than ``min_saving`` of its tokens."""
        if min_saving > 0 and packing.saving(batch["attention_mask"].sum(1).tolist(), max_tokens) < min_saving:
            return batch
        return packing.pack_padded(batch, self.pad_id, max_tokens, self.packed_token_keys, self.packed_row_keys)


@dataclass
class Backbone:
    """A loaded MLLM ready for embedding and training: one family's side of the contract.

    ``model`` and ``processor`` are the Hugging Face objects. A family subclass sets the class-level
    facts below and implements :meth:`forward` (and, if its processor needs it, an :class:`Inputs`).
    """

    model: torch.nn.Module
    processor: Any
    family: str
    name_or_path: str
    image_token: str = "<image>"
    max_length: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    # -------------------------------------------------------------- class-level facts of the family
    #: the Inputs class of this family (its processor calls)
    inputs_class: ClassVar[type[Inputs]] = Inputs
    #: which of text / image / interleaved (image+text) inputs it takes
    modalities: ClassVar[tuple[str, ...]] = MODALITIES
    #: dotted path of the decoder stack (embeddings, layers, final norm) inside the HF model
    language_model_path: ClassVar[str] = "model.language_model"
    #: default LoRA targets: projection names inside each decoder layer's attention / MLP
    lora_targets: ClassVar[tuple[str, ...]] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )
    #: dotted paths of the modules that stay frozen (and in eval mode) in training: vision tower, projector
    frozen_modules: ClassVar[tuple[str, ...]] = ()
    #: the prompt config (configs/prompt/<name>.yaml) whose chat wrapper is this model's
    prompt_name: ClassVar[str] = "e5v_llama3"
    #: input kinds whose packed forward equals the padded one (tests/test_packing.py): rows packed into long
    #: sequences, position ids restarting per row, no attention mask. Empty: always padded batches
    packable: ClassVar[tuple[str, ...]] = ()
    #: why the kinds not in ``packable`` are not packed (said when packing=true meets them)
    packing_note: ClassVar[str] = "packing is not implemented for this family"

    # -------------------------------------------------------------- HF objects
    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        text_cfg = getattr(cfg, "text_config", None) or cfg
        return int(text_cfg.hidden_size)

    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise ValueError(f"tokenizer of {self.name_or_path} has neither a pad nor an eos token")
        return int(pad)

    # -------------------------------------------------------------- inputs
    def inputs(self) -> Inputs:
        """This family's (picklable) input builder for this backbone's processor."""
        return self.inputs_class(self.processor, self.pad_token_id, self.image_token)

    def require(self, modality: str) -> None:
        """Raise :class:`UnsupportedInputError` naming the backbone unless it takes ``modality``."""
        if modality not in self.modalities:
            what = {"image": "images", "interleaved": "image+text inputs", "text": "text"}.get(modality, modality)
            raise UnsupportedInputError(
                f"backbone {self.family} ({self.name_or_path}) cannot take {what}: it takes "
                f"{', '.join(self.modalities)} only"
            )

    # -------------------------------------------------------------- packing
    def can_pack(self, modality: str) -> tuple[bool, str]:
        """(whether batches of ``modality`` pack exactly on this loaded model, why not)."""
        if modality not in self.packable:
            return False, self.packing_note
        cfg = self.model.config
        cfg = getattr(cfg, "text_config", None) or cfg  # the decoder's attention (a vision tower may differ)
        attn = str(getattr(cfg, "_attn_implementation", None) or "sdpa")
        if attn not in PACKED_ATTENTION:
            return False, f"attention {attn!r} takes no packed sequences (use one of {', '.join(PACKED_ATTENTION)})"
        return True, ""

    def pack_threshold(self, modality: str, setting: Any = "auto") -> float | None:
        """How batches of ``modality`` (text, image, interleaved) go under ``setting``: None = padded; a number
        = packed whenever packing removes at least that share of the padded forward's tokens. ``false``: None;
        ``true``: 0 wherever :meth:`can_pack` (a warning, once, names what stays padded); ``auto``:
        :data:`e5v.packing.AUTO_MIN_SAVING` where it can pack and the model is on a device of
        :data:`e5v.packing.AUTO_PACK_DEVICES`, else None."""
        mode = packing.packing_mode(setting)
        if mode == "false":
            return None
        able, why = self.can_pack(modality)
        if mode == "auto":
            return packing.AUTO_MIN_SAVING if able and self.device.type in packing.AUTO_PACK_DEVICES else None
        if not able:
            key = (self.family, modality, why)
            if key not in _WARNED:
                _WARNED.add(key)
                log.warning("packing=true: backbone %s cannot pack %s inputs exactly (%s); they go in padded batches",
                            self.family, modality, why)
            return None
        return 0.0

    def packs(self, modality: str, setting: Any = "auto") -> bool:
        """Whether batches of ``modality`` may go packed under ``setting`` (:meth:`pack_threshold` is set)."""
        return self.pack_threshold(modality, setting) is not None

    # -------------------------------------------------------------- compilation
    def compile_decoder(self, enable: bool = True, model: torch.nn.Module | None = None) -> None:
        """``torch.compile`` the decoder stack's forward (dynamic shapes: one graph for every batch length),
        or put the eager forward back (``enable=False``; the compiled one is kept for a later switch).
        Measured (docs/performance.md): encoding 1.08-1.14x on the CPU tiny model after a 11-37 s warm-up
        (the first call of each input kind compiles); training 0.90x, so the trainer does not offer it."""
        lm = self.language_model(model)
        eager = lm.__dict__.get("_e5v_eager_forward")
        if enable:
            if eager is None:
                lm._e5v_eager_forward = lm.forward
                lm._e5v_compiled_forward = torch.compile(lm.forward, dynamic=True)
            lm.forward = lm._e5v_compiled_forward
        elif eager is not None:
            lm.forward = eager

    def default_pack_tokens(self) -> int:
        """The pack width when ``pack_tokens`` is not set: :func:`e5v.packing.attention_bounded_width` of the
        decoder's first layer (its linear weights) and hidden size; 1,024 for a decoder of another layout."""
        try:
            layer = self.language_model().layers[0]
        except (AttributeError, IndexError, TypeError):
            return 1024
        params = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
        return packing.attention_bounded_width(params, self.hidden_size) if params else 1024

    def pool(self, states: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, L, d) final post-norm states -> (rows, d) at each row's last token, padded or packed batch."""
        return packing.last_token(states, batch)

    # -------------------------------------------------------------- forward
    def forward(self, batch: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> torch.Tensor:
        """The last layer's post-norm hidden state at the last position, (B, d). ``model``: the model to
        run (training passes the LoRA-wrapped one; default: ``self.model``). A family in whose
        :attr:`packable` a kind is also gets packed batches of it (no ``attention_mask``; ``position_ids``
        restarting per row; ``last_index``): pass ``batch.get("attention_mask")`` and pool with :meth:`pool`."""
        raise NotImplementedError  # pragma: no cover

    def last_token_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward(batch, self.model)

    # -------------------------------------------------------------- training
    @classmethod
    def lora_target_regex(cls, targets: Sequence[str] | None = None) -> str:
        """Full-match regex (peft semantics for a string) of the decoder layers' projections only: matched
        by module path, so a vision tower's attention with the same names is never hit."""
        names = "|".join(sorted(targets or cls.lora_targets))
        return rf"{re.escape(cls.language_model_path)}\.layers\.\d+\.(self_attn|mlp)\.({names})"

    @classmethod
    def in_language_model(cls, parameter_name: str) -> bool:
        """Whether a (possibly peft-prefixed) parameter name lies in the decoder's layers."""
        return re.search(rf"(^|\.){re.escape(cls.language_model_path)}\.layers\.\d+\.", parameter_name) is not None

    def language_model(self, model: torch.nn.Module | None = None) -> torch.nn.Module:
        """The decoder stack inside ``model`` (default ``self.model``), through any peft wrapper."""
        return submodule(hf_model(model if model is not None else self.model), self.language_model_path)

    def frozen(self, model: torch.nn.Module | None = None) -> list[torch.nn.Module]:
        """The frozen modules (vision tower, projector ...) inside ``model``, those that exist."""
        root = hf_model(model if model is not None else self.model)
        out = []
        for path in self.frozen_modules:
            try:
                out.append(submodule(root, path))
            except AttributeError:
                continue
        return out

    def default_prompt(self) -> str:
        """The prompt config whose chat wrapper matches this model."""
        return self.prompt_name

    # -------------------------------------------------------------- export
    #: save the tokenizer (with its chat template) and the image processor one by one: for processors built
    #: for images only, whose own save_pretrained expects a video processor
    save_processor_parts: ClassVar[bool] = False

    def save_processor(self, path: str | os.PathLike) -> None:
        """The processor's files (tokenizer, image processor, chat template) into ``path``: what the family's
        loader reads back."""
        if self.save_processor_parts:
            self.processor.tokenizer.save_pretrained(str(path))
            self.processor.image_processor.save_pretrained(str(path))
        else:
            self.processor.save_pretrained(str(path))

    def save_pretrained(self, path: str | os.PathLike, model: torch.nn.Module | None = None) -> None:
        """A Hugging Face model folder (safetensors + processor files) that this family's loader reads;
        ``model``: e.g. the LoRA-merged model (default ``self.model``)."""
        (model if model is not None else self.model).save_pretrained(str(path), safe_serialization=True)
        self.save_processor(path)


def has_torchvision() -> bool:
    """True when torchvision is importable (then transformers' fast image processors can be used)."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:  # a torchvision that does not match torch fails at import
        return False
    return True


def image_processor_class(fast: str, pil_module: str, pil: str) -> type:
    """transformers' torchvision image processor ``fast`` when torchvision works, else its PIL twin ``pil`` from
    ``pil_module`` (same outputs; no torchvision on CPU machines)."""
    import importlib

    if has_torchvision():
        import transformers

        return getattr(transformers, fast)
    return getattr(importlib.import_module(pil_module), pil)
