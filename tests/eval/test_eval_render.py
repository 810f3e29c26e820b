"""Caption rendering for I2I: canvas, margins, wrapping, vertical centring, caching, font choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from eval.render import CaptionRenderer, RenderSpec


@pytest.fixture()
def renderer(tmp_path: Path) -> CaptionRenderer:
    return CaptionRenderer(RenderSpec(), tmp_path / "rendered")


def _ink(path: Path) -> np.ndarray:
    arr = np.asarray(Image.open(path).convert("L"))
    return arr < 128


def test_canvas_margins_and_centring(renderer: CaptionRenderer) -> None:
    p = renderer.render("A dog runs on the beach.")
    img = Image.open(p)
    assert img.size == (800, 400) and img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255)
    ink = _ink(p)
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    assert cols.min() >= 20 and cols.max() < 780
    top, bottom = rows.min(), 400 - 1 - rows.max()
    assert abs(top - bottom) < 20  # block centred vertically (line box vs ink differ by a few px)


def test_long_captions_wrap_within_760px(renderer: CaptionRenderer) -> None:
    text = " ".join(["photograph"] * 30)
    lines = renderer.wrap(text, __import__("PIL.ImageDraw", fromlist=["Draw"]).Draw(Image.new("RGB", (1, 1))))
    assert len(lines) > 3 and "".join(lines) == text + " "  # the release keeps a space after every word
    ink = _ink(renderer.render(text))
    assert np.flatnonzero(ink.any(0)).max() < 20 + 760
    ys = [y for _, y in renderer.layout(text, ImageDraw.Draw(Image.new("RGB", (1, 1))))]
    assert len(ys) == len(lines) and all(b > a for a, b in zip(ys, ys[1:]))  # lines stacked top to bottom
    rows = np.flatnonzero(ink.any(1))
    assert rows.min() >= ys[0] and rows.max() < 400  # (release layout: line pitch = ink height, bands touch)


def test_rendered_images_are_cached(renderer: CaptionRenderer, tmp_path: Path) -> None:
    paths = renderer.render_all(["one caption", "two captions", "one caption"], progress=False)
    assert paths[0] == paths[2] and paths[0] != paths[1]
    mtime = paths[0].stat().st_mtime_ns
    again = CaptionRenderer(RenderSpec(), tmp_path / "rendered").render_all(["one caption"], progress=False)
    assert again[0] == paths[0] and again[0].stat().st_mtime_ns == mtime  # not redrawn
    bigger = CaptionRenderer(RenderSpec(font_size=30), tmp_path / "rendered")
    assert bigger.path_for("one caption") != paths[0]  # parameters are part of the key


def test_font_is_reported_and_configurable(renderer: CaptionRenderer, tmp_path: Path) -> None:
    d = renderer.describe()
    assert d["font"].startswith("DejaVu Sans") and d["paper_font"] == "Arial" and len(d["font_sha256"]) == 16
    with pytest.raises(FileNotFoundError, match="render.font=.*Arial"):
        CaptionRenderer(RenderSpec(font=str(tmp_path / "Arial.ttf")), tmp_path)
