"""The E5-V embedder: prompt -> MLLM -> last layer's hidden state at the last token.

Batches are formed from inputs sorted by length (less padding), optionally capped by a token budget,
left padded with an attention mask and position ids that start at 0 on each row's first real token,
so an item's embedding does not depend on its neighbours. Results come back in input order, float32.
Everything model-specific (tokenizing, the processor calls for images, padding and positions, the
forward) is the backbone's contract (:mod:`e5v.backbones.base`), the same the trainer uses.

Where the time goes, and what is done about it (measured figures: docs/performance.md):
- every prompt is tokenized once, in one batched call; text batches are padded straight into tensors;
- LLaVA-NeXT image batches: the image placeholder is expanded to its token count from the image size
  (no re-tokenization of a prompt holding ~2,900 image tokens); only the image processor runs per batch
  (:class:`e5v.backbones.llava_next.LlavaNextInputs`);
- images of any anyres tile count share a batch (the model drops padded tiles before the vision tower);
- image decoding and preprocessing can run in DataLoader worker processes (``num_workers``), with
  pinned host memory and non-blocking copies on CUDA, overlapping the forward pass;
- the forward stops at the final norm (no vocabulary projection, no per-layer hidden states);
- packing (``packing``, ``pack_tokens``): each batch's rows packed into sequences without padding, each row
  attending only to itself (:mod:`e5v.packing`), where the backbone packs that input kind exactly; the
  embeddings equal the padded ones (tests/test_packing.py).

``dim`` (Matryoshka): the embeddings are the first ``dim`` coordinates of the last-token state, re-normalised
when ``normalize`` is on (``Embedder.dim`` is the output width).

The class is the public face; the work lives beside it: :mod:`e5v.embed_items` (inputs checked, prompts
rendered, tokenized once, text shortened to ``max_length``), :mod:`e5v.embed_run` (length-sorted batches,
preparing them, the forward, pooling) and :mod:`e5v.embed_load` (``from_pretrained``'s backbone, adapter and
prompt). Tests: ``.venv/bin/python -m pytest -q tests/test_embedder.py tests/test_embedder_perf.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from e5v import packing as packing_lib
from e5v.backbones.base import Backbone, Inputs
from e5v.data.images import BadImageError, ImageLike, describe
from e5v.embed_items import (
    ItemBuilder,
    PromptItem,
    Skipped,
    check_images,
    check_pairs,
    check_texts,
    report_skipped,
    report_truncation,
)
from e5v.embed_run import EncodeRun, Preparer
from e5v.errors import ConfigError
from e5v.matryoshka import check_dims
from e5v.prompts import PromptSet

ON_BAD_IMAGE = ("raise", "skip")
EMBEDDER_OPTIONS = (
    "batch_size", "max_length", "on_bad_image", "progress", "max_batch_tokens", "num_workers", "pin_memory",
    "packing", "pack_tokens", "compile", "dim",
)


class Embedder:
    """Embed text, images and image+text with one MLLM and one prompt set.

    Args:
        backbone: a loaded :class:`~e5v.backbones.base.Backbone`.
        prompt: the :class:`~e5v.prompts.PromptSet` (wrapper + bodies).
        batch_size: default batch size.
        max_length: cap on the sequence length (image tokens included); defaults to the model's
            limit. Longer inputs get their USER TEXT shortened so the template stays intact.
        on_bad_image: ``raise`` (default) or ``skip`` (the latest encode call's skipped inputs are in ``last_skipped``).
        progress: show a progress bar (``None``: only when there is more than one batch).
        max_batch_tokens: cap on padded tokens per batch (rows x longest row, image tokens included);
            long inputs then go in smaller batches, short ones in full ``batch_size`` batches. ``None``:
            no cap. Bounds activation memory for images (up to ~2,900 tokens each on LLaVA-NeXT-8B).
        num_workers: DataLoader worker processes that decode and preprocess image batches while the
            model runs (0: in this process). Outputs are identical either way.
        pin_memory: page-locked host tensors and non-blocking copies (``None``: on CUDA devices).
        packing: ``true``: each batch (the same batches as padded) packed into rows without padding, each
            row attending only to itself, wherever the backbone packs the input kind exactly (a warning names
            what stays padded); same embeddings (tested). ``auto`` (default): on CUDA, a batch is packed when
            that removes at least 10% of its tokens (length-sorted batches seldom hold that much padding);
            padded on CPU. ``false``: always padded.
        pack_tokens: tokens per packed row (None: the backbone's default,
            :meth:`~e5v.backbones.base.Backbone.default_pack_tokens`: the widest pack whose attention adds at
            most 10% to a token's FLOPs; LLaVA-NeXT-8B 2,662; a longer row gets a pack of its own).
        compile: ``torch.compile`` the decoder (:meth:`~e5v.backbones.base.Backbone.compile_decoder`): the
            first call of each input kind compiles (11-37 s on the CPU tiny model), later ones ran 1.08-1.14x
            faster there. Off by default.
        dim: Matryoshka width: the first ``dim`` coordinates of the last-token state, re-normalised when
            ``normalize`` is on (None: the full hidden size). Wider than the hidden size: ConfigError.
    """

    def __init__(
        self,
        backbone: Backbone,
        prompt: PromptSet,
        batch_size: int = 32,
        max_length: int | None = None,
        on_bad_image: str = "raise",
        progress: bool | None = None,
        max_batch_tokens: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        packing: str | bool = "auto",
        pack_tokens: int | None = None,
        compile: bool = False,
        dim: int | None = None,
    ) -> None:
        _check_options(on_bad_image, batch_size, max_batch_tokens, num_workers)
        self.prefix_dim = _check_dim(dim, backbone)  # None: the full hidden size
        self.backbone = backbone
        self.prompt = prompt
        self.batch_size = int(batch_size)
        limits = [x for x in (max_length, backbone.max_length) if x]
        self.max_length = min(limits) if limits else None
        self.on_bad_image = on_bad_image
        self.progress = progress
        self.max_batch_tokens = int(max_batch_tokens) if max_batch_tokens else None
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.packing = packing_lib.packing_mode(packing)
        self.pack_tokens = packing_lib.check_pack_tokens(pack_tokens)
        self.last_packed = False  # whether the latest encode call ran any packed batch
        self.compile = bool(compile)
        if self.compile:
            backbone.compile_decoder()
        self.last_skipped: list[Skipped] = []
        self.last_truncated: list[int] = []

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | None = None,
        prompt: str | PromptSet | None = None,
        dtype: str = "auto",
        device: str | None = "auto",
        adapter: str | os.PathLike | None = None,
        allow_other_base: bool = False,
        **kwargs: Any,
    ) -> Embedder:
        """Load a backbone by hub id, local directory, or a builtin name: ``tiny`` (random),
        ``tiny_world`` (pretrained on the mini world, shipped) or ``llava_next_8b_shape``.

        ``prompt`` is a prompt config name (``configs/prompt/<name>.yaml``) or a PromptSet; by default
        the one that matches the backbone's family (Llama-3, Mistral or Phi-3 wrapper). ``dtype``: ``auto``
        (bfloat16 on CUDA, float32 on the CPU), float32, bfloat16 or float16.
        Extra keyword arguments go to the Embedder (batch_size, max_length, on_bad_image, progress,
        max_batch_tokens, num_workers, pin_memory, packing, pack_tokens, compile, dim) or, if the Embedder does not
        take them, to the backbone loader (revision, max_tiles, attn_implementation, seed, ...).

        ``adapter``: a LoRA adapter saved by e5v training (its directory, a checkpoint step directory,
        or a run directory: the newest complete step), folded into the weights as evaluation does.
        Without ``name_or_path`` the base recorded in its ``e5v_adapter.json`` loads; a base you name
        must be that one (model, revision, seed ...) or :class:`e5v.lora.AdapterBaseError` is raised
        before any weights load, unless ``allow_other_base=True`` (e.g. a local copy of the same weights).
        """
        from e5v import embed_load

        own = {k: kwargs.pop(k) for k in EMBEDDER_OPTIONS if k in kwargs}
        loaded = embed_load.load(name_or_path, prompt, dtype, device, adapter, allow_other_base, kwargs)
        embedder = cls(loaded.backbone, loaded.prompt, **own)
        if loaded.adapter_dir is not None:
            from e5v.lora import load_adapter_into_embedder

            load_adapter_into_embedder(embedder, loaded.adapter_dir, base=loaded.label)
        return embedder

    @classmethod
    def from_config(cls, cfg: Any) -> Embedder:
        """Build from a composed config with ``backbone`` (a ``_target_`` loader), ``prompt`` and ``embedder``."""
        from e5v.config import instantiate

        e = cfg.embedder
        unknown = sorted(set(e) - set(EMBEDDER_OPTIONS) - {"dtype", "device"})
        if unknown:
            raise ValueError(
                f"unknown embedder option(s) {', '.join('embedder.' + k for k in unknown)}; the options are dtype, "
                f"device, {', '.join(EMBEDDER_OPTIONS)} (configs/embedder/default.yaml)"
            )
        prompt = PromptSet.from_config(cfg.prompt)  # validate the prompt before loading any weights
        backbone = instantiate(cfg.backbone, dtype=e.dtype, device=e.device)
        return cls(backbone, prompt, **{k: e[k] for k in EMBEDDER_OPTIONS if k in e})

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
        """The embeddings' width: ``dim`` when set (Matryoshka prefix), else the backbone's hidden size."""
        return self.prefix_dim or self.backbone.hidden_size

    @property
    def inputs(self) -> Inputs:
        """The backbone's input builder (tokenizing, padding, position ids, processor calls)."""
        cached = self.__dict__.get("_inputs")
        if cached is None or cached.processor is not self.backbone.processor:
            cached = self.__dict__["_inputs"] = self.backbone.inputs()
        return cached

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
        self.last_skipped = []  # per call: a text request skips nothing (no stale warning from an image call)
        texts = check_texts(texts, self.prompt.image_token)
        if not texts:
            return self._empty()
        items = self._text_items(texts, template, category)
        return self._run(items, batch_size, normalize, "text")

    def text_prompts(self, texts: Sequence[str], template: str = "text", category: str | None = None) -> list[str]:
        """The exact strings that ``encode_text`` feeds the model (after cleaning and any shortening)."""
        texts = check_texts(texts, self.prompt.image_token)
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
        self.last_skipped = []  # per call
        self.backbone.require("image")
        images = check_images(images)
        body_prompt = self.prompt.render(template, category=category)
        items = self._image_items([(im, None) for im in images], template, category, fixed_prompt=body_prompt)
        return self._run(items, batch_size, normalize, "image")

    def encode_interleaved(
        self,
        pairs: Sequence[tuple[ImageLike, str]],
        template: str = "cirr_query",
        batch_size: int | None = None,
        normalize: bool = True,
        category: str | None = None,
    ) -> np.ndarray:
        """Embed (image, text) pairs in one prompt each (e.g. CIRR/FashionIQ queries)."""
        self.last_skipped = []  # per call
        self.backbone.require("interleaved")
        pairs = check_pairs(pairs, self.prompt.image_token)
        items = self._image_items(list(pairs), template, category)
        return self._run(items, batch_size, normalize, "interleaved")

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.dim), dtype=np.float32)

    # ------------------------------------------------------------------ items (e5v.embed_items)
    def _builder(self) -> ItemBuilder:
        return ItemBuilder(self.backbone, self.prompt, self.inputs, self.max_length)

    def _text_items(self, texts: list[str], template: str, category: str | None) -> list[PromptItem]:
        items, truncated = self._builder().text_items(texts, template, category)
        self._report_truncation(truncated)
        return items

    def _image_tokens(self, image: Any) -> int:
        """Number of tokens one image expands to (from its size only: no decoding)."""
        return self._builder().image_tokens(image)

    def _image_items(
        self, pairs: list[tuple[Any, str | None]], template: str, category: str | None, fixed_prompt: str | None = None
    ) -> list[PromptItem]:
        self.last_skipped = []
        items, truncated = self._builder().image_items(pairs, template, category, self._bad, fixed_prompt)
        self._report_truncation(truncated)
        return items

    def _bad(self, index: int, err: BadImageError) -> None:
        if self.on_bad_image == "raise":
            raise err
        self.last_skipped.append(Skipped(index, err.source, err.reason))

    def _report_truncation(self, truncated: list[int]) -> None:
        self.last_truncated = truncated
        report_truncation(truncated, self.max_length)

    # ------------------------------------------------------------------ batching and forward (e5v.embed_run)
    def _runner(self) -> EncodeRun:
        return EncodeRun(
            self.backbone, self.inputs, on_bad=self._bad, max_batch_tokens=self.max_batch_tokens,
            packing=self.packing, pack_tokens=self.pack_tokens, num_workers=self.num_workers,
            pin_memory=self.pin_memory, progress=self.progress,
        )

    def _batches(self, items: list[PromptItem], batch_size: int) -> Iterator[list[PromptItem]]:
        return self._runner().batches(items, batch_size)

    def _preparer(self, pack: float | None = None) -> Preparer:
        return self._runner().preparer(pack)

    def _run(self, items: list[PromptItem], batch_size: int | None, normalize: bool, kind: str = "text") -> np.ndarray:
        run = self._runner()
        try:
            out = run.embeddings(items, int(batch_size or self.batch_size), normalize, kind, self.prefix_dim, self.dim)
        finally:
            if run.packed is not None:  # None: the run did not start (a bad batch_size)
                self.last_packed = run.packed
        report_skipped(self.last_skipped)
        return out


def _check_options(on_bad_image: str, batch_size: int, max_batch_tokens: int | None, num_workers: int) -> None:
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1 or None, got {max_batch_tokens}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")


def _check_dim(dim: Any, backbone: Backbone) -> int | None:
    """``dim`` checked against the hidden size: None, or a whole number in 1..hidden_size."""
    if dim is None:
        return None
    (dim,) = check_dims([dim], None, key="embedder dim")  # a whole number >= 1
    hidden = backbone.hidden_size
    if dim > hidden:
        raise ConfigError(
            f"embedder dim={dim} is wider than the hidden size {hidden} of {backbone.name_or_path}: "
            f"choose dim <= {hidden}, or none (null) for the full width"
        )
    return dim


__all__ = ["Embedder", "Skipped", "describe"]
