"""Phi-3-Vision's processor, written here (the hub ships it as remote code, ``processing_phi3_v.py`` and
``image_processing_phi3_v.py``); verified against it under transformers 4.44 by
``scripts/phi3v_remote_parity.py`` (same ids, same pixels).

Image processor (the HD transform; ``S`` = 336, the crop size; ``num_crops`` = 16 in the hub's config):

* RGB; a portrait image is transposed first (and back at the end), so the long side is the width;
* the largest ``scale`` with ``scale * ceil(scale / ratio) <= num_crops`` (ratio = width / height) sets the
  width ``scale * S`` (the height follows the ratio, truncated); bilinear resize (PIL), then white padding of
  the height to a multiple of ``S`` (top gets the floor of half);
* to [0, 1], normalised with CLIP's mean / std; a global view (bicubic resize of the normalised image to S x S)
  first, then the ``S`` x ``S`` crops row by row, zero-padded to ``num_crops + 1``;
* ``image_sizes`` = the padded (height, width); image tokens = (crops + 1) * T + 1 + (rows + 1) * sqrt(T),
  T = ``num_img_tokens`` (144: 12 x 12 merged patches per crop).

Processor: ONE string and its images; the string is split on ``<|image_N|>`` tags, every chunk tokenized on its
own WITH its BOS (the hub's code keeps each chunk's BOS), and the N-th tag becomes ``num_img_tokens`` copies of
``-N``. Text alone: the tokenizer's call.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

IMAGE_TAG = re.compile(r"<\|image_\d+\|>")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HUB_CROP = 336
PREPROCESSOR_FILE = "preprocessor_config.json"


def hub_file(path: str, name: str, **kw: Any) -> Path | None:
    """``name`` beside the weights: in a local folder, or from the hub (``kw``: revision, local_files_only)."""
    local = Path(path)
    if local.is_dir():
        return local / name if (local / name).is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(path, name, **kw))
    except Exception:  # not in the repository, or not cached while offline
        return None


class Phi3VImageProcessor:
    """The HD transform of Phi-3-V (see the module docstring)."""

    def __init__(self, num_crops: int = 1, image_mean: Sequence[float] = CLIP_MEAN,
                 image_std: Sequence[float] = CLIP_STD, do_convert_rgb: bool = True, num_img_tokens: int = 144,
                 crop_size: int = HUB_CROP, **_: Any) -> None:
        self.num_crops = int(num_crops)
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        self.do_convert_rgb = bool(do_convert_rgb)
        self.num_img_tokens = int(num_img_tokens)
        self.crop_size = int(crop_size)
        self.merged = math.isqrt(self.num_img_tokens)  # merged patches per crop side (12)
        if self.merged ** 2 != self.num_img_tokens:
            raise ValueError(f"Phi-3-V num_img_tokens={num_img_tokens} is not a square number of merged patches")

    # ------------------------------------------------------------------ sizes
    def hd_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the HD image (resized, padded) for an image of (width, height)."""
        s = self.crop_size
        transposed = width < height
        if transposed:
            width, height = height, width
        ratio = width / height
        scale = 1
        while scale * math.ceil(scale / ratio) <= self.num_crops:
            scale += 1
        scale -= 1
        new_w = int(scale * s)
        new_h = int(new_w / ratio)
        padded_h = math.ceil(new_h / s) * s
        return (padded_h, new_w) if transposed else (new_w, padded_h)

    def tokens_for_hd(self, height: int, width: int) -> int:
        rows, cols = height // self.crop_size, width // self.crop_size
        return (rows * cols + 1) * self.num_img_tokens + 1 + (rows + 1) * self.merged

    def calc_num_image_tokens_from_image_size(self, width: int, height: int) -> int:
        w, h = self.hd_size(width, height)
        return self.tokens_for_hd(h, w)

    # ------------------------------------------------------------------ pixels
    def hd_image(self, image: Any) -> Any:
        """The resized, white-padded PIL image (transposed for the resize when it is a portrait)."""
        from PIL import Image, ImageOps

        s = self.crop_size
        transposed = image.size[0] < image.size[1]
        if transposed:
            image = image.transpose(Image.Transpose.TRANSPOSE)
        w_out, _ = self.hd_size(*image.size)
        new_w, new_h = w_out, int(w_out / (image.size[0] / image.size[1]))
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        top = int((math.ceil(new_h / s) * s - new_h) / 2)
        bottom = math.ceil(new_h / s) * s - new_h - top
        image = ImageOps.expand(image, border=(0, top, 0, bottom), fill=(255, 255, 255))
        return image.transpose(Image.Transpose.TRANSPOSE) if transposed else image

    def __call__(self, images: Any, return_tensors: str | None = "pt", **_: Any) -> dict[str, Any]:
        from PIL import Image

        s = self.crop_size
        images = [images] if isinstance(images, Image.Image) else list(images)
        mean = torch.as_tensor(self.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.as_tensor(self.image_std, dtype=torch.float32)[:, None, None]
        out, sizes, counts = [], [], []
        for image in images:
            if self.do_convert_rgb and image.mode != "RGB":
                image = image.convert("RGB")
            hd = self.hd_image(image.convert("RGB"))
            x = torch.from_numpy(np.array(hd, dtype=np.uint8)).permute(2, 0, 1).float().div(255).sub_(mean).div_(std)
            h, w = x.shape[1:]
            glob = torch.nn.functional.interpolate(x[None], size=(s, s), mode="bicubic")  # (1, 3, S, S)
            crops = x.reshape(1, 3, h // s, s, w // s, s).permute(0, 2, 4, 1, 3, 5).reshape(-1, 3, s, s)
            x = torch.cat([glob, crops])
            pad = self.num_crops + 1 - x.shape[0]
            out.append(torch.cat([x, x.new_zeros(pad, 3, s, s)]) if pad > 0 else x)
            sizes.append([h, w])
            counts.append(self.tokens_for_hd(h, w))
        return {"pixel_values": torch.stack(out), "image_sizes": torch.tensor(sizes, dtype=torch.long),
                "num_img_tokens": counts}

    # ------------------------------------------------------------------ files (the hub's layout)
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "auto_map": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor",
                         "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor"},
            "num_crops": self.num_crops, "image_mean": self.image_mean, "image_processor_type": "Phi3VImageProcessor",
            "image_std": self.image_std, "processor_class": "Phi3VProcessor", "num_img_tokens": self.num_img_tokens,
        }
        if self.crop_size != HUB_CROP:
            d["crop_size"] = self.crop_size  # ours (tiny checkpoints); the hub's code always crops 336 px
        if not self.do_convert_rgb:
            d["do_convert_rgb"] = False
        return d

    def save_pretrained(self, path: str | Path) -> None:
        Path(path, PREPROCESSOR_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str, **kw: Any) -> Phi3VImageProcessor:
        f = hub_file(str(path), PREPROCESSOR_FILE, **kw)
        if f is None:
            raise FileNotFoundError(f"{path}: no {PREPROCESSOR_FILE} (Phi-3-V's image processor settings)")
        d = json.loads(f.read_text(encoding="utf-8"))
        if d.get("image_processor_type", "Phi3VImageProcessor") != "Phi3VImageProcessor":
            raise ValueError(f"{path}: {PREPROCESSOR_FILE} is a {d['image_processor_type']}, not Phi3VImageProcessor")
        return cls(**{k: v for k, v in d.items() if k not in ("auto_map", "image_processor_type", "processor_class")})


class Phi3VProcessor:
    """Tokenizer + :class:`Phi3VImageProcessor`, called as the hub's ``Phi3VProcessor``: ``(text, images)``."""

    def __init__(self, image_processor: Phi3VImageProcessor, tokenizer: Any) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.num_img_tokens = image_processor.num_img_tokens

    def calc_num_image_tokens_from_image_size(self, width: int, height: int) -> int:
        return self.image_processor.calc_num_image_tokens_from_image_size(width, height)

    def __call__(self, text: str | Sequence[str], images: Any = None, padding: Any = False, truncation: Any = None,
                 max_length: int | None = None, return_tensors: str | None = "pt") -> Any:
        from transformers import BatchFeature

        if images is None or (isinstance(images, (list, tuple)) and not images):
            enc = self.tokenizer(text, return_tensors=return_tensors, padding=padding, truncation=truncation,
                                 max_length=max_length)
            return BatchFeature(data=dict(enc))
        if not isinstance(text, str):
            if len(text) != 1:
                raise TypeError("Phi-3-V's processor takes ONE prompt string with its images (as the hub's does); "
                                f"got {len(text)} strings: call it once per prompt")
            text = text[0]
        pix = self.image_processor(images)
        ids = [int(t[len("<|image_"):-2]) for t in IMAGE_TAG.findall(text)]
        n = len(pix["num_img_tokens"])
        if sorted(set(ids)) != list(range(1, len(set(ids)) + 1)) or len(set(ids)) != n:
            raise ValueError(f"Phi-3-V prompt image tags {sorted(set(ids))} must be <|image_1|> .. <|image_{n}|> "
                             f"for {n} image(s)")
        chunks = [list(self.tokenizer(c)["input_ids"]) for c in IMAGE_TAG.split(text)]  # each with its BOS
        input_ids: list[int] = list(chunks[0])
        for tag, chunk in zip(ids, chunks[1:]):
            input_ids += [-tag] * pix["num_img_tokens"][tag - 1] + chunk
        t = torch.tensor([input_ids], dtype=torch.long)
        return BatchFeature(data={"input_ids": t, "attention_mask": (t > -1000000).long(),
                                  "pixel_values": pix["pixel_values"], "image_sizes": pix["image_sizes"]})

    def save_pretrained(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(str(path))
        self.image_processor.save_pretrained(path)

    def batch_decode(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer.decode(*args, **kwargs)
