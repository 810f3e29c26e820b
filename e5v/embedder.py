"""The E5-V embedder: prompt -> MLLM -> last layer's hidden state at the last token.

Batches are formed from inputs sorted by length (less padding), left padded with an attention mask
and position ids that start at 0 on each row's first real token, so an item's embedding does not
depend on its neighbours. Results come back in input order, float32.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from e5v.backbones.base import Backbone
from e5v.data.images import BadImageError, ImageLike, describe, load_image, open_image
from e5v.prompts import SENT, PromptSet, clean_sts_sentence

log = logging.getLogger(__name__)

ON_BAD_IMAGE = ("raise", "skip")


@dataclass
class _Item:
    index: int
    prompt: str  # full rendered prompt (image placeholder = backbone image token)
    ids: list[int]  # tokenized prompt (image placeholder = one token)
    length: int  # sequence length after image-token expansion
    image: Any = None  # PIL image / path, or None for text-only


@dataclass
class Skipped:
    index: int
    source: str
    reason: str


class Embedder:
    """Embed text, images and image+text with one MLLM and one prompt set.

    Args:
        backbone: a loaded :class:`~e5v.backbones.base.Backbone`.
        prompt: the :class:`~e5v.prompts.PromptSet` (wrapper + bodies).
        batch_size: default batch size.
        max_length: cap on the sequence length (image tokens included); defaults to the model's
            limit. Longer inputs get their USER TEXT shortened so the template stays intact.
        on_bad_image: ``raise`` (default) or ``skip`` (skipped inputs are listed in ``last_skipped``).
        progress: show a progress bar (``None``: only when there is more than one batch).
    """

    def __init__(
        self,
        backbone: Backbone,
        prompt: PromptSet,
        batch_size: int = 32,
        max_length: int | None = None,
        on_bad_image: str = "raise",
        progress: bool | None = None,
    ) -> None:
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.backbone = backbone
        self.prompt = prompt
        self.batch_size = int(batch_size)
        limits = [x for x in (max_length, backbone.max_length) if x]
        self.max_length = min(limits) if limits else None
        self.on_bad_image = on_bad_image
        self.progress = progress
        self.last_skipped: list[Skipped] = []
        self.last_truncated: list[int] = []

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        prompt: str | PromptSet | None = None,
        dtype: str = "float32",
        device: str | None = "auto",
        **kwargs: Any,
    ) -> Embedder:
        """Load a backbone by hub id, local directory, or the names ``tiny`` / ``llava_next_8b_shape``.

        ``prompt`` is a prompt config name (``configs/prompt/<name>.yaml``) or a PromptSet; by default
        the one that matches the backbone's family (Llama-3, Mistral or Phi-3 wrapper).
        Extra keyword arguments go to the Embedder (batch_size, max_length, on_bad_image, progress)
        or, if the Embedder does not take them, to the backbone loader (revision, max_tiles, ...).
        """
        from e5v.backbones import auto

        own = {k: kwargs.pop(k) for k in ("batch_size", "max_length", "on_bad_image", "progress") if k in kwargs}
        backbone = auto.load(name_or_path, dtype=dtype, device=device, **kwargs)
        if prompt is None:
            prompt = auto.default_prompt(backbone)
        if isinstance(prompt, str):
            from e5v.prompts import load_prompt

            prompt = load_prompt(prompt)
        return cls(backbone, prompt, **own)

    @classmethod
    def from_config(cls, cfg: Any) -> Embedder:
        """Build from a composed config with ``backbone`` (a ``_target_`` loader), ``prompt`` and ``embedder``."""
        from e5v.config import instantiate

        e = cfg.embedder
        prompt = PromptSet.from_config(cfg.prompt)  # validate the prompt before loading any weights
        backbone = instantiate(cfg.backbone, dtype=e.dtype, device=e.device)
        return cls(
            backbone,
            prompt,
            batch_size=e.batch_size,
            max_length=e.get("max_length"),
            on_bad_image=e.get("on_bad_image", "raise"),
            progress=e.get("progress"),
        )

    # ------------------------------------------------------------------ Hugging Face objects
    @property
    def model(self) -> torch.nn.Module:
        return self.backbone.model

    @property
    def processor(self) -> Any:
        return self.backbone.processor

    @property
    def tokenizer(self) -> Any:
        return self.backbone.tokenizer

    @property
    def dim(self) -> int:
        return self.backbone.hidden_size

    # ------------------------------------------------------------------ public API
    def encode_text(
        self,
        texts: Sequence[str],
        batch_size: int | None = None,
        normalize: bool = True,
        template: str = "text",
        category: str | None = None,
    ) -> np.ndarray:
        """Embed texts with the ``template`` body (``text``, ``sts``, ...). Returns (n, d) float32."""
        texts = _check_list(texts, "texts")
        for i, t in enumerate(texts):
            _check_text(t, i, self.prompt.image_token)
        if not texts:
            return self._empty()
        items = self._text_items(texts, template, category)
        return self._run(items, batch_size, normalize)

    def text_prompts(self, texts: Sequence[str], template: str = "text", category: str | None = None) -> list[str]:
        """The exact strings that ``encode_text`` feeds the model (after cleaning and any shortening)."""
        texts = _check_list(texts, "texts")
        for i, t in enumerate(texts):
            _check_text(t, i, self.prompt.image_token)
        return [it.prompt for it in self._text_items(texts, template, category)] if texts else []

    def encode_sts(self, sentences: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """STS protocol: sentences cleaned and embedded with the ``sts`` body, RAW (not normalised)."""
        return self.encode_text(sentences, batch_size=batch_size, normalize=False, template="sts")

    def encode_image(
        self,
        images: Sequence[ImageLike],
        batch_size: int | None = None,
        normalize: bool = True,
        template: str = "image",
        category: str | None = None,
    ) -> np.ndarray:
        """Embed PIL images or image paths with the ``template`` body. Returns (n_kept, d) float32."""
        images = _check_list(images, "images")
        for i, im in enumerate(images):
            if im is None:
                raise TypeError(f"images[{i}] is None; expected a PIL image or a file path")
        body_prompt = self.prompt.render(template, category=category)
        items = self._image_items([(im, None) for im in images], template, category, fixed_prompt=body_prompt)
        return self._run(items, batch_size, normalize)

    def encode_interleaved(
        self,
        pairs: Sequence[tuple[ImageLike, str]],
        template: str = "cirr_query",
        batch_size: int | None = None,
        normalize: bool = True,
        category: str | None = None,
    ) -> np.ndarray:
        """Embed (image, text) pairs in one prompt each (e.g. CIRR/FashionIQ queries)."""
        pairs = _check_list(pairs, "pairs")
        for i, p in enumerate(pairs):
            if p is None:
                raise TypeError(f"pairs[{i}] is None; expected an (image, text) pair")
            if not isinstance(p, (tuple, list)) or len(p) != 2:
                raise TypeError(f"pairs[{i}] must be an (image, text) pair, got {type(p).__name__}")
            if p[0] is None:
                raise TypeError(f"pairs[{i}][0] (the image) is None")
            _check_text(p[1], i, self.prompt.image_token, what=f"pairs[{i}][1]")
        items = self._image_items(list(pairs), template, category)
        return self._run(items, batch_size, normalize)

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.dim), dtype=np.float32)

    # ------------------------------------------------------------------ preparation
    def _fit(self, text: str, prefix: str, suffix: str, length_of: Any) -> tuple[str, bool]:
        """Shorten ``text`` (never prefix/suffix) until ``length_of(prompt)`` fits ``max_length``."""
        if self.max_length is None:
            return text, False
        full = prefix + text + suffix
        n = length_of(full)
        if n <= self.max_length:
            return text, False
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = len(ids) - (n - self.max_length)
        while keep > 0:
            cut = self.tokenizer.decode(ids[:keep], skip_special_tokens=False)
            n = length_of(prefix + cut + suffix)
            if n <= self.max_length:
                return cut, True
            keep -= max(1, n - self.max_length)
        raise ValueError(
            f"the prompt template alone ({length_of(prefix + suffix)} tokens) exceeds max_length="
            f"{self.max_length}; raise max_length or use a shorter template"
        )

    def _text_items(self, texts: list[str], template: str, category: str | None) -> list[_Item]:
        prefix, suffix = self.prompt.split(template, category)
        if SENT not in self.prompt.body(template):
            raise ValueError(f"template '{template}' has no {SENT} placeholder: it does not take text")
        if template == "sts":
            texts = [clean_sts_sentence(t) for t in texts]
        prompts = [prefix + t + suffix for t in texts]
        all_ids = self.tokenizer(prompts, add_special_tokens=True)["input_ids"]
        truncated: list[int] = []
        items = []
        for i, (t, ids) in enumerate(zip(texts, all_ids)):
            if self.max_length is not None and len(ids) > self.max_length:
                t2, _ = self._fit(t, prefix, suffix, lambda s: len(self.tokenizer(s)["input_ids"]))
                prompts[i] = prefix + t2 + suffix
                ids = self.tokenizer(prompts[i])["input_ids"]
                truncated.append(i)
            items.append(_Item(index=i, prompt=prompts[i], ids=ids, length=len(ids)))
        self._report_truncation(truncated)
        return items

    def _image_tokens(self, image: Any) -> int:
        """Number of tokens one image expands to (from its size only: no decoding)."""
        w, h = image.size
        proc = self.processor
        try:
            return int(proc._get_num_multimodal_tokens(image_sizes=[(h, w)])["num_image_tokens"][0])
        except Exception:  # processors without this helper: sort by text length only
            return 1

    def _image_items(
        self,
        pairs: list[tuple[Any, str | None]],
        template: str,
        category: str | None,
        fixed_prompt: str | None = None,
    ) -> list[_Item]:
        self.last_skipped = []
        prefix, suffix = self.prompt.split(template, category)
        if SENT in self.prompt.body(template) and fixed_prompt is not None:
            raise ValueError(f"template '{template}' needs a text: use encode_interleaved")
        if SENT not in self.prompt.body(template) and fixed_prompt is None:
            raise ValueError(f"template '{template}' takes no text: use encode_image")
        items: list[_Item] = []
        truncated: list[int] = []
        tok = self.tokenizer
        for i, (image, text) in enumerate(pairs):
            try:
                header = open_image(image, i)
                n_img = self._image_tokens(header)
            except BadImageError as e:
                self._bad(i, e)
                continue
            if fixed_prompt is not None:
                prompt = fixed_prompt
            else:
                def length_of(s: str) -> int:
                    return len(tok(s)["input_ids"]) - 1 + n_img

                text2, cut = self._fit(text, prefix, suffix, length_of)
                if cut:
                    truncated.append(i)
                prompt = prefix + text2 + suffix
            ids = tok(prompt)["input_ids"]
            items.append(_Item(index=i, prompt=prompt, ids=ids, length=len(ids) - 1 + n_img, image=image))
        self._report_truncation(truncated)
        return items

    def _bad(self, index: int, err: BadImageError) -> None:
        if self.on_bad_image == "raise":
            raise err
        self.last_skipped.append(Skipped(index, err.source, err.reason))

    def _report_truncation(self, truncated: list[int]) -> None:
        self.last_truncated = truncated
        if truncated:
            log.warning(
                "%d input(s) exceeded max_length=%d and had their text shortened (template kept): indices %s%s",
                len(truncated),
                self.max_length,
                truncated[:10],
                " ..." if len(truncated) > 10 else "",
            )

    # ------------------------------------------------------------------ batching and forward
    def _batches(self, items: list[_Item], batch_size: int) -> Iterator[list[_Item]]:
        order = sorted(items, key=lambda it: (-it.length, it.index))
        for start in range(0, len(order), batch_size):
            yield order[start : start + batch_size]

    def _collate(self, batch: list[_Item]) -> tuple[dict[str, torch.Tensor], list[_Item]]:
        """Tensors for one batch; images are decoded here (bad ones skipped or raised)."""
        if batch[0].image is None:
            enc = self.tokenizer.pad({"input_ids": [it.ids for it in batch]}, padding=True, return_tensors="pt")
            kept = batch
        else:
            kept, images = [], []
            for it in batch:
                try:
                    images.append(load_image(it.image, it.index))
                    kept.append(it)
                except BadImageError as e:
                    self._bad(it.index, e)
            if not kept:
                return {}, []
            enc = self.processor(
                text=[it.prompt for it in kept], images=images, padding=True, return_tensors="pt"
            )
        enc = dict(enc)
        mask = enc["attention_mask"]
        enc["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        device, dtype = self.backbone.device, self.backbone.dtype
        out = {}
        for k, v in enc.items():
            if not isinstance(v, torch.Tensor):
                continue
            v = v.to(device)
            if v.is_floating_point():
                v = v.to(dtype)
            out[k] = v
        return out, kept

    @torch.inference_mode()
    def _run(self, items: list[_Item], batch_size: int | None, normalize: bool) -> np.ndarray:
        bs = int(batch_size or self.batch_size)
        n_batches = (len(items) + bs - 1) // bs
        show = self.progress if self.progress is not None else n_batches > 1
        results: dict[int, np.ndarray] = {}
        batches = self._batches(items, bs)
        if show and not os.environ.get("E5V_NO_PROGRESS"):
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=n_batches, desc="encode", unit="batch")
        self.backbone.model.eval()
        for batch in batches:
            tensors, kept = self._collate(batch)
            if not kept:
                continue
            states = self.backbone.last_token_states(tensors).float()  # (B, d)
            if normalize:
                states = F.normalize(states, dim=-1)
            arr = states.cpu().numpy()
            for row, it in zip(arr, kept):
                results[it.index] = row
        if self.last_skipped:
            log.warning(
                "skipped %d bad image(s): %s",
                len(self.last_skipped),
                ", ".join(f"#{s.index} {s.source} ({s.reason})" for s in self.last_skipped[:5]),
            )
        if not results:
            return self._empty()
        return np.stack([results[i] for i in sorted(results)]).astype(np.float32, copy=False)


def _check_list(values: Any, name: str) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        if isinstance(values, (str, bytes)):
            raise TypeError(f"{name} must be a list, got a single {type(values).__name__}; wrap it: [{name[:-1]}]")
        try:
            return list(values)
        except TypeError:
            raise TypeError(f"{name} must be a list, got {type(values).__name__}") from None
    return list(values)


def _check_text(text: Any, index: int, image_token: str, what: str | None = None) -> None:
    what = what or f"texts[{index}]"
    if text is None:
        raise TypeError(f"{what} is None; expected a string")
    if not isinstance(text, str):
        raise TypeError(f"{what} is a {type(text).__name__}; expected a string")
    if image_token in text or "<image>" in text:
        raise ValueError(f"{what} contains the image token {image_token!r}; remove it from the text")


__all__ = ["Embedder", "Skipped", "describe"]
