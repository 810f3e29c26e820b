"""Image loading with clear errors: every failure names the file; every mode ends up RGB.

Mode handling matches what the Hugging Face image processors do for RGB conversion (alpha composited
on white) and adds what they get wrong: 16/32-bit and float images are scaled to 8 bits instead of
being clipped to white, CMYK goes through PIL's conversion. PIL's decompression-bomb limit is kept.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from e5v.errors import DataError

ImageLike = Union[Image.Image, str, os.PathLike]


class BadImageError(DataError):
    """An image could not be read or decoded. ``source`` names the file (or the input index)."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"bad image {source}: {reason}")


def describe(image: Any, index: int | None = None) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    name = getattr(image, "filename", None)  # set by Image.open(path), or by callers for in-memory bytes
    if isinstance(name, str) and name:
        return name
    where = f"input #{index}" if index is not None else "input"
    return f"{where} ({type(image).__name__})"


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (transparent pixels become white)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            arr = arr / 257.0  # 0..65535 -> 0..255
        elif arr.size and arr.max() > 255:
            arr = arr * (255.0 / arr.max())
        image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    if image.mode == "CMYK":
        return image.convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(image: ImageLike, index: int | None = None) -> Image.Image:
    """Open lazily (header only) to learn the size; raises :class:`BadImageError` naming the file."""
    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(
            f"image at index {index} is a {type(image).__name__}; expected a PIL image or a file path"
        )
    path = Path(image)
    if not path.is_file():
        raise BadImageError(str(path), "file not found" if not path.exists() else "not a regular file")
    if path.stat().st_size == 0:
        raise BadImageError(str(path), "file is empty (0 bytes)")
    try:
        return Image.open(path)
    except Image.DecompressionBombError as e:
        raise BadImageError(str(path), f"decompression bomb refused by PIL's limit ({e})") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise BadImageError(str(path), f"cannot identify image ({e})") from e


def load_image(image: ImageLike, index: int | None = None) -> Image.Image:
    """Fully decode and convert to RGB; raises :class:`BadImageError` naming the file."""
    img = open_image(image, index)
    try:
        img.load()
        return to_rgb(img)
    except Image.DecompressionBombError as e:
        raise BadImageError(describe(image, index), f"decompression bomb refused by PIL's limit ({e})") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImageError(describe(image, index), f"corrupt or truncated image data ({e})") from e
