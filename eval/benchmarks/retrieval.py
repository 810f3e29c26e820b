"""Flickr30K / COCO image-text retrieval, and their image-image variants (I2I, rendered captions).

Text-to-image: each caption retrieves among the images (one positive). Image-to-text: each image
retrieves among all captions; a hit when ANY of its captions is in the top k (CLIP_benchmark).
With ``render: true`` every caption is drawn as an image (:mod:`eval.render`) and embedded with the
ordinary image prompt, so both directions are image-to-image (paper Table 4). Photos are embedded
with the same prompt in both variants, so they come from the cache the second time.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eval.benchmarks.base import Benchmark, BenchmarkResult, Context, recall_cutoff, retrieve
from eval.encode import ImageRef
from eval.loaders import MissingDatasetError
from eval.loaders.captions import CaptionData, has_hf_data, load_captions, resolve_format
from eval.metrics import chance_recall, chance_recall_any


@dataclass
class _State:
    data: CaptionData
    images: np.ndarray  # (n_images, d) normalised
    captions: np.ndarray  # (n_captions, d) normalised
    extra: dict[str, Any]


class CaptionRetrieval(Benchmark):
    """Flickr30K, COCO (``render: false``) and I2I-Flickr30K, I2I-COCO (``render: true``).

    Args:
        root: dataset folder. format / annotation / image_dir / split / image_column / text_column:
            see :func:`eval.loaders.captions.load_captions`.
        max_captions: keep the first N captions per image (COCO release: 5 -> 25,000; null -> all,
            25,010 in the standard Karpathy file).
        ks: recall cut-offs.
        render: draw the captions as images (I2I).
        text_template / image_template: prompt bodies (``text`` / ``image`` as released).
    """

    family = "retrieval"

    def __init__(
        self,
        name: str,
        root: str | Path,
        format: str = "auto",
        annotation: str | None = None,
        image_dir: str = ".",
        split: str = "test",
        max_captions: int | None = None,
        image_column: str = "image",
        text_column: str | None = None,
        ks: tuple[int, ...] | list[int] = (1, 5, 10),
        render: bool = False,
        text_template: str = "text",
        image_template: str = "image",
        **options: Any,
    ) -> None:
        super().__init__(name, root, **options)
        self.format, self.annotation, self.image_dir, self.split = format, annotation, image_dir, split
        self.max_captions = max_captions
        self.image_column, self.text_column = image_column, text_column
        self.ks = [int(k) for k in ks]
        self.render = bool(render)
        self.text_template, self.image_template = text_template, image_template
        self.family = "i2i" if self.render else "retrieval"

    @property
    def dataset(self) -> str:
        return self.name.removeprefix("i2i_")

    @property
    def make_target(self) -> str:  # type: ignore[override]
        return f"data-{self.dataset.replace('_', '-')}"

    def chance(self, metric: str, info: Mapping[str, Any]) -> float:
        """t2i: one image among ``n_images``; i2t: any of the image's captions among ``n_captions`` (the
        exact per-image counts of ``captions_per_image`` when recorded, else the mean count, rounded)."""
        if (k := recall_cutoff(metric, "t2i_")) is not None:
            return chance_recall(k, int(info["n_images"]))
        if (k := recall_cutoff(metric, "i2t_")) is not None:
            n_img, n_cap = int(info["n_images"]), int(info["n_captions"])
            hist = info.get("captions_per_image") or {str(max(1, round(n_cap / n_img))): n_img}
            return chance_recall_any(k, n_cap, hist)
        raise ValueError(f"{self.name}: no metric {metric!r} (its metrics: t2i_R@k, i2t_R@k)")

    def check_data(self) -> None:
        """A Hugging Face layout is checked for its files (images are inside them); the JSON layouts are
        read, which checks every image file they name."""
        fmt = resolve_format(self.root, self.dataset, self.format, self.annotation)
        if fmt != "hf":
            self.load()
        elif not has_hf_data(self.root):
            hint = f" or the annotation file {self.root / self.annotation}" if self.annotation else ""
            raise MissingDatasetError(self.dataset, self.root, f"Hugging Face dataset (parquet/arrow){hint}")

    def load(self) -> CaptionData:
        return load_captions(
            self.root,
            dataset=self.dataset,
            format=self.format,
            annotation=self.annotation,
            image_dir=self.image_dir,
            split=self.split,
            max_captions=self.max_captions,
            image_column=self.image_column,
            text_column=self.text_column,
        )

    def embed(self, ctx: Context) -> _State:
        data = self.load()
        enc = ctx.encoder
        images = enc.image(data.images, template=self.image_template)
        extra: dict[str, Any] = {}
        if self.render:
            paths = ctx.renderer.render_all(data.captions, progress=ctx.progress)
            refs = [ImageRef(path=p, label=f"caption {i}") for i, p in enumerate(paths)]
            captions = enc.image(refs, template=self.image_template)
            extra["render"] = ctx.renderer.describe()
        else:
            captions = enc.text(data.captions, template=self.text_template)
        return _State(data, images, captions, extra)

    def score(self, state: _State, ctx: Context) -> BenchmarkResult:
        data = state.data
        t2i_pos = [[int(i)] for i in data.caption_image]
        i2t_pos = data.image_captions
        m1, info1 = retrieve(state.captions, state.images, t2i_pos, self.ks, ctx.index, prefix="t2i_")
        m2, info2 = retrieve(state.images, state.captions, i2t_pos, self.ks, ctx.index, prefix="i2t_")
        info = {
            "n_images": len(data.images),
            "n_captions": len(data.captions),
            # {captions per image: images}, compact even for 5,000 images; gives the exact chance level
            "captions_per_image": {str(c): n for c, n in sorted(Counter(len(x) for x in i2t_pos).items())},
            "max_captions": self.max_captions,
            "index": info1["index"],
            **state.extra,
        }
        for key, inf in (("t2i", info1), ("i2t", info2)):
            if "index_recall_vs_exact" in inf:
                info[f"{key}_index_recall_vs_exact"] = inf["index_recall_vs_exact"]
        return BenchmarkResult(self.name, self.family, {**m1, **m2}, info)
