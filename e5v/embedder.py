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
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from e5v import packing as packing_lib
from e5v.backbones.base import Backbone, Inputs
from e5v.console import expected_long_inputs
from e5v.data.images import BadImageError, ImageLike, describe, load_image, open_image
from e5v.prompts import SENT, PromptSet, clean_sts_sentence

log = logging.getLogger(__name__)

ON_BAD_IMAGE = ("raise", "skip")
EMBEDDER_OPTIONS = (
    "batch_size", "max_length", "on_bad_image", "progress", "max_batch_tokens", "num_workers", "pin_memory",
    "packing", "pack_tokens", "compile",
)


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


@dataclass
class _Prepared:
    """One batch ready for the model: CPU tensors, the batch positions kept, the bad images met."""

    tensors: dict[str, torch.Tensor]
    kept: list[int]  # positions in the batch (not item indices)
    bad: list[Skipped] = field(default_factory=list)


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
    ) -> None:
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1 or None, got {max_batch_tokens}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
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
        max_batch_tokens, num_workers, pin_memory, packing, pack_tokens, compile) or, if the Embedder does not take them, to the
        backbone loader (revision, max_tiles, attn_implementation, seed, ...).

        ``adapter``: a LoRA adapter saved by e5v training (its directory, a checkpoint step directory,
        or a run directory: the newest complete step), folded into the weights as evaluation does.
        Without ``name_or_path`` the base recorded in its ``e5v_adapter.json`` loads; a base you name
        must be that one (model, revision, seed ...) or :class:`e5v.lora.AdapterBaseError` is raised
        before any weights load, unless ``allow_other_base=True`` (e.g. a local copy of the same weights).
        """
        from e5v.backbones import auto

        own = {k: kwargs.pop(k) for k in EMBEDDER_OPTIONS if k in kwargs}
        backbone = adapter_dir = label = None
        if adapter is not None:
            from e5v import lora

            adapter_dir = lora.resolve_adapter(adapter)
            fix = "load the base it was trained on, or pass allow_other_base=True if this base holds the same weights"
            if name_or_path is None:
                recorded = lora.adapter_base(adapter_dir)
                if recorded is None:
                    raise lora.AdapterBaseError(
                        f"adapter {adapter_dir} has no {lora.ADAPTER_META} recording its base: pass the base as "
                        "name_or_path (and allow_other_base=True, since it cannot be checked)"
                    )
                base = {**recorded, **kwargs}
                lora.check_adapter_base(adapter_dir, base, allow_other_base, fix=fix)
                from omegaconf import OmegaConf

                from e5v.config import instantiate

                backbone = instantiate(OmegaConf.create(base), dtype=dtype, device=device)
            else:
                base = {"name_or_path": name_or_path, **kwargs}
                lora.check_adapter_base(adapter_dir, base, allow_other_base, fix=fix)
            label = lora.base_label(base)
        elif name_or_path is None:
            raise TypeError("Embedder.from_pretrained() needs name_or_path (or adapter=...)")
        if backbone is None:
            backbone = auto.load(name_or_path, dtype=dtype, device=device, **kwargs)
        if prompt is None:  # the one the checkpoint was trained with (adapter or e5v-merge record), else the family's
            prompt = _recorded_prompt(adapter_dir, name_or_path) or auto.default_prompt(backbone)
        if isinstance(prompt, str):
            from e5v.prompts import load_prompt

            prompt = load_prompt(prompt)
        embedder = cls(backbone, prompt, **own)
        if adapter_dir is not None:
            from e5v.lora import load_adapter_into_embedder

            load_adapter_into_embedder(embedder, adapter_dir, base=label)
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
        return self.backbone.hidden_size

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
        texts = _check_list(texts, "texts")
        for i, t in enumerate(texts):
            _check_text(t, i, self.prompt.image_token)
        if not texts:
            return self._empty()
        items = self._text_items(texts, template, category)
        return self._run(items, batch_size, normalize, "text")

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
        self.last_skipped = []  # per call
        self.backbone.require("image")
        images = _check_list(images, "images")
        for i, im in enumerate(images):
            if im is None:
                raise TypeError(f"images[{i}] is None; expected a PIL image or a file path")
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
        return self._run(items, batch_size, normalize, "interleaved")

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

    # whole prompts are tokenized, then too long texts are shortened here (template kept) with our own warning:
    # transformers' "will result in indexing errors" for those calls is noise (e5v.console)
    @expected_long_inputs()
    def _text_items(self, texts: list[str], template: str, category: str | None) -> list[_Item]:
        prefix, suffix = self.prompt.split(template, category)
        if SENT not in self.prompt.body(template):
            raise ValueError(f"template '{template}' has no {SENT} placeholder: it does not take text")
        if template == "sts":
            texts = [clean_sts_sentence(t) for t in texts]
        prompts = [prefix + t + suffix for t in texts]
        all_ids = self.inputs.tokenize(prompts)
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
        counts = self.inputs.image_tokens([(h, w)])
        return counts[0] if counts else 1  # processors without the helper: sort by text length only

    @expected_long_inputs()
    def _image_items(
        self,
        pairs: list[tuple[Any, str | None]],
        template: str,
        category: str | None,
        fixed_prompt: str | None = None,
    ) -> list[_Item]:
        self.last_skipped = []
        if self.prompt.image_token != self.backbone.image_token:  # the processor would fail on every image, at length
            from e5v.prompts import PromptConfigError

            raise PromptConfigError(
                f"prompt '{self.prompt.name}' writes an image as {self.prompt.image_token!r} but {self.backbone.family} "
                f"({self.backbone.name_or_path}) expects {self.backbone.image_token!r}: use its prompt "
                f"({self.backbone.default_prompt()})"
            )
        prefix, suffix = self.prompt.split(template, category)
        if SENT in self.prompt.body(template) and fixed_prompt is not None:
            raise ValueError(f"template '{template}' needs a text: use encode_interleaved")
        if SENT not in self.prompt.body(template) and fixed_prompt is None:
            raise ValueError(f"template '{template}' takes no text: use encode_image")
        tok = self.tokenizer
        # image headers only (size -> token count); bad files are raised or skipped here
        ok: list[tuple[int, Any, str | None, int]] = []
        for i, (image, text) in enumerate(pairs):
            try:
                header = open_image(image, i)
                n_img = self._image_tokens(header)
            except BadImageError as e:
                self._bad(i, e)
                continue
            ok.append((i, image, text, n_img))
        if fixed_prompt is not None:
            prompts = [fixed_prompt] * len(ok)
            fixed_ids = tok(fixed_prompt)["input_ids"] if ok else []
            all_ids = [fixed_ids] * len(ok)  # one tokenization for the whole request
        else:
            prompts = [prefix + text + suffix for _, _, text, _ in ok]
            all_ids = tok(prompts)["input_ids"] if prompts else []  # one batched call
        items: list[_Item] = []
        truncated: list[int] = []
        for k, (i, image, text, n_img) in enumerate(ok):
            prompt, ids = prompts[k], all_ids[k]
            if fixed_prompt is None and self.max_length is not None and len(ids) - 1 + n_img > self.max_length:

                def length_of(s: str, n_img: int = n_img) -> int:
                    return len(tok(s)["input_ids"]) - 1 + n_img

                text2, cut = self._fit(str(text), prefix, suffix, length_of)
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
        """Longest first; a batch closes at ``batch_size`` rows or when its padded size (rows x its first,
        longest, row) would pass ``max_batch_tokens`` (a row longer than the budget goes alone)."""
        order = sorted(items, key=lambda it: (-it.length, it.index))
        budget = self.max_batch_tokens
        batch: list[_Item] = []
        for it in order:
            over = budget is not None and (len(batch) + 1) * batch[0].length > budget if batch else False
            if batch and (len(batch) >= batch_size or over):
                yield batch
                batch = []
            batch.append(it)
        if batch:
            yield batch

    def _preparer(self, pack: float | None = None) -> _Preparer:
        width = self.pack_tokens or (self.backbone.default_pack_tokens() if pack is not None else None)
        return _Preparer(self.inputs, pack, width)

    def _kept(self, batch: list[_Item], prep: _Prepared) -> list[_Item]:
        for bad in prep.bad:
            self._bad(bad.index, BadImageError(bad.source, bad.reason))
        return [batch[k] for k in prep.kept]

    def _pin(self) -> bool:
        if self.pin_memory is not None:
            return bool(self.pin_memory) and torch.cuda.is_available()
        return self.backbone.device.type == "cuda"

    def _to_device(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device, dtype = self.backbone.device, self.backbone.dtype
        non_blocking = device.type == "cuda" and self._pin()
        out = {}
        for k, v in tensors.items():
            if non_blocking and not v.is_pinned():
                v = v.pin_memory()
            v = v.to(device, non_blocking=non_blocking)
            if v.is_floating_point():
                v = v.to(dtype)
            out[k] = v
        return out

    def _prepared_batches(
        self, batches: list[list[_Item]], pack: float | None = None
    ) -> Iterator[tuple[list[_Item], _Prepared]]:
        """(batch, prepared) pairs in order; image batches go through DataLoader workers when asked."""
        prep = self._preparer(pack)
        if self.num_workers == 0 or batches[0][0].image is None:
            for b in batches:
                yield b, prep(b)
            return
        from torch.utils.data import DataLoader

        loader = DataLoader(
            _BatchList(batches, prep),
            batch_size=None,  # each dataset element is already a batch
            num_workers=min(self.num_workers, len(batches)),
            pin_memory=self._pin(),
            collate_fn=_identity,
            persistent_workers=False,
        )
        yield from zip(batches, loader)

    @torch.inference_mode()
    def _run(self, items: list[_Item], batch_size: int | None, normalize: bool, kind: str = "text") -> np.ndarray:
        bs = int(batch_size or self.batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {bs}")
        batches = list(self._batches(items, bs))
        pack = self.backbone.pack_threshold(kind, self.packing) if batches else None
        self.last_packed = False
        show = self.progress if self.progress is not None else len(batches) > 1
        results: dict[int, np.ndarray] = {}
        pending: list[tuple[torch.Tensor, list[_Item]]] = []
        stream: Any = self._prepared_batches(batches, pack) if batches else iter(())
        if show and not os.environ.get("E5V_NO_PROGRESS"):
            from tqdm.auto import tqdm

            stream = tqdm(stream, total=len(batches), desc="encode", unit="batch")
        self.backbone.model.eval()
        for batch, prepared in stream:
            kept = self._kept(batch, prepared)
            if not kept:
                continue
            self.last_packed |= packing_lib.is_packed(prepared.tensors)
            states = self.backbone.last_token_states(self._to_device(prepared.tensors)).float()  # (B, d)
            if normalize:
                states = F.normalize(states, dim=-1)
            pending.append((states, kept))  # copied to the host in groups: no device sync per batch
            if sum(len(k) for _, k in pending) >= _FLUSH_ROWS:
                _flush(pending, results)
        _flush(pending, results)
        if self.last_skipped:
            log.warning(
                "skipped %d bad image(s): %s",
                len(self.last_skipped),
                ", ".join(f"#{s.index} {s.source} ({s.reason})" for s in self.last_skipped[:5]),
            )
        if not results:
            return self._empty()
        return np.stack([results[i] for i in sorted(results)]).astype(np.float32, copy=False)


_FLUSH_ROWS = 8192  # embeddings kept on the device before one copy to the host (8192 x 4096 fp32 = 128 MiB)


def _flush(pending: list[tuple[torch.Tensor, list[_Item]]], results: dict[int, np.ndarray]) -> None:
    if not pending:
        return
    arr = torch.cat([states for states, _ in pending]).cpu().numpy()
    rows = [it for _, kept in pending for it in kept]
    for row, it in zip(arr, rows):
        results[it.index] = row
    pending.clear()


class _Preparer:
    """Turns a batch of items into CPU tensors through the backbone's :class:`~e5v.backbones.base.Inputs`
    (text: the ids tokenized once up front, left padded or packed; images: decoded here, bad files reported,
    then the family's processor call, packed when asked). ``pack``: None = padded; a number = packed when that
    removes at least this share of the batch's tokens. Picklable (holds only the Inputs and the packing
    settings), so it also runs in DataLoader workers."""

    def __init__(self, inputs: Inputs, pack: float | None = None, pack_tokens: int | None = None) -> None:
        self.inputs = inputs
        self.pack = pack
        self.pack_tokens = pack_tokens

    def __call__(self, batch: list[_Item]) -> _Prepared:
        if batch[0].image is None:
            ids = [it.ids for it in batch]
            if self.pack is None:
                tensors = self.inputs.text(ids)
            else:
                tensors = self.inputs.pack_text(ids, self.pack_tokens, self.pack)
            return _Prepared(tensors, list(range(len(batch))))
        kept: list[int] = []
        images: list[Any] = []
        bad: list[Skipped] = []
        for k, it in enumerate(batch):
            try:
                images.append(load_image(it.image, it.index))
                kept.append(k)
            except BadImageError as e:
                bad.append(Skipped(it.index, e.source, e.reason))
        if not kept:
            return _Prepared({}, [], bad)
        rows = [(batch[k].ids, batch[k].prompt) for k in kept]
        tensors = self.inputs.images(rows, images)
        if self.pack is not None:
            tensors = self.inputs.pack(tensors, self.pack_tokens, self.pack)
        return _Prepared(tensors, kept, bad)


class _BatchList(torch.utils.data.Dataset):
    """Dataset view of precomputed batches: element i = batch i prepared (in a worker process)."""

    def __init__(self, batches: list[list[_Item]], prepare: _Preparer) -> None:
        self.batches = batches
        self.prepare = prepare

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> _Prepared:
        return self.prepare(self.batches[i])


def _identity(x: Any) -> Any:
    return x


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


def _recorded_prompt(adapter_dir: Path | None, name_or_path: Any) -> PromptSet | None:
    """The prompt recorded with a checkpoint: an adapter's ``e5v_adapter.json``, or the ``e5v_merged.json`` that
    e5v-merge writes into a merged folder; None without a record."""
    import json

    record = None
    if adapter_dir is not None:
        record = Path(adapter_dir) / "e5v_adapter.json"
    elif name_or_path is not None and Path(str(name_or_path)).is_dir():
        record = Path(str(name_or_path)) / "e5v_merged.json"
    if record is None or not record.is_file():
        return None
    try:
        trained = json.loads(record.read_text()).get("prompt")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(trained, dict) or not trained.get("wrapper"):
        return None
    from omegaconf import OmegaConf

    return PromptSet.from_config(OmegaConf.create(trained))
