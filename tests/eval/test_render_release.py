"""I2I caption rendering matches the released code's layout (``create_text_image`` in kongds/E5-V
``retrieval.py``), written out here independently as the reference, pixel for pixel.

The release: lines wrapped greedily while ``textlength(line + word) <= 800 - 40`` with a space kept
after every word; each line's height ``textbbox[3] - textbbox[1]``; the block centred with
``(400 - total) // 2``; lines drawn at x = 20. (Font: the release uses Arial; these tests use the
default DejaVu Sans for both sides, so only the layout arithmetic is compared.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from eval import render
from eval.render import CaptionRenderer, RenderSpec

TWO_LINES = "A brown dog with a red collar runs along the sandy beach."
CAPTIONS = [
    TWO_LINES,
    "Two people.",
    "A group of young children play soccer in a grassy park while their parents watch from the benches nearby.",
    "quick jumpy fox",  # no descender on any glyph: ink height < font size
]


def _reference(text: str, font: ImageFont.FreeTypeFont, bottom_only: bool = False) -> tuple[np.ndarray, list[int]]:
    """The release's arithmetic (or, with ``bottom_only``, the old ``textbbox[3]`` line height)."""
    img = Image.new("RGB", (800, 400), (255, 255, 255))
    d = ImageDraw.Draw(img)
    rows, cur = [], ""
    for w in text.split():
        if d.textlength(cur + w, font=font) <= 760:
            cur += w + " "
        else:
            rows.append(cur)
            cur = w + " "
    if cur:
        rows.append(cur)
    boxes = [d.textbbox((0, 0), r, font=font) for r in rows]
    heights = [b[3] if bottom_only else b[3] - b[1] for b in boxes]
    ys = [(400 - sum(heights)) // 2 + sum(heights[:i]) for i in range(len(rows))]
    for r, y in zip(rows, ys):
        d.text((20, y), r if not bottom_only else r.rstrip(), font=font, fill=(0, 0, 0))
    return np.asarray(img), ys


@pytest.fixture()
def renderer(tmp_path: Path) -> CaptionRenderer:
    return CaptionRenderer(RenderSpec(), tmp_path / "rendered")


@pytest.mark.parametrize("text", CAPTIONS)
def test_pixels_equal_the_release_layout(renderer: CaptionRenderer, text: str) -> None:
    ref, ys = _reference(text, renderer.font)
    ours = np.asarray(renderer.draw(text))
    assert ours.shape == (400, 800, 3)
    assert np.array_equal(ours, ref), f"{int((ours != ref).any(-1).sum())} pixels differ from the release layout"
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert [y for _, y in renderer.layout(text, draw)] == ys


def test_two_line_caption_ink_box_follows_the_formula(renderer: CaptionRenderer) -> None:
    """Ink rows of a 2-line caption: top = (400 - h0 - h1)//2 + top0, bottom from line 2's box."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = renderer.wrap(TWO_LINES, draw)
    assert len(lines) == 2 and all(ln.endswith(" ") for ln in lines)
    (l0, t0, r0, b0), (l1, t1, r1, b1) = (draw.textbbox((0, 0), ln, font=renderer.font) for ln in lines)
    y0 = (400 - (b0 - t0) - (b1 - t1)) // 2
    y1 = y0 + (b0 - t0)
    ink = np.asarray(renderer.draw(TWO_LINES).convert("L")) < 255
    rows = np.flatnonzero(ink.any(1))
    assert rows.min() == y0 + t0 and rows.max() == y1 + b1 - 1
    cols = np.flatnonzero(ink.any(0))
    assert cols.min() >= 20 + min(l0, l1) and cols.max() < 20 + 760


def test_the_reference_tells_the_old_line_height_apart(renderer: CaptionRenderer) -> None:
    """Guard: the pre-fix formula (``textbbox[3]``) gives other pixels, so the tests above would catch it."""
    new, _ = _reference(TWO_LINES, renderer.font)
    old, _ = _reference(TWO_LINES, renderer.font, bottom_only=True)
    assert (new != old).any(-1).sum() > 1000


def test_overlong_word_terminates_on_its_own_line(renderer: CaptionRenderer) -> None:
    word = "W" * 40  # wider than 760 px: the release's loop never ends
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    assert renderer.wrap(f"a {word} b", draw) == ["a ", word + " ", "b "]
    assert renderer.draw("") is not None and renderer.wrap("   ", draw) == []


def test_renderings_of_an_older_layout_are_not_reused(
    renderer: CaptionRenderer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert render.RENDER_VERSION >= 2  # 1 drew with the wrong line height
    new = renderer.path_for(TWO_LINES)
    monkeypatch.setattr(render, "RENDER_VERSION", 1)
    old = CaptionRenderer(RenderSpec(), tmp_path / "rendered").path_for(TWO_LINES)
    assert old != new
    assert "textbbox[3] - textbbox[1]" in renderer.describe()["layout"]
