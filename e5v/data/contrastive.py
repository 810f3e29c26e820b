"""General contrastive rows: a query, one or more positives and optional hard negatives, each any of text,
image or image + text with an optional task instruction. Every training dataset is one of these:

* NLI triplets (E5-V's stage 1): text query, text positive, text hard negative, rendered with the ``train``
  template (``templates = {"text": "train"}``);
* image-caption pairs (the paper's Table 7): image query (``image`` body), caption positive (``train``);
* MMEB-train (``TIGER-Lab/MMEB-train``: ``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path``,
  ``neg_text``, ``neg_image_path``) and JSONL rows: rendered as the MMEB evaluation renders items
  (``mmeb_text`` / ``mmeb_image`` / ``mmeb_pair`` bodies of the prompt's ``mmeb:`` node), so stage 2 trains
  on exactly the prompts it is evaluated with.

``templates`` maps an item's kind (``text``, ``image``, ``pair``) to the prompt body it is rendered with;
``train`` means :meth:`e5v.prompts.PromptSet.render_train` (cut to ``train_max_tokens``, faithful mode).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ITEM_KINDS = ("text", "image", "pair")
MMEB_TEMPLATES = {"text": "mmeb_text", "image": "mmeb_image", "pair": "mmeb_pair"}
NLI_TEMPLATES = {"text": "train"}
PAIR_TEMPLATES = {"text": "train", "image": "image"}


@dataclass(frozen=True)
class Item:
    """One thing to embed: a text (may be ``""`` when there is an image), an image path (resolved inside the
    data root) or None, and a task instruction (``""``: none; how it joins the text is the prompt's
    ``mmeb.instruction``: ``keep`` or ``drop``)."""

    text: str = ""
    image: str | None = None
    instruction: str = ""

    def kind(self, keep_instruction: bool = True) -> str:
        """``text``, ``image`` (an image and no text once the instruction is kept or dropped) or ``pair``."""
        if self.image is None:
            return "text"
        return "pair" if self.text_with(keep_instruction) else "image"

    def text_with(self, keep_instruction: bool, separator: str = " ") -> str:
        """The text this item contributes to its prompt: instruction and text joined, or the text alone."""
        if not keep_instruction or not self.instruction:
            return self.text
        if not self.text:
            return self.instruction
        return f"{self.instruction}{separator}{self.text}"


@dataclass
class ContrastiveRows:
    """Validated rows of one dataset, column-wise. ``positives[i]`` has >= 1 items, ``negatives[i]`` >= 0.
    ``ids[i]``: the row's stable id (``<name>:<row in the source>``): mined negatives are joined on it."""

    name: str
    queries: list[Item]
    positives: list[list[Item]]
    negatives: list[list[Item]]
    source: str
    templates: dict[str, str] = field(default_factory=lambda: dict(MMEB_TEMPLATES))
    image_root: str | None = None
    ids: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def anchor_kind(self) -> str:
        """``image`` when every query is an image alone (image-caption pairs), else ``text`` (logged)."""
        return "image" if self.queries and all(q.image is not None and not q.text for q in self.queries) else "text"

    def identity_payload(self) -> dict[str, Any]:
        """What :func:`e5v.train.run_identity.data_identity` hashes: every item as read, image paths relative
        to the image root (the data may move)."""
        root = (self.image_root or "").rstrip("/") + "/" if self.image_root else None

        def item(it: Item) -> list[Any]:
            img = it.image
            if img is not None and root and img.startswith(root):
                img = img[len(root):]
            return [it.text, img, it.instruction]

        return {"name": self.name, "templates": self.templates, "queries": [item(q) for q in self.queries],
                "positives": [[item(p) for p in ps] for ps in self.positives],
                "negatives": [[item(n) for n in ns] for ns in self.negatives]}


__all__ = ["ITEM_KINDS", "MMEB_TEMPLATES", "NLI_TEMPLATES", "PAIR_TEMPLATES", "ContrastiveRows", "Item"]
