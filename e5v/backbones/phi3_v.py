"""Phi-3-Vision (microsoft/Phi-3-vision-128k-instruct). Its modelling code ships inside the checkpoint,
so loading runs third-party code: refused unless the config opts in with
``backbone.trust_remote_code=true``. Pin ``backbone.revision`` to the commit you reviewed.
"""

from __future__ import annotations

from typing import Any

import torch

from e5v.backbones.base import Backbone, resolve_device, resolve_dtype
from e5v.backbones.llava_next import hub_kwargs

OPT_IN_KEY = "backbone.trust_remote_code"


class RemoteCodeRefused(PermissionError):
    pass


class Phi3VBackbone(Backbone):
    def last_token_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch.get("position_ids"),
            pixel_values=batch.get("pixel_values"),
            image_sizes=batch.get("image_sizes"),
            output_hidden_states=True,
            use_cache=False,
        )
        return out.hidden_states[-1][:, -1, :]


def load(
    name_or_path: str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "auto",
    revision: str | None = None,
    local_files_only: bool | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = "eager",
    **_: Any,
) -> Phi3VBackbone:
    if not trust_remote_code:
        raise RemoteCodeRefused(
            f"{name_or_path} (phi3_v) needs its own modelling code from the checkpoint, which runs arbitrary "
            f"Python. Refusing by default. To opt in, set {OPT_IN_KEY}=true (Hydra override) or pass "
            "trust_remote_code as a keyword, ideally with backbone.revision pinned to a commit you reviewed."
        )
    from transformers import AutoModelForCausalLM, AutoProcessor

    kw = hub_kwargs(revision, local_files_only)
    processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kw)
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        trust_remote_code=trust_remote_code,
        dtype=resolve_dtype(dtype),
        attn_implementation=attn_implementation,
        use_safetensors=True,
        **kw,
    )
    model.to(resolve_device(device)).eval()
    return Phi3VBackbone(
        model=model,
        processor=processor,
        family="phi3_v",
        name_or_path=str(name_or_path),
        image_token="<|image_1|>",
        max_length=int(getattr(model.config, "max_position_embeddings", 0)) or None,
        info={"revision": revision},
    )
