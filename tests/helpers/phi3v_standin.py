"""STAND-INS for Phi-3-Vision, NOT its code. Phi-3-V's processor and model ship as remote code inside the
checkpoint (not available offline, and never run by default). These classes reproduce only the interface
facts our Phi-3-V backbone relies on, as the released E5-V code uses them:

* ``StandInPhi3VProcessor.__call__(text, images)``: ONE string (``re.split`` on ``<|image_N|>`` tags: a list
  raises ``TypeError``, as the real one does); each chunk tokenized with BOS, the BOS of later chunks dropped;
  the N-th image tag becomes ``num_img_tokens`` copies of ``-N``; ``pixel_values`` (images, crops, 3, S, S)
  zero-padded to the most crops; ``image_sizes`` (images, 2); the image processor can count tokens from a
  size (``calc_num_image_tokens_from_image_size(width, height)``).
* ``StandInPhi3V``: a Phi-3 decoder (transformers' own ``Phi3Model``: ``model.layers.{i}.self_attn.{qkv_proj,
  o_proj}``, ``mlp.{gate_up_proj,down_proj}``, the release's LoRA targets) with a CLIP tower + projection at
  ``model.vision_embed_tokens`` that fills the negative-id positions, using ``image_sizes`` to ignore padded
  crops; ``forward(..., output_hidden_states=True).hidden_states[-1]`` is the post-norm last layer.

What the real remote code computes is not tested here (no GPU/weights in this project's CI).
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

S = 16  # crop size in pixels
TOKENS_PER_CROP = 2
SPECIAL = ["<s>", "</s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from e5v.backbones.tiny import tiny_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(tiny_corpus(), trainer=trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", padding_side="left")


class StandInImageProcessor:
    def grid(self, width: int, height: int) -> tuple[int, int]:
        return min(2, -(-height // (2 * S))), min(2, -(-width // (2 * S)))

    def calc_num_image_tokens_from_image_size(self, width: int, height: int) -> int:
        gh, gw = self.grid(width, height)
        return (1 + gh * gw) * TOKENS_PER_CROP

    def __call__(self, images: list[Any], return_tensors: str = "pt") -> dict[str, Any]:
        crops, sizes, counts = [], [], []
        for im in images:
            gh, gw = self.grid(*im.size)
            full = np.asarray(im.convert("RGB").resize((gw * S, gh * S)), dtype=np.float32) / 255.0
            tiles = [np.asarray(im.convert("RGB").resize((S, S)), dtype=np.float32) / 255.0]  # global view first
            tiles += [full[r * S:(r + 1) * S, c * S:(c + 1) * S] for r in range(gh) for c in range(gw)]
            crops.append(torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2))
            sizes.append([gh * S, gw * S])
            counts.append((1 + gh * gw) * TOKENS_PER_CROP)
        most = max(c.shape[0] for c in crops)
        pixel_values = torch.stack([torch.cat([c, c.new_zeros(most - c.shape[0], *c.shape[1:])]) for c in crops])
        return {"pixel_values": pixel_values, "image_sizes": torch.tensor(sizes), "num_img_tokens": counts}


class StandInPhi3VProcessor:
    """The remote Phi3VProcessor's call interface (see the module docstring). A stand-in."""

    pattern = r"<\|image_\d+\|>"

    def __init__(self) -> None:
        self.tokenizer = build_tokenizer()
        self.image_processor = StandInImageProcessor()
        self.calls: list[tuple[type, int]] = []  # (type of text, number of images) per call

    def __call__(self, text: Any, images: Any = None, padding: bool = False, return_tensors: str = "pt") -> dict:
        self.calls.append((type(text), 0 if images is None else len(images)))
        if images is None:
            return dict(self.tokenizer(text, padding=padding, return_tensors=return_tensors))
        vis = self.image_processor(images)
        chunks = [self.tokenizer(c)["input_ids"] for c in re.split(self.pattern, text)]  # a list: TypeError
        tags = [int(t.split("|")[1].split("_")[-1]) for t in re.findall(self.pattern, text)]
        ids = list(chunks[0])
        for k, n in enumerate(tags):
            ids += [-n] * vis["num_img_tokens"][n - 1] + chunks[k + 1][1:]  # later chunks lose their BOS
        input_ids = torch.tensor([ids])
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": vis["pixel_values"],
                "image_sizes": vis["image_sizes"]}


class StandInImageEmbedding(torch.nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        self.img_processor = CLIPVisionModel(CLIPVisionConfig(image_size=S, patch_size=8, hidden_size=32,
                                                              intermediate_size=64, num_hidden_layers=1,
                                                              num_attention_heads=4))
        self.img_projection = torch.nn.Linear(32, TOKENS_PER_CROP * hidden)

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for pv, (h, w) in zip(pixel_values, image_sizes.tolist()):
            n = 1 + (h // S) * (w // S)  # real crops only (padded ones ignored, as Phi-3-V's HD transform does)
            feats = self.img_processor(pixel_values=pv[:n]).pooler_output  # (n, 32)
            out.append(self.img_projection(feats).reshape(n * TOKENS_PER_CROP, -1))
        return out


def _forward(self: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
             pixel_values: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
             output_hidden_states: bool = False, use_cache: bool = False, **_: Any) -> Any:
    embeds = self.model.embed_tokens(input_ids.clamp(min=0))
    if pixel_values is not None:
        feats = torch.cat(self.model.vision_embed_tokens(pixel_values, image_sizes)).to(embeds.dtype)
        embeds = embeds.index_put(tuple(torch.nonzero(input_ids < 0).T), feats)
    out = self.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return SimpleNamespace(hidden_states=(out.last_hidden_state,))  # [-1]: post-norm last layer


def _standin_class() -> type:
    from transformers import Phi3Model, Phi3PreTrainedModel

    class StandInPhi3V(Phi3PreTrainedModel):
        """A Phi-3 decoder + a stand-in image embedding at Phi-3-V's module paths. A stand-in."""

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.model = Phi3Model(config)
            self.model.vision_embed_tokens = StandInImageEmbedding(config.hidden_size)
            self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        forward = _forward

    return StandInPhi3V


def standin_backbone(seed: int = 0) -> Any:
    """A :class:`e5v.backbones.phi3_v.Phi3VBackbone` around the stand-ins (what phi3_v.load would return)."""
    from transformers import Phi3Config

    from e5v.backbones.phi3_v import Phi3VBackbone

    processor = StandInPhi3VProcessor()
    tok = processor.tokenizer
    cfg = Phi3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _standin_class()(cfg).eval()
    return Phi3VBackbone(model=model, processor=processor, family="phi3_v", name_or_path="phi3-v-stand-in",
                         image_token="<|image_1|>", max_length=512)
