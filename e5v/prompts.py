"""Prompt templates: a chat wrapper around a body that asks the model to summarise "in one word".

A :class:`PromptSet` is built from a config in ``configs/prompt/`` (a wrapper plus the bodies of
``configs/prompt/bodies/``). Placeholders in bodies:

* ``<sent>``  the user's text (inserted last, verbatim),
* ``<image>`` where the image goes (rewritten to the backbone's own image token, e.g. Phi-3-V's
  ``<|image_1|>``),
* ``{X}``     the FashionIQ category word (``toptee`` is written ``shirt``, as released).

The wrapper holds ``{body}`` exactly once. Strings are the released code's, typos included.
"""

from __future__ import annotations

import dataclasses

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from e5v.errors import ConfigError

SENT = "<sent>"
IMAGE = "<image>"
CATEGORY = "{X}"
BODY = "{body}"

# Placeholders each standard body must contain. Other (user-defined) bodies need <sent> or <image>.
REQUIRED_PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "text": (SENT,),
    "image": (IMAGE,),
    "cirr_gallery": (IMAGE,),
    "cirr_query": (IMAGE, SENT),
    "fashioniq_gallery": (IMAGE, CATEGORY),
    "fashioniq_query": (IMAGE, SENT, CATEGORY),
    "sts": (SENT,),
    "train": (SENT,),
}

TRAIN_MODES = ("fixed", "faithful")

# FashionIQ category -> the word the released prompts use.
FASHIONIQ_WORD = {"dress": "dress", "shirt": "shirt", "toptee": "shirt"}


class PromptConfigError(ConfigError):
    """A prompt config is malformed (missing placeholder, unknown body, bad mode)."""


def clean_sts_sentence(sentence: str) -> str:
    """Clean a sentence the way the released STS evaluation does.

    Append ``.`` unless it ends in one of ``.?"'``; replace ``"`` by ``'``; a final ``?`` becomes ``.``.
    """
    s = sentence
    if s and s[-1] not in ".?\"'":
        s += "."
    s = s.replace('"', "'")
    if s and s[-1] == "?":
        s = s[:-1] + "."
    return s


def fashioniq_caption(captions: list[str] | tuple[str, ...]) -> str:
    """Join FashionIQ's relative captions as released: each stripped of ``.?, `` at both ends, joined by ``, ``."""
    return ", ".join(c.strip(".?, ") for c in captions)


@dataclass(frozen=True)
class PromptSet:
    """A wrapper plus named bodies; renders the exact strings fed to the tokenizer/processor."""

    name: str
    wrapper: str
    bodies: Mapping[str, str]
    image_token: str = IMAGE
    train_mode: str = "fixed"
    train_max_tokens: int | None = 32
    # Faithful training template inside the chat wrapper? The release wrapped it for Llama-3 only.
    faithful_train_wrapper: bool = True
    # Faithful mode: the released training script replaced '_' by ' ' in the templated prompt
    # (mangling the special tokens) and stripped trailing whitespace.
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"prompt config '{self.name}'"
        if self.wrapper.count(BODY) != 1:
            raise PromptConfigError(
                f"{where}: key 'wrapper' must contain the placeholder {BODY} exactly once "
                f"(found {self.wrapper.count(BODY)}); e.g. wrapper: \"[INST] {BODY} [/INST]\""
            )
        if not self.bodies:
            raise PromptConfigError(f"{where}: key 'bodies' is empty; compose a bodies file (bodies: e5v)")
        for key, body in self.bodies.items():
            if not isinstance(body, str):
                raise PromptConfigError(f"{where}: bodies.{key} must be a string, got {type(body).__name__}")
            needed = REQUIRED_PLACEHOLDERS.get(key)
            if needed is None:
                if SENT not in body and IMAGE not in body:
                    raise PromptConfigError(
                        f"{where}: bodies.{key} has neither {SENT} nor {IMAGE}; add the placeholder "
                        "where the input goes"
                    )
                continue
            missing = [p for p in needed if p not in body]
            if missing:
                raise PromptConfigError(
                    f"{where}: bodies.{key} = {body!r} is missing placeholder(s) {missing}; "
                    f"a '{key}' body must contain {list(needed)}"
                )
        if self.train_mode not in TRAIN_MODES:
            raise PromptConfigError(f"{where}: train_mode must be one of {TRAIN_MODES}, got {self.train_mode!r}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: Any) -> PromptSet:
        """Build from a mapping / OmegaConf node with keys name, wrapper, bodies[, image_token, train_mode, ...]."""
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a hard dependency
            pass
        cfg = dict(cfg)
        for key in ("wrapper", "bodies"):
            if key not in cfg:
                raise PromptConfigError(f"prompt config '{cfg.get('name', '?')}' is missing key '{key}'")
        known = {"name", "wrapper", "bodies", "image_token", "train_mode", "train_max_tokens", "faithful_train_wrapper"}
        extra = {k: v for k, v in cfg.items() if k not in known}
        prompt = cls(  # the bodies are checked first: an mmeb node may point at them
            name=str(cfg.get("name", "custom")),
            wrapper=cfg["wrapper"],
            bodies=dict(cfg["bodies"]),
            image_token=cfg.get("image_token", IMAGE),
            train_mode=cfg.get("train_mode", "fixed"),
            train_max_tokens=cfg.get("train_max_tokens", 32),
            faithful_train_wrapper=bool(cfg.get("faithful_train_wrapper", True)),
            extra=extra,
        )
        if extra.get("mmeb") is None:
            return prompt
        # the MMEB prompt interface (eval.benchmarks.mmeb): bodies mmeb_<kind>
        return dataclasses.replace(prompt, bodies={**prompt.bodies, **mmeb_bodies(extra["mmeb"], prompt.name)})

    # ------------------------------------------------------------------ rendering
    def body(self, kind: str) -> str:
        if kind not in self.bodies:
            raise KeyError(f"prompt '{self.name}' has no body '{kind}'; available: {sorted(self.bodies)}")
        return self.bodies[kind]

    def wrap(self, body: str) -> str:
        prefix, suffix = self.wrapper.split(BODY)
        return prefix + body + suffix

    def template(self, kind: str, category: str | None = None) -> str:
        """The full prompt for ``kind`` with the backbone's image token, ``<sent>`` still unfilled."""
        body = self.body(kind)
        if CATEGORY in body:
            if category is None:
                raise ValueError(f"body '{kind}' of prompt '{self.name}' needs a category (e.g. category='dress')")
            body = body.replace(CATEGORY, FASHIONIQ_WORD.get(category, category))
        body = body.replace(IMAGE, self.image_token)
        return self.wrap(body)

    def split(self, kind: str, category: str | None = None) -> tuple[str, str]:
        """(prefix, suffix) around ``<sent>``: the parts truncation must never cut."""
        t = self.template(kind, category)
        if SENT not in t:
            return t, ""
        prefix, _, suffix = t.partition(SENT)
        return prefix, suffix

    def render(self, kind: str, text: str | None = None, category: str | None = None) -> str:
        """Render the full prompt string for one input."""
        t = self.template(kind, category)
        if SENT in t:
            if text is None:
                raise ValueError(f"body '{kind}' of prompt '{self.name}' needs a text")
            if kind == "sts":
                text = clean_sts_sentence(text)
            prefix, _, suffix = t.partition(SENT)
            return prefix + text + suffix
        if text is not None:
            raise ValueError(f"body '{kind}' of prompt '{self.name}' takes no text")
        return t

    @property
    def keep_instruction(self) -> bool:
        """Whether a task instruction joins an item's text (the ``mmeb:`` node's ``instruction: keep``, the default)."""
        return (self.extra.get("mmeb") or {}).get("instruction", "keep") == "keep"

    @property
    def instruction_separator(self) -> str:
        return str((self.extra.get("mmeb") or {}).get("separator", " "))

    def render_item(self, template: str, text: str, has_image: bool, tokenizer: Any = None) -> str:
        """One contrastive item's prompt (training rows, mining): ``template`` ``train`` is :meth:`render_train`
        (text only); any other names a body: its ``<sent>`` gets ``text``, a body without ``<sent>`` takes none."""
        if template == "train":
            if has_image:
                raise ValueError(f"prompt '{self.name}': the train template takes text only, not an image")
            return self.render_train(text, tokenizer=tokenizer)
        if has_image and IMAGE not in self.body(template):
            raise ValueError(f"prompt '{self.name}': body '{template}' has no {IMAGE} for the item's image")
        if SENT not in self.body(template):
            if text:
                raise ValueError(f"prompt '{self.name}': body '{template}' has no {SENT} for the item's text {text!r}")
            return self.render(template)
        return self.render(template, text)

    def render_train(self, sentence: str, tokenizer: Any = None, mode: str | None = None) -> str:
        """Render one training sentence.

        ``fixed`` (default): the ``train`` body in the real chat wrapper, for every backbone.
        ``faithful``: as the released script did it: the wrapper's ``_`` replaced by spaces (so
        ``<|start_header_id|>`` becomes the plain text ``<|start header id|>``) and the trailing
        whitespace of the template stripped; backbones whose config sets ``faithful_train_wrapper:
        false`` (Mistral, Phi-3: the release wrapped only Llama-3) get the bare body, stripped. In both modes the sentence is first cut to
        ``train_max_tokens`` tokens when a tokenizer is given; ``faithful`` always tokenizes and decodes it,
        as released (so ``clean_up_tokenization_spaces`` turns " ." into "." and " n't" into "n't" even in
        short sentences), ``fixed`` only shortens sentences that are too long.
        """
        mode = mode or self.train_mode
        if mode not in TRAIN_MODES:
            raise ValueError(f"train mode must be one of {TRAIN_MODES}, got {mode!r}")
        if tokenizer is not None and self.train_max_tokens:
            sentence = cut_to_tokens(sentence, tokenizer, self.train_max_tokens, always=mode == "faithful")
        template = self.template("train")
        if mode == "faithful":
            if not self.faithful_train_wrapper:  # the release wrapped the template for Llama-3 only
                template = self.body("train")
            template = template.replace("_", " ").rstrip()
            # The released template wrote the placeholder as *sent_0*; the mangling turned it into
            # *sent 0* before the sentence was inserted, so the sentence itself keeps its '_'.
        prefix, _, suffix = template.partition(SENT)
        return prefix + sentence + suffix


MMEB_KINDS = {"text": (SENT,), "image": (IMAGE,), "pair": (IMAGE, SENT)}
MMEB_INSTRUCTION = ("keep", "drop")


def mmeb_bodies(node: Mapping[str, Any], name: str) -> dict[str, str]:
    """The ``mmeb:`` node of a prompt config -> bodies ``mmeb_text`` / ``mmeb_image`` / ``mmeb_pair``.

    ``instruction`` (keep | drop) says what happens to the task instruction (read by the benchmark); the three
    bodies say how an item with only a text, only an image, or both becomes the prompt (inside the wrapper).
    """
    where = f"prompt config '{name}', node mmeb"
    if not isinstance(node, Mapping):
        raise PromptConfigError(f"{where}: must be a mapping with keys instruction, text, image, pair")
    if node.get("instruction", "keep") not in MMEB_INSTRUCTION:
        raise PromptConfigError(f"{where}: instruction must be one of {MMEB_INSTRUCTION}, got {node.get('instruction')!r}")
    out = {}
    for kind, needed in MMEB_KINDS.items():
        body = node.get(kind)
        if not isinstance(body, str):
            raise PromptConfigError(f"{where}: key '{kind}' must be a string body containing {list(needed)}")
        missing = [p for p in needed if p not in body]
        if missing:
            raise PromptConfigError(f"{where}: {kind} = {body!r} is missing placeholder(s) {missing}")
        out[f"mmeb_{kind}"] = body
    return out


# What transformers 4.x's ``clean_up_tokenization`` did to every decoded string when the tokenizer's
# ``clean_up_tokenization_spaces`` was true (the released Llama-3 tokenizer's setting); transformers 5 no longer
# applies it to BPE tokenizers, so the faithful mode applies it itself, in this order.
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_spaces(text: str) -> str:
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text


def cut_to_tokens(text: str, tokenizer: Any, max_tokens: int, always: bool = False) -> str:
    """Cut ``text`` to its first ``max_tokens`` tokens (no special tokens), decoded back to a string.

    ``always``: decode even when nothing is cut and clean the spaces up as transformers 4.x did (the
    released script's tokenizer setting): spaces before punctuation and contractions are removed."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if always:
        return clean_up_spaces(tokenizer.decode(ids[:max_tokens], clean_up_tokenization_spaces=False))
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)


def load_prompt(name: str, overrides: list[str] | None = None) -> PromptSet:
    """Compose ``configs/prompt/<name>.yaml`` (with its bodies) and build the :class:`PromptSet`."""
    from e5v.config import compose

    cfg = compose("embed", [f"prompt={name}", *(overrides or [])])
    return PromptSet.from_config(cfg.prompt)
