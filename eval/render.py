"""Render captions as images for the image-image (I2I) benchmarks, cached on disk.

The protocol (paper Table 4) with the released code's layout arithmetic (``create_text_image`` in
the release's ``retrieval.py``), reproduced step for step: a white 800x400 RGB canvas; greedy word
wrap where a word joins the line while ``textlength(line + word) <= width - 40`` and each line keeps
the trailing space the release appends; every line's height is ``textbbox[3] - textbbox[1]`` (its
ink height, not its bottom edge); the block of those heights is centred with ``(height - total) // 2``;
lines are drawn at x = 20 in black, each ``y`` advanced by its line's height. Two deviations remain:

- font: the release ships and uses Arial (``arial.ttf``); by default we use DejaVu Sans (shipped by
  matplotlib, freely licensed); ``render.font=/path/to/arial.ttf`` gives the release's pixels.
  Every report names the font and its hash.
- a single word wider than the wrap width: the release loops forever; here it gets a line of its own
  (drawn past the right margin).

A rendered image is stored once under ``<cache>/rendered/<key>.png`` where the key hashes the text,
the font file, the parameters, the layout version and the Pillow version, so I2I-Flickr30K and reruns
reuse the files, and a rendering made by an older layout is never served.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from e5v.data.atomic import atomic_write

log = logging.getLogger(__name__)

# 1: line height = textbbox bottom (wrong); 2: the release's layout (ink height, trailing spaces).
# Bump on any change to the pixels: it is part of every rendered file's cache key.
RENDER_VERSION = 2


def default_font() -> Path:
    """DejaVu Sans as installed with matplotlib (an open font close in metrics to Arial)."""
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - matplotlib is an eval requirement
        raise FileNotFoundError("no font configured and matplotlib (which ships DejaVu Sans) is missing") from e
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    if not path.is_file():  # pragma: no cover
        raise FileNotFoundError(f"DejaVu Sans not found at {path}; set render.font=/path/to/font.ttf")
    return path


@dataclass(frozen=True)
class RenderSpec:
    width: int = 800
    height: int = 400
    font_size: int = 40
    wrap_width: int = 760
    x: int = 20
    font: str | None = None  # path to a .ttf; None = DejaVu Sans

    def font_path(self) -> Path:
        if self.font in (None, "", "default"):
            return default_font()
        p = Path(os.path.expanduser(str(self.font)))
        if not p.is_file():
            raise FileNotFoundError(
                f"render.font={self.font} not found; give a .ttf path (the paper used Arial, e.g. "
                "/usr/share/fonts/truetype/msttcorefonts/Arial.ttf) or leave it null for DejaVu Sans"
            )
        return p


class CaptionRenderer:
    """Draws captions as images and caches the PNGs; ``describe()`` says which font was used."""

    def __init__(self, spec: RenderSpec, cache_dir: str | os.PathLike) -> None:
        from PIL import ImageFont

        self.spec = spec
        self.font_file = spec.font_path()
        self.font_sha = hashlib.sha256(self.font_file.read_bytes()).hexdigest()[:16]
        self.font = ImageFont.truetype(str(self.font_file), spec.font_size)
        self.dir = Path(cache_dir)
        import PIL

        self._salt = json.dumps(
            {
                "v": RENDER_VERSION,
                "spec": {**asdict(self.spec), "font": None},
                "font": self.font_sha,
                "pil": PIL.__version__,
            },
            sort_keys=True,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "font": self.font.getname()[0] + " " + self.font.getname()[1],
            "font_file": str(self.font_file),
            "font_sha256": self.font_sha,
            "paper_font": "Arial",
            "layout": f"release create_text_image (v{RENDER_VERSION}: line height textbbox[3] - textbbox[1])",
            **{k: v for k, v in asdict(self.spec).items() if k != "font"},
        }

    def wrap(self, text: str, draw: Any) -> list[str]:
        """The release's greedy wrap: a word joins the line while ``textlength(line + word) <= wrap_width``;
        every line ends with the space appended after its last word. No words: no lines."""
        words = text.split()
        lines: list[str] = []
        while words:
            line = ""
            while words and draw.textlength(line + words[0], font=self.font) <= self.spec.wrap_width:
                line += words.pop(0) + " "
            if not line:  # a word wider than the wrap width: the release never terminates; own line here
                line = words.pop(0) + " "
            lines.append(line)
        return lines

    def layout(self, text: str, draw: Any) -> list[tuple[str, int]]:
        """(line, y) pairs: heights are ink heights ``textbbox[3] - textbbox[1]``, the block centred."""
        lines = self.wrap(text, draw)
        heights = []
        for ln in lines:
            _, top, _, bottom = draw.textbbox((0, 0), ln, font=self.font)
            heights.append(bottom - top)
        y = (self.spec.height - sum(heights)) // 2
        out = []
        for ln, h in zip(lines, heights):
            out.append((ln, y))
            y += h
        return out

    def draw(self, text: str) -> Any:
        from PIL import Image, ImageDraw

        s = self.spec
        img = Image.new("RGB", (s.width, s.height), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        for ln, y in self.layout(text, draw):
            draw.text((s.x, y), ln, font=self.font, fill=(0, 0, 0))
        return img

    def path_for(self, text: str) -> Path:
        key = hashlib.sha256((self._salt + "\x00" + text).encode("utf-8")).hexdigest()[:32]
        return self.dir / key[:2] / f"{key}.png"

    def render(self, text: str) -> Path:
        """Path of the rendered caption (drawn and written atomically on first use)."""
        path = self.path_for(text)
        if not path.is_file():
            img = self.draw(text)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            atomic_write(path, lambda f: f.write(buf.getvalue()))
        return path

    def render_all(self, texts: list[str], progress: bool = True) -> list[Path]:
        from e5v import distributed as dist

        mine = dist.shard(sorted(set(texts)))  # ranks share the drawing (same split on all)
        todo = [t for t in mine if not self.path_for(t).is_file()]
        if todo:
            it: Any = todo
            if progress and not os.environ.get("E5V_NO_PROGRESS"):
                from tqdm.auto import tqdm

                it = tqdm(todo, desc="render captions", unit="img")
            for t in it:
                self.render(t)
        dist.barrier()
        return [self.path_for(t) for t in texts]
