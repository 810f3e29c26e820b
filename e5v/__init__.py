"""E5-V: universal multimodal embeddings with multimodal LLMs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from e5v.embedder import Embedder
    from e5v.prompts import PromptSet


def __getattr__(name: str) -> Any:  # lazy: `import e5v` stays cheap (no torch/transformers import)
    if name == "Embedder":
        from e5v.embedder import Embedder

        return Embedder
    if name == "PromptSet":
        from e5v.prompts import PromptSet

        return PromptSet
    raise AttributeError(f"module 'e5v' has no attribute {name!r}")


__all__ = ["Embedder", "PromptSet", "__version__"]
