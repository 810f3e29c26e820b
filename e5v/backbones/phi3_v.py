"""Phi-3-Vision (microsoft/Phi-3-vision-128k-instruct). Its modelling code ships inside the checkpoint,
so loading runs third-party code: refused unless the config opts in with
``backbone.trust_remote_code=true``. Pin ``backbone.revision`` to the commit you reviewed.

As released (kongds/E5-V ``retrieval.py``, ``ft_llm.py``):

* the processor takes ONE string (it splits it on ``<|image_N|>`` tags), so image batches call it one
  item at a time, ``processor(prompt, [image])``; the items are then left padded into one batch (ids,
  mask, position ids; ``pixel_values`` zero-padded to the most crops, as the processor itself pads);
* the forward is the full model with ``output_hidden_states=True``, last layer, last token;
* LoRA targets ``model.layers.{i}.self_attn.{qkv_proj,o_proj}`` and ``model.layers.{i}.mlp.{gate_up_proj,
  down_proj}``; the image embedding (CLIP + projection, ``model.vision_embed_tokens``) stays frozen.

The modelling code is remote and not available offline: the tests exercise these processor calls, the
batching and the LoRA target selection against stand-ins (``tests/helpers/phi3v_standin.py``), not the
real Phi-3-V code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from e5v.backbones import batching, registry
from e5v.backbones.base import Backbone, Inputs, hf_model, left_padded, resolve_device, resolve_dtype
from e5v.backbones.llava_next import hub_kwargs
from e5v.errors import E5VError

OPT_IN_KEY = "backbone.trust_remote_code"


class RemoteCodeRefused(E5VError, PermissionError):
    """Loading would run the checkpoint's own Python code and the config did not opt in."""


class Phi3VInputs(Inputs):
    """The Phi-3-V processor called once per item with one string, as released; items left padded."""

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
    packing_note = ("its modelling code ships with the checkpoint (remote code): packed sequences are not "
                    "verified against it offline")

    def forward(self, batch: dict[str, torch.Tensor], model: torch.nn.Module | None = None) -> torch.Tensor:
        out = hf_model(model if model is not None else self.model)(
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
    left_padded(processor.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        trust_remote_code=trust_remote_code,
        dtype=resolve_dtype(dtype, device),
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


registry.register(registry.BackboneSpec(
    name="phi3_v", loader=load, model_types=("phi3_v",), family=Phi3VBackbone,
    description="Phi-3-Vision (remote code: opt-in with backbone.trust_remote_code=true)",
))
