"""mteb / MIEB interoperability: an encoder that implements mteb's ``EncoderProtocol``.

    import mteb
    from e5v.integrations.mteb_encoder import E5VEncoder
    model = E5VEncoder("royokong/e5-v", device="cuda", dtype="float16")   # or E5VEncoder(embedder=emb)
    mteb.evaluate(model, mteb.get_tasks(tasks=["STS12", "Flickr30kI2TRetrieval"]), encode_kwargs={"batch_size": 8})

Inputs are routed row by row, by what the row holds (the prompt bodies are the prompt set's, see
``configs/prompt/bodies/``; :meth:`E5VEncoder.prompt_plan` lists them):

- text only -> ``text`` ("<sent> Summary above sentence in one word:"); text STS tasks (type ``STS``)
  -> ``sts`` with the sentence cleaning of our STS protocol;
- image only -> ``image`` ("<image> Summary above image in one word:"), VisualSTS (rendered
  sentences) included, as in the paper's I2I protocol;
- image + text -> one interleaved prompt, ``cirr_query`` by default (the release's composed-retrieval
  body, the only image+text prompt E5-V has); ``interleaved_templates`` picks another body per mteb
  task name or task type (e.g. ``{"Any2AnyRetrieval": "my_body"}`` with a user-defined body). A row
  whose text is empty or blank is an image-only row.

mteb's own E5-V wrapper makes the same three choices (text / image / one composed prompt for every
image+text input), with its own composed wording (README, "mteb / MIEB").

Image rows are encoded one mteb batch at a time (a split's images are never all held in memory);
text rows are collected and encoded in one call (length-sorted batches).
``encode_kwargs["batch_size"]`` is the forward batch size. Similarity is cosine.

Result identity: mteb caches results under (model name, revision). A local directory is named
``e5v/<dir name>``; unless a ``revision`` is given, the revision is a content fingerprint of the
loaded model (:func:`e5v.provenance.state_dict_sha256`: every weight tensor, so a merged or applied adapter and the
dtype count) and of the prompts, so two checkpoints in directories of the same name, or one
checkpoint under two prompt sets, never share a cached score.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import numpy as np


def model_fingerprint(
    embedder: Any, interleaved_template: str, interleaved_templates: Mapping[str, str] | None = None
) -> str:
    """Weights (state-dict hash) + everything else that shapes an mteb score: prompts, length cap."""
    from e5v.provenance import state_dict_sha256

    prompt = embedder.prompt
    blob = json.dumps(
        {
            "weights": state_dict_sha256(embedder.model),
            "wrapper": prompt.wrapper,
            "bodies": dict(prompt.bodies),
            "image_token": prompt.image_token,
            "max_length": embedder.max_length,
            "interleaved_template": interleaved_template,
            # only when set: fingerprints (mteb revisions) of runs without overrides stay as they were
            **({"interleaved_templates": dict(sorted(interleaved_templates.items()))} if interleaved_templates else {}),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def mteb_name(model_name: str) -> str:
    """mteb wants ``org/name``: a local directory becomes ``e5v/<dir name>``, a builtin ``e5v/<name>``."""
    p = Path(model_name).expanduser()
    if p.exists():
        return f"e5v/{p.resolve().name}"
    return model_name if "/" in model_name else f"e5v/{model_name}"


def _model_meta(name: str, revision: str, dim: int, n_params: int) -> Any:
    from mteb.models.model_meta import ModelMeta, ScoringFunction

    return ModelMeta(
        loader=None,
        name=name,
        revision=revision,
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
    """mteb encoder around an :class:`e5v.Embedder` (built here or passed in).

    ``revision``: passed to the hub when the model is loaded here, and used as the mteb revision;
    ``None`` -> ``sha256-<20 hex>`` of :func:`model_fingerprint` (computed once, at construction).
    """

    def __init__(
        self,
        model_name: str = "royokong/e5-v",
        revision: str | None = None,
        *,
        device: str | None = None,
        embedder: Any = None,
        interleaved_template: str = "cirr_query",
        interleaved_templates: Mapping[str, str] | None = None,
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
        self.interleaved_templates = dict(interleaved_templates or {})
        for body in {interleaved_template, *self.interleaved_templates.values()}:
            embedder.prompt.body(body)  # an unknown body fails here, naming the prompt's bodies
        n_params = sum(p.numel() for p in embedder.model.parameters())
        self.revision = revision or "sha256-" + model_fingerprint(
            embedder, interleaved_template, self.interleaved_templates
        )[:20]
        self.mteb_model_meta = _model_meta(mteb_name(model_name), self.revision, embedder.dim, n_params)

    def templates_for(self, task_metadata: Any) -> dict[str, str]:
        """The prompt body used for each input kind (text / image / image+text) of one mteb task."""
        name = str(getattr(task_metadata, "name", ""))
        ttype = str(getattr(task_metadata, "type", ""))
        over = self.interleaved_templates
        pair = over.get(name, over.get(ttype, self.interleaved_template))
        return {"text": "sts" if ttype.startswith("STS") else "text", "image": "image", "image+text": pair}

    def prompt_plan(self, task_metadata: Any) -> dict[str, str]:
        """:meth:`templates_for` with each body's rendered prompt (wrapper included): what a report records."""
        out = {}
        for kind, body in self.templates_for(task_metadata).items():
            out[kind] = f"{body}: {self.embedder.prompt.template(body)!r}"
        return out

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
        emb = self.embedder
        bs = kwargs.get("batch_size")
        bs = int(bs) if bs else None
        plan = self.templates_for(task_metadata)
        parts: list[tuple[list[int], np.ndarray]] = []
        text_rows: list[int] = []
        texts: list[str] = []
        n = 0
        batches: Any = inputs
        if kwargs.get("show_progress_bar"):
            from tqdm.auto import tqdm

            batches = tqdm(inputs, desc=f"e5v {getattr(task_metadata, 'name', '')}", unit="batch")
        for batch in batches:
            t, im = batch.get("text"), batch.get("image")
            size = len(t) if t is not None else len(im) if im is not None else 0
            if t is not None and im is not None and len(t) != len(im):
                raise ValueError(f"mteb batch has {len(im)} images but {len(t)} texts; cannot pair them")
            img_rows, imgs, pair_rows, pairs = [], [], [], []
            for i in range(size):
                ti = t[i] if t is not None else None
                ii = im[i] if im is not None else None
                if ii is not None and ti is not None and not str(ti).strip():
                    ti = None  # an image with an empty caption is an image
                if ii is not None and ti is not None:
                    pair_rows.append(n + i)
                    pairs.append((ii, ti))
                elif ii is not None:
                    img_rows.append(n + i)
                    imgs.append(ii)
                elif ti is not None:
                    text_rows.append(n + i)
                    texts.append(ti)
                else:
                    raise ValueError(f"mteb input row {n + i} has neither text nor image")
            if imgs:  # this batch's images only: encoded now, then released
                parts.append((img_rows, self._checked(emb.encode_image(imgs, batch_size=bs, template=plan["image"]), len(imgs), "image")))
            if pairs:
                out = emb.encode_interleaved(pairs, template=plan["image+text"], batch_size=bs)
                parts.append((pair_rows, self._checked(out, len(pairs), "image+text")))
            n += size
        if texts:
            out = emb.encode_sts(texts, batch_size=bs) if plan["text"] == "sts" else emb.encode_text(texts, batch_size=bs)
            parts.append((text_rows, self._checked(out, len(texts), "text")))
        result = np.zeros((n, emb.dim), dtype=np.float32)
        for rows, arr in parts:
            result[rows] = arr
        return result

    def _checked(self, out: np.ndarray, expected: int, kind: str) -> np.ndarray:
        if out.shape[0] != expected:
            skipped = getattr(self.embedder, "last_skipped", [])
            raise ValueError(
                f"{kind}: {expected - out.shape[0]} of {expected} input(s) were skipped as unreadable "
                f"({', '.join(s.source for s in skipped[:3])}); mteb needs one embedding per input: "
                "use on_bad_image='raise' or clean the data"
            )
        return out

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
