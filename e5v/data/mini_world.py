"""A tiny procedural world: scenes of one to three coloured shapes with captions.

Deterministic from a seed. The demo uses it now; the workflow and mini-replication work extend it
(modification texts, rendered captions, STS pairs, NLI triplets) rather than writing a second one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 170),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.18, "large": 0.34}
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5)}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    position: str

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]

    def caption(self) -> str:
        parts = [f"{o.phrase()} at the {o.position}" for o in self.objects]
        return (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]).capitalize() + "."

    def render(self, width: int = 96, height: int = 96) -> Image.Image:
        img = Image.new("RGB", (width, height), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        for o in self.objects:
            cx, cy = POSITIONS[o.position]
            cx, cy, r = cx * width, cy * height, SIZES[o.size] * min(width, height) / 2
            box = (cx - r, cy - r, cx + r, cy + r)
            fill = COLOURS[o.colour]
            if o.shape == "circle":
                draw.ellipse(box, fill=fill)
            elif o.shape == "square":
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        return img


def sample_scenes(n: int, seed: int = 0, max_objects: int = 2) -> list[Scene]:
    """``n`` distinct scenes (distinct captions), deterministic from ``seed``."""
    rng = random.Random(seed)
    scenes: list[Scene] = []
    seen: set[str] = set()
    while len(scenes) < n:
        k = rng.randint(1, max_objects)
        positions = rng.sample(sorted(POSITIONS), k)
        objs = tuple(
            Obj(rng.choice(SHAPES), rng.choice(sorted(COLOURS)), rng.choice(sorted(SIZES)), p) for p in positions
        )
        s = Scene(objs)
        if s.caption() not in seen:
            seen.add(s.caption())
            scenes.append(s)
    return scenes
