"""The Embedder's items: inputs checked, rendered into prompts, tokenized once, shortened to ``max_length``.

An item is one input ready for batching (:class:`PromptItem`): its full prompt, its token ids and its length
after image-token expansion (from the image's size alone: no decoding here). Texts longer than
``max_length`` lose USER TEXT only, never the template. Bad image files are handed to the caller's
``on_bad`` (raise or skip). Used by :class:`e5v.embedder.Embedder`; nothing here runs the model.
Tests: tests/test_embedder.py (``.venv/bin/python -m pytest -q tests/test_embedder.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from e5v.backbones.base import Backbone, Inputs
from e5v.console import expected_long_inputs
from e5v.data.images import BadImageError, open_image
from e5v.prompts import SENT, PromptSet, clean_sts_sentence

# the Embedder's messages keep its logger name: callers filter and capture "e5v.embedder" (e5v-encode, tests)
log = logging.getLogger("e5v.embedder")


@dataclass
class PromptItem:
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


OnBad = Callable[[int, BadImageError], None]  # raise the error, or record the input as skipped


class ItemBuilder:
    """Builds :class:`PromptItem` lists for one backbone, prompt set and length cap (cheap: make one per call)."""

    def __init__(self, backbone: Backbone, prompt: PromptSet, inputs: Inputs, max_length: int | None) -> None:
        self.backbone = backbone
        self.prompt = prompt
        self.inputs = inputs
        self.max_length = max_length
        self.tokenizer = backbone.tokenizer

    def fit(self, text: str, prefix: str, suffix: str, length_of: Callable[[str], int]) -> tuple[str, bool]:
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
    def text_items(self, texts: list[str], template: str, category: str | None) -> tuple[list[PromptItem], list[int]]:
        """(items, indices of the shortened texts)."""
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
                t2, _ = self.fit(t, prefix, suffix, lambda s: len(self.tokenizer(s)["input_ids"]))
                prompts[i] = prefix + t2 + suffix
                ids = self.tokenizer(prompts[i])["input_ids"]
                truncated.append(i)
            items.append(PromptItem(index=i, prompt=prompts[i], ids=ids, length=len(ids)))
        return items, truncated

    def image_tokens(self, image: Any) -> int:
        """Number of tokens one image expands to (from its size only: no decoding)."""
        w, h = image.size
        counts = self.inputs.image_tokens([(h, w)])
        return counts[0] if counts else 1  # processors without the helper: sort by text length only

    @expected_long_inputs()
    def image_items(
        self,
        pairs: list[tuple[Any, str | None]],
        template: str,
        category: str | None,
        on_bad: OnBad,
        fixed_prompt: str | None = None,
    ) -> tuple[list[PromptItem], list[int]]:
        """(items, indices of the shortened texts); a file whose header cannot be read goes to ``on_bad``."""
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
                n_img = self.image_tokens(header)
            except BadImageError as e:
                on_bad(i, e)
                continue
            ok.append((i, image, text, n_img))
        if fixed_prompt is not None:
            prompts = [fixed_prompt] * len(ok)
            fixed_ids = tok(fixed_prompt)["input_ids"] if ok else []
            all_ids = [fixed_ids] * len(ok)  # one tokenization for the whole request
        else:
            prompts = [prefix + text + suffix for _, _, text, _ in ok]
            all_ids = tok(prompts)["input_ids"] if prompts else []  # one batched call
        items: list[PromptItem] = []
        truncated: list[int] = []
        for k, (i, image, text, n_img) in enumerate(ok):
            prompt, ids = prompts[k], all_ids[k]
            if fixed_prompt is None and self.max_length is not None and len(ids) - 1 + n_img > self.max_length:

                def length_of(s: str, n_img: int = n_img) -> int:
                    return len(tok(s)["input_ids"]) - 1 + n_img

                text2, cut = self.fit(str(text), prefix, suffix, length_of)
                if cut:
                    truncated.append(i)
                prompt = prefix + text2 + suffix
                ids = tok(prompt)["input_ids"]
            items.append(PromptItem(index=i, prompt=prompt, ids=ids, length=len(ids) - 1 + n_img, image=image))
        return items, truncated


def report_truncation(truncated: list[int], max_length: int | None) -> None:
    if truncated:
        log.warning(
            "%d input(s) exceeded max_length=%d and had their text shortened (template kept): indices %s%s",
            len(truncated),
            max_length,
            truncated[:10],
            " ..." if len(truncated) > 10 else "",
        )


def report_skipped(skipped: list[Skipped]) -> None:
    if skipped:
        log.warning(
            "skipped %d bad image(s): %s",
            len(skipped),
            ", ".join(f"#{s.index} {s.source} ({s.reason})" for s in skipped[:5]),
        )


# ---------------------------------------------------------------------------------------------- input checks
def check_list(values: Any, name: str) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        if isinstance(values, (str, bytes)):
            raise TypeError(f"{name} must be a list, got a single {type(values).__name__}; wrap it: [{name[:-1]}]")
        try:
            return list(values)
        except TypeError:
            raise TypeError(f"{name} must be a list, got {type(values).__name__}") from None
    return list(values)


def check_text(text: Any, index: int, image_token: str, what: str | None = None) -> None:
    what = what or f"texts[{index}]"
    if text is None:
        raise TypeError(f"{what} is None; expected a string")
    if not isinstance(text, str):
        raise TypeError(f"{what} is a {type(text).__name__}; expected a string")
    if image_token in text or "<image>" in text:
        raise ValueError(f"{what} contains the image token {image_token!r}; remove it from the text")


def check_texts(texts: Any, image_token: str) -> list[str]:
    texts = check_list(texts, "texts")
    for i, t in enumerate(texts):
        check_text(t, i, image_token)
    return texts


def check_images(images: Any) -> list[Any]:
    images = check_list(images, "images")
    for i, im in enumerate(images):
        if im is None:
            raise TypeError(f"images[{i}] is None; expected a PIL image or a file path")
    return images


def check_pairs(pairs: Any, image_token: str) -> list[Any]:
    pairs = check_list(pairs, "pairs")
    for i, p in enumerate(pairs):
        if p is None:
            raise TypeError(f"pairs[{i}] is None; expected an (image, text) pair")
        if not isinstance(p, (tuple, list)) or len(p) != 2:
            raise TypeError(f"pairs[{i}] must be an (image, text) pair, got {type(p).__name__}")
        if p[0] is None:
            raise TypeError(f"pairs[{i}][0] (the image) is None")
        check_text(p[1], i, image_token, what=f"pairs[{i}][1]")
    return pairs


__all__ = [
    "ItemBuilder", "PromptItem", "Skipped", "check_images", "check_list", "check_pairs", "check_text", "check_texts",
    "report_skipped", "report_truncation",
]
