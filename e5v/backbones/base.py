"""What every backbone adapter provides to the embedder: model, processor, and one batched forward."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}") from None


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


@dataclass
class Backbone:
    """A loaded MLLM ready for embedding.

    ``model`` and ``processor`` are the Hugging Face objects. ``last_token_states`` runs one padded
    batch and returns the last layer's (post-norm) hidden state at the last position, shape (B, d).
    """

    model: torch.nn.Module
    processor: Any
    family: str
    name_or_path: str
    image_token: str = "<image>"
    max_length: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

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

    def last_token_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError
