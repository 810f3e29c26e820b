"""The trainable encoder: the MLLM's language model with LoRA, everything else frozen.

LoRA targets are matched by MODULE PATH (``model.language_model.layers.N.self_attn.q_proj`` ...):
a bare ``q_proj`` would also hit the CLIP tower's attention. The vision tower and projector stay
loaded (so the adapter applies to the full MLLM and merging is a plain peft merge) but are frozen and
outside the optimizer. Text-only training (the E5-V recipe) never runs them; image-caption training
(the paper's Table 7 setting) runs them, frozen and in eval mode, to embed the image anchors.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

LM_LAYER_PATH = r"model\.language_model\.layers\.\d+"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_META = "e5v_adapter.json"


def target_regex(targets: list[str] | tuple[str, ...] = DEFAULT_TARGETS) -> str:
    """Full-match regex (peft semantics for a string) for the language model's projections only."""
    names = "|".join(sorted(targets))
    return rf"{LM_LAYER_PATH}\.(self_attn|mlp)\.({names})"


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (post-norm output) inside a LLaVA-NeXT model, with or without a peft wrapper."""
    inner = model
    for attr in ("base_model", "model"):  # PeftModel -> LoraModel -> LlavaNextForConditionalGeneration
        if hasattr(inner, "peft_config") and hasattr(inner, attr):
            inner = getattr(inner, attr)
    if hasattr(inner, "model") and hasattr(inner.model, "language_model"):
        return inner.model.language_model
    raise TypeError(f"cannot find a language model inside {type(model).__name__}")


def multimodal_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``LlavaNextModel`` (vision tower + projector + language model, post-norm output, no lm_head)
    inside a LLaVA-NeXT model, with or without a peft wrapper."""
    inner = model
    for attr in ("base_model", "model"):
        if hasattr(inner, "peft_config") and hasattr(inner, attr):
            inner = getattr(inner, attr)
    mm = getattr(inner, "model", None)
    if mm is not None and hasattr(mm, "language_model") and hasattr(mm, "vision_tower"):
        return mm
    raise TypeError(f"cannot find a LLaVA-NeXT vision tower + language model inside {type(model).__name__}")


FROZEN_TOWERS = ("vision_tower", "multi_modal_projector")


class TextEncoder(torch.nn.Module):
    """Wraps the (peft) MLLM; forward = the last layer's last-token hidden state, (B, d).

    Text (``pixel_values`` None): the language model alone, as E5-V trains. Images (``pixel_values``
    and ``image_sizes`` from the LLaVA-NeXT processor): the full MLLM, the frozen vision tower and
    projector filling the image tokens, then the (LoRA) language model; as the embedder does at
    inference. One module either way, so one DeepSpeed engine wraps both.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def train(self, mode: bool = True) -> TextEncoder:
        """The frozen vision tower and projector stay in eval mode (no dropout) whatever ``mode`` is."""
        super().train(mode)
        if mode:
            try:
                mm = multimodal_model(self.model)
            except TypeError:
                return self
            for name in FROZEN_TOWERS:
                sub = getattr(mm, name, None)
                if sub is not None:
                    sub.eval()
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if pixel_values is None:
            out = language_model(self.model)(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
            return out.last_hidden_state[:, -1, :]
        mm = multimodal_model(self.model)
        vision_dtype = next(mm.vision_tower.parameters()).dtype
        out = mm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            pixel_values=pixel_values.to(vision_dtype),  # the processor gives float32; the tower may be bf16/fp16
            image_sizes=image_sizes,
            use_cache=False,
        )
        return out.last_hidden_state[:, -1, :]  # (B, d)


def add_lora(
    model: torch.nn.Module,
    r: int = 64,
    alpha: int = 16,
    dropout: float = 0.05,
    targets: list[str] | tuple[str, ...] = DEFAULT_TARGETS,
    activation_checkpointing: bool = False,
) -> torch.nn.Module:
    """Freeze everything, then add trainable LoRA to the language model's projections."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", target_modules=target_regex(list(targets))
    )
    peft_model = get_peft_model(model, cfg)
    bad = [n for n, p in peft_model.named_parameters() if p.requires_grad and ".language_model." not in n]
    if bad:
        raise RuntimeError(f"LoRA reached modules outside the language model: {bad[:3]}")
    if activation_checkpointing:
        lm = language_model(peft_model)
        kwargs = {"use_reentrant": False}  # re-entrant checkpointing needs inputs that require grad
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return peft_model


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def save_adapter(peft_model: torch.nn.Module, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """LoRA weights as safetensors (peft layout) + our metadata (base backbone config, prompt)."""
    out_dir = Path(out_dir)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / ADAPTER_META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return out_dir


def read_adapter_meta(adapter_dir: str | Path) -> dict[str, Any]:
    f = Path(adapter_dir) / ADAPTER_META
    if not f.is_file():
        raise FileNotFoundError(f"{adapter_dir} has no {ADAPTER_META}: not an adapter saved by e5v training")
    return json.loads(f.read_text())


def apply_adapter(model: torch.nn.Module, adapter_dir: str | Path, merge: bool = True) -> torch.nn.Module:
    """Load a saved adapter onto a base LLaVA-NeXT model; merged into the weights by default."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"{adapter_dir}/adapter_model.safetensors not found (adapters are safetensors only)")
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    return peft_model.merge_and_unload() if merge else peft_model


def load_adapter_into_embedder(embedder: Any, adapter_dir: str | Path) -> Any:
    """Fold a training adapter into an Embedder's model in place (what evaluation of a checkpoint needs)."""
    embedder.backbone.model = apply_adapter(embedder.backbone.model, adapter_dir, merge=True).eval()
    return embedder


def merge_to_dir(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None, dtype: str = "float32") -> Path:
    """Fold the adapter into the full MLLM and save a Hugging Face directory (safetensors + processor)."""
    from omegaconf import OmegaConf

    from e5v.config import instantiate

    from e5v.data.atomic import atomic_write_text

    meta = read_adapter_meta(adapter_dir)
    bcfg = OmegaConf.create(meta["backbone"])
    if base:
        bcfg.name_or_path = base
    backbone = instantiate(bcfg, dtype=dtype, device="cpu")
    merged = apply_adapter(backbone.model, adapter_dir, merge=True)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new directory")
    tmp = out.with_name(f".{out.name}.partial")
    merged.save_pretrained(str(tmp), safe_serialization=True)
    backbone.processor.save_pretrained(str(tmp))
    atomic_write_text(tmp / "e5v_merged.json", json.dumps({"adapter": str(adapter_dir), **meta}, indent=2, default=str))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
