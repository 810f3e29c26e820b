"""A tiny procedural world: scenes of one to three coloured shapes with captions.

Deterministic from a seed. Everything else in :mod:`e5v.mini` is made from it: the evaluation data
(:mod:`e5v.mini.eval_data`), the training data (:mod:`e5v.mini.train_data`) and the pretraining of the
``tiny_world`` backbone (:mod:`e5v.mini.pretrain`); here are the scenes, their captions, paraphrases,
one-attribute contradictions, NLI triplets and graded STS pairs.
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


def sample_scenes(n: int, seed: int = 0, max_objects: int = 2, exclude: set[str] | None = None) -> list[Scene]:
    """``n`` distinct scenes (distinct captions), deterministic from ``seed``; captions in ``exclude`` are
    never drawn."""
    rng = random.Random(seed)
    scenes: list[Scene] = []
    seen: set[str] = set(exclude or ())
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


def scene_count(max_objects: int = 2) -> int:
    """How many distinct scenes (captions) have at most ``max_objects`` objects."""
    n_pos, n_obj = len(POSITIONS), len(SHAPES) * len(COLOURS) * len(SIZES)
    total, ordered = 0, 1
    for k in range(1, max_objects + 1):
        ordered *= n_pos - k + 1  # positions are drawn in order: P(n_pos, k) placements
        total += ordered * n_obj**k
    return total


# Training scenes come from their own seed stream, never from the evaluation one. The mini evaluation
# world (``e5v.mini.eval_data``) takes its caption-retrieval scenes from ``sample_scenes(2 * images + 8,
# seed)``; the first EVAL_HELD_OUT scenes of that stream (images <= 128) are held out of training.
TRAIN_SEED_OFFSET = 5000
EVAL_HELD_OUT = 264


def training_scenes(n: int, seed: int = 0, max_objects: int = 2, held_out: int = EVAL_HELD_OUT) -> list[Scene]:
    """``n`` distinct scenes for TRAINING: drawn from the stream ``seed + TRAIN_SEED_OFFSET``, none of
    them among the first ``held_out`` scenes of the evaluation stream ``sample_scenes(..., seed)``."""
    reserved = {s.caption() for s in sample_scenes(held_out, seed=seed, max_objects=max_objects)} if held_out else set()
    room = scene_count(max_objects) - len(reserved)
    if n > room:
        raise ValueError(f"only {room} distinct training scenes exist with max_objects={max_objects}; asked for {n}")
    return sample_scenes(n, seed=seed + TRAIN_SEED_OFFSET, max_objects=max_objects, exclude=reserved)


# ---------------------------------------------------------------------- text variations (NLI, STS)
SYNONYMS = {"large": "big", "small": "little", "center": "middle"}
POSITION_PHRASES = {
    "left": ("at the left", "on the left side"),
    "right": ("at the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("at the center", "in the middle"),
}


def paraphrase(scene: Scene, rng: random.Random) -> str:
    """A different sentence with the same meaning: reordered objects, synonyms, other position phrases."""
    objs = list(scene.objects)
    rng.shuffle(objs)
    parts = []
    for o in objs:
        size = SYNONYMS.get(o.size, o.size) if rng.random() < 0.7 else o.size
        pos = POSITION_PHRASES[o.position][1 if rng.random() < 0.7 else 0]
        parts.append(f"{'there is ' if not parts else ''}a {size} {o.colour} {o.shape} {pos}")
    text = ", and ".join(parts)
    return text[0].upper() + text[1:] + "."


def contradict(scene: Scene, rng: random.Random) -> Scene:
    """The scene with one attribute of one object changed (colour, shape, size or position)."""
    objs = list(scene.objects)
    i = rng.randrange(len(objs))
    o = objs[i]
    attr = rng.choice(["colour", "shape", "size", "position"])
    if attr == "colour":
        o = Obj(o.shape, rng.choice([c for c in sorted(COLOURS) if c != o.colour]), o.size, o.position)
    elif attr == "shape":
        o = Obj(rng.choice([s for s in SHAPES if s != o.shape]), o.colour, o.size, o.position)
    elif attr == "size":
        o = Obj(o.shape, o.colour, "small" if o.size == "large" else "large", o.position)
    else:
        taken = {x.position for x in objs}
        free = [p for p in sorted(POSITIONS) if p not in taken]
        o = Obj(o.shape, o.colour, o.size, rng.choice(free) if free else o.position)
    objs[i] = o
    return Scene(tuple(objs))


def nli_triplets(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(anchor, entailment, contradiction) rows in the SimCSE layout's order: sent0, sent1, hard_neg.

    Anchors are training scenes (:func:`training_scenes`): held out from the mini evaluation world of
    the same seed, so text-only training never sees an evaluation caption or STS sentence."""
    rng = random.Random(seed + 1000)
    rows = []
    # training_scenes: never the evaluation scenes of the same seed (captions, STS sentences)
    for s in training_scenes(n, seed=seed):
        rows.append((s.caption(), paraphrase(s, rng), contradict(s, rng).caption()))
    return rows


def attribute_overlap(a: Scene, b: Scene) -> float:
    """Gold similarity in [0, 5]: share of matching (shape, colour, size, position) attributes."""
    def attrs(s: Scene) -> set[tuple[str, str]]:
        out = set()
        for o in s.objects:
            out |= {("shape", o.shape), ("colour", o.colour), ("size", o.size), ("pos", o.position)}
            out.add(("n", str(len(s.objects))))
        return out

    x, y = attrs(a), attrs(b)
    return 5.0 * len(x & y) / max(len(x | y), 1)


def sts_pairs(n: int, seed: int = 0) -> list[tuple[str, str, float]]:
    """Graded sentence pairs whose gold score follows attribute overlap (paraphrases score 5)."""
    rng = random.Random(seed + 2000)
    scenes = sample_scenes(2 * n, seed=seed)
    rows = []
    for i in range(n):
        a = scenes[i]
        r = rng.random()
        if r < 0.25:
            b, text_b = a, paraphrase(a, rng)
        elif r < 0.6:
            b = contradict(a, rng)
            text_b = b.caption()
        else:
            b = scenes[n + i]
            text_b = b.caption()
        rows.append((a.caption(), text_b, round(attribute_overlap(a, b), 3)))
    return rows
