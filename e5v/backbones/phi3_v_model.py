"""Phi-3-Vision as a native transformers 5 model: transformers' own ``Phi3Model`` (the language model) and
``CLIPVisionModel`` (the vision tower), plus the parts Phi-3-V adds, written here: the image embedding that runs
the CLIP crops, merges 2x2 patches, lays the crops out with the learnt separators (``sub_GN`` at each row end,
``glb_GN`` between the crops and the global view) and projects them (``img_projection``: linear, GELU, linear).

The module tree has the hub checkpoint's parameter names (``model.embed_tokens``, ``model.layers.{i}``,
``model.norm``, ``model.vision_embed_tokens.{img_processor.vision_model.*, glb_GN, sub_GN, img_projection.{0,2}}``,
``lm_head``), so ``microsoft/Phi-3-vision-128k-instruct``'s safetensors load by name; :func:`load_model` asserts
that no key is missing or unexpected. ``lm_head`` is loaded (the checkpoint has it, and a merged checkpoint we
save keeps the hub's layout) but never run: :meth:`Phi3VForCausalLM.forward` stops at the final norm.

What the hub's remote code (``modeling_phi3_v.py``, ``image_embedding_phi3_v.py``) computes and this reproduces,
verified against it under transformers 4.44 by ``scripts/phi3v_remote_parity.py`` (docs/backbones.md):

* image tokens are the negative ids of the processor; their embedding rows are replaced, row-major, by the
  projected image features of the batch's images in order (one image per row here);
* the CLIP feature is the output of layer ``img_processor.layer_idx`` (-2: the second-to-last layer), CLS
  dropped; per image: crops (h/336 x w/336 of them, zero-padded crops skipped: the remote code runs CLIP on the
  padding too and discards it), then ``glb_GN``, then the global view, each as rows of 2x2-merged patches
  closed by ``sub_GN``;
* the embedding dropout (``embd_pdrop``, 0 in the checkpoint) applies on the image path only;
* rotary positions: Phi-3's LongRoPE (the config's ``"su"`` scaling; ``"yarn"``, another formula in the remote
  code, is refused).

The vision tower is CLIP ViT-L/14-336 for the hub's ``img_processor.model_name``; a tiny checkpoint names its
own tower in ``img_processor.e5v_vision_config`` (keys of ``CLIPVisionConfig``, over the ViT-L/14-336 values).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3Config, Phi3Model
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.phi3.modeling_phi3 import Phi3PreTrainedModel

HUB_CLIP = "openai/clip-vit-large-patch14-336"
#: the vision tower the hub's remote code builds for HUB_CLIP (its image_embedding_phi3_v.py constants)
CLIP_VIT_L14_336: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768,
    "attention_dropout": 0.0, "dropout": 0.0, "num_channels": 3,
}
#: the hub checkpoint's config.json fields that load the remote code (kept in configs we write)
HUB_AUTO_MAP = {"AutoConfig": "configuration_phi3_v.Phi3VConfig",
                "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"}
VISION_KEY = "e5v_vision_config"
#: crops per CLIP call (the tower's activations are bounded by this many crops, not by the batch's)
VISION_CHUNK = 64



class _HubRopeFormNotice(logging.Filter):
    """Drops transformers' advice to write the LongRoPE ``factor`` instead of ``original_max_position_embeddings``:
    that is the hub's own Phi-3(-V) config form (the ratio is computed from it either way), so on every Phi-3-V
    load it would only tell the user to edit a checkpoint they did not write. Every other rope warning passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "rope_parameters['original_max_position_embeddings']" not in record.getMessage()


logging.getLogger("transformers.modeling_rope_utils").addFilter(_HubRopeFormNotice())

@strict
class Phi3VConfig(Phi3Config):
    """Phi-3 plus the hub config's ``embd_layer`` (HD transform, separators, projector) and ``img_processor``
    (vision tower) dicts. Reads the hub's ``rope_scaling`` ``{"type": "su", ...}`` (transformers 5 names it
    LongRoPE) and writes it back in the hub's three-field form, so the remote code reads configs we save."""

    model_type = "phi3_v"
    embd_layer: dict | None = None
    img_processor: dict | None = None

    def convert_rope_params_to_dict(self, default_theta: int | float = 10_000.0, ignore_keys: set | None = None,
                                    **kwargs: Any) -> Any:
        rs = kwargs.get("rope_scaling")
        if isinstance(rs, dict) and "rope_type" not in rs:
            kind = rs.get("type")
            if kind == "yarn":
                raise ValueError("Phi-3-V rope_scaling type 'yarn' (the remote code's own attention factor) is not "
                                 "implemented natively; the released checkpoints use 'su'")
            if kind == "su":  # transformers 5 renames su -> longrope only after it needed the new name
                kwargs["rope_scaling"] = {**rs, "rope_type": "longrope"}
        return super().convert_rope_params_to_dict(default_theta=default_theta, ignore_keys=ignore_keys, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        rp = out.get("rope_parameters") or {}
        if rp.get("rope_type") == "longrope":  # the hub's layout: the remote config wants exactly these 3 fields
            out.pop("rope_parameters")
            out["rope_scaling"] = {"long_factor": rp["long_factor"], "short_factor": rp["short_factor"], "type": "su"}
            out["rope_theta"] = rp["rope_theta"]
        return out


def vision_config(config: Phi3VConfig, attn_implementation: str = "sdpa") -> CLIPVisionConfig:
    """The CLIP tower of ``config.img_processor``: ViT-L/14-336 for the hub's model name, with any
    ``e5v_vision_config`` overrides (tiny checkpoints); checked against the HD transform's needs."""
    ip = dict(config.img_processor or {})
    if ip.get("name") != "clip_vision_model":
        raise ValueError(f"Phi-3-V img_processor {ip!r}: only the hub's clip_vision_model is implemented")
    overrides = dict(ip.get(VISION_KEY) or {})
    if ip.get("model_name") != HUB_CLIP and not overrides:
        raise ValueError(f"Phi-3-V img_processor.model_name {ip.get('model_name')!r}: only {HUB_CLIP} is known "
                         f"(or give the tower in img_processor.{VISION_KEY})")
    vcfg = CLIPVisionConfig(**{**CLIP_VIT_L14_336, **overrides})
    vcfg._attn_implementation = attn_implementation
    grid = vcfg.image_size // vcfg.patch_size
    if ip.get("image_dim_out") != vcfg.hidden_size or grid % 2 or vcfg.image_size % vcfg.patch_size:
        raise ValueError(f"Phi-3-V vision tower {vcfg.image_size}px / patch {vcfg.patch_size} / width "
                         f"{vcfg.hidden_size} does not fit image_dim_out={ip.get('image_dim_out')} and a 2x2 merge "
                         f"(a tower other than {HUB_CLIP} is named in img_processor.{VISION_KEY})")
    el = dict(config.embd_layer or {})
    want = {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
            "use_hd_transform": True, "with_learnable_separator": True}
    if {k: el.get(k) for k in want} != want:
        raise ValueError(f"Phi-3-V embd_layer {el!r}: only the hub's {want} is implemented")
    return vcfg


class CLIPTower(nn.Module):
    """Holds the CLIP model as ``vision_model`` (the hub's key names: ``img_processor.vision_model.*``)."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.vision_model = CLIPVisionModel(config)


class Phi3VImageEmbedding(nn.Module):
    """``model.vision_embed_tokens``: pixel values of HD crops -> projected image-token features."""

    def __init__(self, config: Phi3VConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        vcfg = vision_config(config, attn_implementation)
        width = 4 * vcfg.hidden_size  # 2x2 patches merged into the channels
        self.img_processor = CLIPTower(vcfg)
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, width))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, width))
        self.img_projection = nn.Sequential(nn.Linear(width, config.hidden_size), nn.GELU(),
                                            nn.Linear(config.hidden_size, config.hidden_size))
        self.drop = nn.Dropout(config.embd_pdrop)
        self.crop = int(vcfg.image_size)
        self.grid = int(vcfg.image_size // vcfg.patch_size)  # patches per crop side (24)
        layer_idx = int((config.img_processor or {}).get("layer_idx", -2))
        n = int(vcfg.num_hidden_layers)
        self.layers_run = layer_idx if layer_idx >= 0 else n + 1 + layer_idx  # hidden_states[layer_idx]
        if not 0 <= self.layers_run <= n:
            raise ValueError(f"Phi-3-V img_processor.layer_idx={layer_idx} outside a {n}-layer tower")

    def clip_features(self, crops: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) -> (N, grid*grid, C): the tower's hidden state after ``layers_run`` layers, CLS dropped
        (the remote code's ``hidden_states[layer_idx][:, 1:]``, without running the layers after it), computed
        :data:`VISION_CHUNK` crops at a time (a 32-image batch has up to 544 crops: bounded activations)."""
        vm = self.img_processor.vision_model
        out = []
        for chunk in crops.split(VISION_CHUNK):
            h = vm.pre_layrnorm(vm.embeddings(chunk))
            for layer in vm.encoder.layers[: self.layers_run]:
                h = layer(h, None)
            out.append(h[:, 1:])
        return torch.cat(out)

    def merge_2x2(self, feats: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """(rows*cols, grid*grid, C) crops of one image -> (rows*g, cols*g, 4C), g = grid / 2."""
        g, c = self.grid // 2, feats.shape[-1]
        x = feats.reshape(rows * cols, g, 2, g, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(rows, cols, g, g, 4 * c)
        return x.permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, 4 * c)

    def with_row_ends(self, hd: torch.Tensor) -> torch.Tensor:
        """(h, w, D) -> (h * (w + 1), D): ``sub_GN`` closes every row."""
        return torch.cat([hd, self.sub_GN[0].expand(hd.shape[0], 1, -1)], dim=1).reshape(-1, hd.shape[-1])

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """pixel_values (images, crops, 3, S, S): the global view then the crops, zero-padded; image_sizes
        (images, 2): each HD image's (height, width). -> (image tokens of all images, hidden) in image order."""
        proj = self.img_projection[0]
        sizes = [(int(h) // self.crop, int(w) // self.crop) for h, w in image_sizes.tolist()]
        used = torch.cat([pixel_values[i, : 1 + r * c] for i, (r, c) in enumerate(sizes)])  # padding skipped
        feats = self.clip_features(used.to(proj.weight.dtype)).split([1 + r * c for r, c in sizes])
        parts = []
        for f, (r, c) in zip(feats, sizes):
            parts += [self.with_row_ends(self.merge_2x2(f[1:], r, c)), self.glb_GN[0],
                      self.with_row_ends(self.merge_2x2(f[:1], 1, 1))]
        return self.img_projection(torch.cat(parts).to(proj.weight.dtype))

    @staticmethod
    def tokens(rows: int, cols: int, grid: int) -> int:
        """Image tokens of an HD image of rows x cols crops (the processor's ``num_img_tokens``)."""
        g = grid // 2
        return (rows * cols + 1) * g * g + 1 + (rows + 1) * g


class Phi3VModel(Phi3Model):
    """``model``: transformers' Phi-3 decoder (embed_tokens, layers, norm) with ``vision_embed_tokens``."""

    def __init__(self, config: Phi3VConfig) -> None:
        super().__init__(config)
        self.vision_embed_tokens = Phi3VImageEmbedding(config)


class Phi3VForCausalLM(Phi3PreTrainedModel):
    """The hub's ``Phi3VForCausalLM`` layout, run to the final norm: ``forward`` returns the post-norm hidden
    states (``last_hidden_state``; ``hidden_states`` too when asked, the last of them post-norm) and never
    computes logits; ``lm_head`` is kept for the checkpoint's layout only."""

    config_class = Phi3VConfig
    config: Phi3VConfig
    base_model_prefix = "model"
    _no_split_modules = ["Phi3DecoderLayer", "CLIPEncoderLayer"]

    def __init__(self, config: Phi3VConfig) -> None:
        super().__init__(config)
        self.model = Phi3VModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the image features at the negative-id positions (row-major, images in order).
        Text ids are not modified (the remote code clamps the caller's ``input_ids`` in place)."""
        image_pos = input_ids < 0
        embeds = self.model.embed_tokens(input_ids.clamp(min=0))
        if pixel_values is None or image_sizes is None:
            if bool(image_pos.any()):
                raise ValueError("Phi-3-V: input_ids hold image positions (negative ids) but no pixel_values / "
                                 "image_sizes were given")
            return embeds
        vision = self.model.vision_embed_tokens
        if bool(image_pos.any()):
            feats = vision(pixel_values, image_sizes)  # (image tokens, hidden)
            if feats.shape[0] != int(image_pos.sum()):
                raise ValueError(f"Phi-3-V: {int(image_pos.sum())} image positions in input_ids but the images give "
                                 f"{feats.shape[0]} features (image_sizes and the prompts disagree)")
            embeds = embeds.index_put(torch.nonzero(image_pos, as_tuple=True), feats.to(embeds.dtype))
        return vision.drop(embeds)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        kwargs.pop("use_cache", None)
        kwargs.pop("num_img_tokens", None)
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_sizes)
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False, **kwargs)


def load_config(path_or_dict: str | dict[str, Any], attn_implementation: str = "sdpa", **kw: Any) -> Phi3VConfig:
    """The config of a Phi-3-V folder / hub id (``config.json``) or dict, checked (a bad vision or HD-transform
    setting raises here, before any weight is read). The attention is ours to choose: the hub's config.json says
    flash_attention_2, which its code then required."""
    if isinstance(path_or_dict, dict):
        config = Phi3VConfig.from_dict(dict(path_or_dict))
    else:
        config = Phi3VConfig.from_pretrained(str(path_or_dict), **kw)
    config._attn_implementation = attn_implementation
    if config.model_type != "phi3_v":
        raise ValueError(f"{path_or_dict} is a '{config.model_type}' model, not phi3_v")
    vision_config(config)
    return config


def load_model(path: str, config: Phi3VConfig, dtype: torch.dtype, attn_implementation: str,
               **kw: Any) -> Phi3VForCausalLM:
    """The hub's safetensors by name into :class:`Phi3VForCausalLM`; raises unless every key matches."""
    model, info = Phi3VForCausalLM.from_pretrained(
        path, config=config, dtype=dtype, attn_implementation=attn_implementation, use_safetensors=True,
        output_loading_info=True, **kw)
    bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"{path}: the checkpoint's weights do not match Phi-3-V's layout: {bad}")
    return model


def rope_attention_factor(config: Phi3VConfig) -> float:
    """LongRoPE's cos/sin scale, sqrt(1 + ln(max / original) / ln(original)), as the remote code computes it."""
    scale = config.max_position_embeddings / config.original_max_position_embeddings
    return 1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(config.original_max_position_embeddings))
