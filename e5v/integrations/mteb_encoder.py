"""mteb / MIEB interoperability: an encoder that implements mteb's ``EncoderProtocol``.

    import mteb
    from e5v.integrations.mteb_encoder import E5VEncoder
    model = E5VEncoder("royokong/e5-v", device="cuda", dtype="float16")   # or E5VEncoder(embedder=emb)
    mteb.evaluate(model, mteb.get_tasks(tasks=["STS12", "Flickr30kI2TRetrieval"]))

Inputs are routed by what each batch holds: text only -> the text prompt (STS tasks: the STS prompt
and sentence cleaning, as in our STS protocol), image only -> the image prompt, image + text -> one
interleaved prompt (``cirr_query`` by default). Similarity is cosine.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _model_meta(name: str, revision: str | None, dim: int, n_params: int) -> Any:
    from mteb.models.model_meta import ModelMeta, ScoringFunction

    return ModelMeta(
        loader=None,
        name=name if "/" in name else f"e5v/{name}",
        revision=revision or "local",
        release_date=None,
        languages=["eng-Latn"],
        n_parameters=n_params,
        memory_usage_mb=None,
        max_tokens=None,
        embed_dim=dim,
        license=None,
        open_weights=True,
        public_training_code=None,
        public_training_data=None,
        framework=["PyTorch", "Transformers"],
        reference=None,
        similarity_fn_name=ScoringFunction.COSINE,
        use_instructions=False,
        training_datasets=None,
        modalities=["image", "text"],
    )


class E5VEncoder:
    """mteb encoder around an :class:`e5v.Embedder` (built here or passed in)."""

    def __init__(
        self,
        model_name: str = "royokong/e5-v",
        revision: str | None = None,
        *,
        device: str | None = None,
        embedder: Any = None,
        interleaved_template: str = "cirr_query",
        batch_size: int = 32,
        **kwargs: Any,
    ) -> None:
        if embedder is None:
            from e5v import Embedder

            if revision:
                kwargs["revision"] = revision
            embedder = Embedder.from_pretrained(model_name, device=device or "auto", batch_size=batch_size, **kwargs)
        self.embedder = embedder
        self.interleaved_template = interleaved_template
        n_params = sum(p.numel() for p in embedder.model.parameters())
        self.mteb_model_meta = _model_meta(model_name, revision, embedder.dim, n_params)

    def encode(
        self,
        inputs: Any,
        *,
        task_metadata: Any,
        hf_split: str,
        hf_subset: str,
        prompt_type: Any = None,
        **kwargs: Any,
    ) -> np.ndarray:
        texts: list[str] = []
        images: list[Any] = []
        for batch in inputs:
            t, im = batch.get("text"), batch.get("image")
            if t is not None:
                texts.extend(t)
            if im is not None:
                images.extend(im)
        emb = self.embedder
        if images and texts:
            if len(images) != len(texts):
                raise ValueError(f"mteb batch has {len(images)} images but {len(texts)} texts; cannot pair them")
            return emb.encode_interleaved(list(zip(images, texts)), template=self.interleaved_template)
        if images:
            return emb.encode_image(images)
        if str(getattr(task_metadata, "type", "")).startswith("STS"):
            return emb.encode_sts(texts)
        return emb.encode_text(texts)

    @staticmethod
    def _normalise(x: Any) -> np.ndarray:
        x = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def similarity(self, embeddings1: Any, embeddings2: Any) -> Any:
        import torch

        return torch.from_numpy(self._normalise(embeddings1) @ self._normalise(embeddings2).T)

    def similarity_pairwise(self, embeddings1: Any, embeddings2: Any) -> Any:
        import torch

        a, b = self._normalise(embeddings1), self._normalise(embeddings2)
        return torch.from_numpy((a * b).sum(axis=1))
