"""MMEB-mini: the mini world's tasks in the real MMEB-eval (V1) layout, for all four meta-tasks.

``TIGER-Lab/MMEB-eval`` holds one parquet per task, ``<Task>/test-00000-of-00001.parquet``, with four
columns: ``qry_text`` (str: the task instruction, the query text, and the ``<|image_1|>`` placeholder
first when the query has an image), ``qry_img_path`` (str, ``""`` when the query has no image),
``tgt_text`` (list[str]) and ``tgt_img_path`` (list[str], ``""`` for a text-only candidate): each query's
own candidate list, the ground truth FIRST. Images come from the dataset's image archive; here they lie
under ``<root>/images/`` at the path the parquet names (:data:`IMAGE_DIR`, :func:`image_file`).

Thirteen tasks, three or four per meta-task, each mirroring a real V1 task's form and instruction wording (the
VLM2Vec paper's Tables 7-10), in-distribution (IND) or out-of-distribution (OOD) as the real one is:

=================  ==============  =====  ===================  ==================================================
task               meta-task       split  mirrors              query -> target (candidates)
=================  ==============  =====  ===================  ==================================================
MiniShape          classification  IND    ImageNet-1K          image -> its objects' shape (3 shapes)
MiniColour         classification  IND    VOC2007              image -> its objects' colour (6 colours)
MiniObject         classification  OOD    ObjectNet            image -> "<colour> <shape>" (18 classes)
MiniColour-VQA     vqa             IND    OK-VQA               image + "What colour is the <shape>?" (6)
MiniPosition-VQA   vqa             IND    Visual7W             image + "Where is the <object>?" (5 places)
MiniCount-VQA      vqa             OOD    GQA                  image + "How many <shape>s ...?" (zero..three)
MiniScene_t2i      retrieval       IND    MSCOCO_t2i           caption -> image (``candidates``)
MiniScene_i2t      retrieval       IND    MSCOCO_i2t           image -> caption (``candidates``)
MiniEdit           retrieval       IND    CIRR                 image + edit -> edited image (``candidates``)
MiniNews           retrieval       OOD    EDIS                 paraphrase -> image + short text (``candidates``)
MiniGrounding      grounding       IND    MSCOCO               image + "labeled as <shape>" -> its crop
MiniRefExp         grounding       OOD    RefCOCO              image + "the object on the left" -> its crop
MiniPointing       grounding       OOD    Visual7W-Pointing    image + "Which object is <colour>?" -> its crop
=================  ==============  =====  ===================  ==================================================

Chance (a random embedding's expected Hit@1) is exact: the mean over queries of 1/len(candidates)
(:func:`chance_levels` reads it back from the files; :func:`task_table` states it from the sizes).
Candidate lists never hold two equal candidates (same text and same image), nor two crops of objects that
look alike (same shape, colour and size).

Disjoint from the rest of the mini world: every MMEB-mini scene shows THREE objects (the caption
retrieval scenes, CIRR/FashionIQ images and training pairs show at most two), drawn from its own seed stream
(``seed + MMEB_SEED_OFFSET``, one per task), none twice, and none of the scenes of the ``tiny_world``
backbone's pretraining pool (:func:`reserved_captions`). Objects never overlap; a grounding candidate is a
square crop around one object of such a scene (or, when too few queries leave too few distinct-looking
objects, a crop of a lone object).

Generated once into a temporary folder renamed into place, with a marker (:data:`MARKER`) recording the
version, seed and sizes; a folder without the marker (a user's data) is never written to (:func:`ensure`).
``suite=mini`` generates it inside the mini data (``<suite.mini.dir>/mmeb``, sizes
``suite.mini.mmeb_queries`` / ``suite.mini.mmeb_candidates``) through :mod:`e5v.mini.eval_data`.
Run: ``python -m e5v.mini.mmeb_data --out data/mini_mmeb [--seed 0] [--queries 8] [--candidates 8]``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from e5v.data.atomic import ensure_generated_dir
from e5v.errors import ConfigError
from e5v.mini.world import COLOURS, POSITIONS, SHAPES, SIZES, Obj, Scene, paraphrase

log = logging.getLogger(__name__)

MMEB_VERSION = 1
MARKER = "mini_mmeb.json"
PARQUET = "test-00000-of-00001.parquet"
IMAGE_DIR = "images"  # images under <root>/images/, at the path the parquet names
COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
IMAGE_TOKEN = "<|image_1|>"  # the real data's placeholder (Phi-3-V's image token), first in the text
DEFAULTS: dict[str, int] = {"queries": 8, "candidates": 8}
MMEB_SEED_OFFSET = 9000  # the MMEB-mini scene stream: seed + MMEB_SEED_OFFSET
PX = 96  # scene images are PX x PX
CROP = 0.42  # a crop is a CROP*PX square around the object's centre (a large object's diameter is 0.34)

# tiny_world's pretraining pool (e5v.mini.pretrain.examples: sample_scenes(RECIPE["pool"], seed + 100, 3));
# kept here so that generating data never imports torch (tests/test_mini_mmeb.py checks they agree)
PRETRAIN_POOL, PRETRAIN_SEED_OFFSET = 1200, 100

META_TASKS = ("classification", "vqa", "retrieval", "grounding")


@dataclass(frozen=True)
class MiniTask:
    name: str
    meta: str  # one of META_TASKS
    ood: bool  # out-of-distribution in the real benchmark's sense
    mirrors: str  # the real MMEB-V1 task whose form it takes


TASKS: tuple[MiniTask, ...] = (
    MiniTask("MiniShape", "classification", False, "ImageNet-1K"),
    MiniTask("MiniColour", "classification", False, "VOC2007"),
    MiniTask("MiniObject", "classification", True, "ObjectNet"),
    MiniTask("MiniColour-VQA", "vqa", False, "OK-VQA"),
    MiniTask("MiniPosition-VQA", "vqa", False, "Visual7W"),
    MiniTask("MiniCount-VQA", "vqa", True, "GQA"),
    MiniTask("MiniScene_t2i", "retrieval", False, "MSCOCO_t2i"),
    MiniTask("MiniScene_i2t", "retrieval", False, "MSCOCO_i2t"),
    MiniTask("MiniEdit", "retrieval", False, "CIRR"),
    MiniTask("MiniNews", "retrieval", True, "EDIS"),
    MiniTask("MiniGrounding", "grounding", False, "MSCOCO"),
    MiniTask("MiniRefExp", "grounding", True, "RefCOCO"),
    MiniTask("MiniPointing", "grounding", True, "Visual7W-Pointing"),
)
TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)

# Instructions: the real V1 tasks' wording (VLM2Vec paper, Tables 7-10), image placeholder first.
_CLS = {
    "MiniShape": "Represent the given image for classification",
    "MiniColour": "Identify the colour shown in the image.",
    "MiniObject": "Identify the object shown in the image.",
}
_VQA = "Represent the given image with the following question: "
_T2I = "Find me an everyday image that matches the given caption: "
_I2T = "Find an image caption describing the given everyday image."
_NEWS = "Find a news image that matches the provided caption: "
_TGT_NEWS = f"{IMAGE_TOKEN}\nRepresent the given image with related text information: "
_CIR = "Given an image, find a similar everyday image with the given modification: "
_TGT_IMAGE = f"{IMAGE_TOKEN}\nRepresent the given image."
_VG_LABEL = 'Select the portion of the image that isolates the object labeled as "{}"'
_VG_REF = "Select the portion of the image that follows the language expressions: {}"
_VG_POINT = "Select the portion of the image that answers the given question: {}"
_TGT_CROP = f"{IMAGE_TOKEN}\nRepresent the given cropped image of the object"

_PLACE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
          "center": "in the middle"}
_MOVE = {"left": "to the left", "right": "to the right", "top": "to the top", "bottom": "to the bottom",
         "center": "to the middle"}
_COUNT = ("zero", "one", "two", "three")


def _with_image(text: str) -> str:
    return f"{IMAGE_TOKEN}\n{text}"


# ---------------------------------------------------------------------- the task table
def chance(task: str | MiniTask, candidates: int = DEFAULTS["candidates"]) -> float:
    """Expected Hit@1 of random embeddings on ``task`` (every query of a task has as many candidates)."""
    t = task if isinstance(task, MiniTask) else _task(task)
    return 1.0 / n_candidates(t.name, candidates)


def n_candidates(task: str, candidates: int = DEFAULTS["candidates"]) -> int:
    """How many candidates each query of ``task`` has: the whole label set for classification and VQA,
    ``candidates`` for retrieval and grounding."""
    fixed = {"MiniShape": len(SHAPES), "MiniColour": len(COLOURS), "MiniObject": len(SHAPES) * len(COLOURS),
             "MiniColour-VQA": len(COLOURS), "MiniPosition-VQA": len(POSITIONS), "MiniCount-VQA": len(_COUNT)}
    _task(task)
    return fixed.get(task, int(candidates))


def task_table(candidates: int = DEFAULTS["candidates"]) -> dict[str, dict[str, Any]]:
    """{task: {"meta": meta-task, "split": "ind" | "ood", "mirrors": real task, "chance": float}} for every
    MMEB-mini task, in the order of :data:`TASKS` (meta-task and split as :data:`eval.loaders.mmeb.V1_TASKS`
    names them for the real tasks)."""
    return {t.name: {"meta": t.meta, "split": "ood" if t.ood else "ind", "mirrors": t.mirrors,
                     "chance": chance(t, candidates)} for t in TASKS}


def _task(name: str) -> MiniTask:
    for t in TASKS:
        if t.name == name:
            return t
    raise KeyError(f"unknown MMEB-mini task {name!r}; known: {', '.join(TASK_NAMES)}")


# ---------------------------------------------------------------------- scenes
_RADIUS = {k: v / 2 for k, v in SIZES.items()}  # in units of the image side


def _overlap(a: Obj, b: Obj) -> bool:
    (ax, ay), (bx, by) = POSITIONS[a.position], POSITIONS[b.position]
    return ((ax - bx) ** 2 + (ay - by) ** 2) ** 0.5 < _RADIUS[a.size] + _RADIUS[b.size] + 0.02


def _fixed(fixed: dict[str, Any], attr: str, i: int) -> str | None:
    values = fixed.get(attr)
    return None if values is None else values[i]


class _Sampler:
    """Three-object scenes, none drawn twice and none in ``reserved``; objects never overlap."""

    def __init__(self, rng: random.Random, reserved: set[str]) -> None:
        self.rng = rng
        self.seen = set(reserved)

    def scene(self, ok: Callable[[Scene], bool] = lambda s: True, **fixed: Any) -> Scene:
        """A new scene whose objects take the per-object attribute lists in ``fixed`` (e.g.
        ``shape=["circle", None, None]``: None draws freely) and satisfy ``ok``."""
        rng = self.rng
        for _ in range(100_000):
            positions = rng.sample(sorted(POSITIONS), 3)
            objs = [Obj(_fixed(fixed, "shape", i) or rng.choice(SHAPES),
                        _fixed(fixed, "colour", i) or rng.choice(sorted(COLOURS)),
                        _fixed(fixed, "size", i) or rng.choice(sorted(SIZES)), p) for i, p in enumerate(positions)]
            s = Scene(tuple(objs))
            if any(_overlap(a, b) for i, a in enumerate(objs) for b in objs[i + 1:]):
                continue
            if ok(s) and s.caption() not in self.seen:
                self.seen.add(s.caption())
                return s
        raise RuntimeError("no new scene satisfies the constraints")  # pragma: no cover - 26k+ scenes exist


def reserved_captions(seed: int) -> set[str]:
    """Captions of scenes used elsewhere in the mini world that could have three objects: the
    ``tiny_world`` pretraining pools of the shipped build (seed 0) and of ``seed``. (Every other mini
    evaluation or training image shows at most two objects.)"""
    from e5v.mini.world import sample_scenes

    out: set[str] = set()
    for s in sorted({0, int(seed)}):
        out |= {sc.caption() for sc in sample_scenes(PRETRAIN_POOL, seed=s + PRETRAIN_SEED_OFFSET, max_objects=3)}
    return out


def _crop(scene_img: Any, o: Obj) -> Any:
    cx, cy = POSITIONS[o.position]
    half = CROP * PX / 2
    x0 = min(max(cx * PX - half, 0), PX - 2 * half)
    y0 = min(max(cy * PX - half, 0), PX - 2 * half)
    return scene_img.crop((round(x0), round(y0), round(x0 + 2 * half), round(y0 + 2 * half)))


def _looks(o: Obj) -> tuple[str, str, str]:
    return (o.shape, o.colour, o.size)


def _plural(shape: str) -> str:
    return shape + "s"


# ---------------------------------------------------------------------- writing
class _Writer:
    """Collects one task's rows and PNG images; images are written once per path."""

    def __init__(self, root: Path, task: str) -> None:
        self.root, self.task = root, task
        self.rows: list[dict[str, Any]] = []
        self.written: set[str] = set()

    def image(self, name: str, img: Any) -> str:
        rel = f"{self.task}/Test/{name}.png"
        if rel not in self.written:
            path = image_file(self.root, rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            path.write_bytes(buf.getvalue())
            self.written.add(rel)
        return rel

    def row(self, qry_text: str, qry_img: str, tgt_text: list[str], tgt_img: list[str]) -> None:
        assert len(tgt_text) == len(tgt_img) and tgt_text, (self.task, qry_text)
        pairs = list(zip(tgt_text, tgt_img))
        assert len(set(pairs)) == len(pairs), f"{self.task}: duplicate candidates for {qry_text!r}"
        self.rows.append({"qry_text": qry_text, "qry_img_path": qry_img, "tgt_text": list(tgt_text),
                          "tgt_img_path": list(tgt_img)})

    def save(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("qry_text", pa.string()), ("qry_img_path", pa.string()),
                            ("tgt_text", pa.list_(pa.string())), ("tgt_img_path", pa.list_(pa.string()))])
        path = self.root / self.task / PARQUET
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self.rows, schema=schema), path)


def image_file(root: str | Path, rel: str) -> Path:
    """Where the image a parquet names as ``rel`` lies under the data root."""
    return Path(root) / IMAGE_DIR / rel


def _label_candidates(rng: random.Random, gt: str, labels: list[str]) -> list[str]:
    """The ground truth first, then every other label in a seeded order."""
    rest = [x for x in labels if x != gt]
    rng.shuffle(rest)
    return [gt, *rest]


# ---------------------------------------------------------------------- the tasks
def _classification(w: _Writer, smp: _Sampler, rng: random.Random, n: int) -> None:
    if w.task == "MiniShape":
        labels = list(SHAPES)
        fix = lambda lab: {"shape": [lab] * 3}  # noqa: E731
    elif w.task == "MiniColour":
        labels = sorted(COLOURS)
        fix = lambda lab: {"colour": [lab] * 3}  # noqa: E731
    else:
        labels = [f"{c} {s}" for c in sorted(COLOURS) for s in SHAPES]
        fix = lambda lab: {"colour": [lab.split()[0]] * 3, "shape": [lab.split()[1]] * 3}  # noqa: E731
    order = labels[:]
    rng.shuffle(order)
    for i in range(n):
        gt = order[i % len(order)]
        s = smp.scene(**fix(gt))
        img = w.image(f"q{i:04d}", s.render(PX, PX))
        cands = _label_candidates(rng, gt, labels)
        w.row(_with_image(_CLS[w.task]), img, cands, [""] * len(cands))


def _vqa(w: _Writer, smp: _Sampler, rng: random.Random, n: int) -> None:
    for i in range(n):
        if w.task == "MiniColour-VQA":  # the asked shape occurs once
            shape = SHAPES[i % len(SHAPES)]
            others = [x for x in SHAPES if x != shape]
            s = smp.scene(shape=[shape, rng.choice(others), rng.choice(others)])
            o = next(o for o in s.objects if o.shape == shape)
            q, gt, labels = f"What colour is the {shape}?", o.colour, sorted(COLOURS)
        elif w.task == "MiniPosition-VQA":  # the asked object (colour and shape) occurs once
            s = smp.scene(ok=lambda sc: len({(o.colour, o.shape) for o in sc.objects}) == 3)
            o = s.objects[rng.randrange(3)]
            q, gt, labels = f"Where is the {o.colour} {o.shape}?", o.position, sorted(POSITIONS)
        else:  # MiniCount-VQA: 0..3 objects of the asked shape, balanced
            shape, count = SHAPES[(i // len(_COUNT)) % len(SHAPES)], i % len(_COUNT)
            others = [x for x in SHAPES if x != shape]
            shapes = [shape] * count + [rng.choice(others) for _ in range(3 - count)]
            rng.shuffle(shapes)
            s = smp.scene(shape=shapes)
            q, gt, labels = f"How many {_plural(shape)} are in the image?", _COUNT[count], list(_COUNT)
        img = w.image(f"q{i:04d}", s.render(PX, PX))
        cands = _label_candidates(rng, gt, labels)
        w.row(_with_image(_VQA + q), img, cands, [""] * len(cands))


def _edit(s: Scene, rng: random.Random) -> list[tuple[Scene, str]]:
    """One-attribute edits of one object of ``s`` (its objects differ in colour or shape), each with the
    modification text that asks for it; never an edit that makes two objects overlap."""
    out = []
    free = [p for p in sorted(POSITIONS) if p not in {o.position for o in s.objects}]
    for k, o in enumerate(s.objects):
        name = f"{o.colour} {o.shape}"
        new_colour = rng.choice([c for c in sorted(COLOURS) if c != o.colour])
        new_shape = rng.choice([x for x in SHAPES if x != o.shape])
        new_size = "small" if o.size == "large" else "large"
        edits = [(replace(o, colour=new_colour), f"make the {name} {new_colour}"),
                 (replace(o, shape=new_shape), f"turn the {name} into a {new_shape}"),
                 (replace(o, size=new_size), f"make the {name} {new_size}")]
        if free:
            p = rng.choice(free)
            edits.append((replace(o, position=p), f"move the {name} {_MOVE[p]}"))
        for new, text in edits:
            objs = list(s.objects)
            objs[k] = new
            if not any(_overlap(a, b) for i, a in enumerate(objs) for b in objs[i + 1:]):
                out.append((Scene(tuple(objs)), text))
    return out


def _retrieval(w: _Writer, smp: _Sampler, rng: random.Random, n: int, c: int) -> None:
    if w.task in ("MiniScene_t2i", "MiniScene_i2t"):
        pool = [smp.scene() for _ in range(max(n, c))]
        paths = [w.image(f"img{j:04d}", s.render(PX, PX)) for j, s in enumerate(pool)]
        for i in range(n):
            others = rng.sample([j for j in range(len(pool)) if j != i], c - 1)
            idx = [i, *others]
            if w.task == "MiniScene_t2i":
                w.row(_T2I + pool[i].caption(), "", [_TGT_IMAGE] * c, [paths[j] for j in idx])
            else:
                w.row(_with_image(_I2T), paths[i], [pool[j].caption() for j in idx], [""] * c)
        return
    if w.task == "MiniNews":  # a paraphrase -> the image with a short text naming its objects (no places)
        pool = [smp.scene() for _ in range(max(n, c))]
        paths = [w.image(f"img{j:04d}", s.render(PX, PX)) for j, s in enumerate(pool)]
        texts = [_TGT_NEWS + "Some shapes: " + ", ".join(f"{o.colour} {o.shape}" for o in s.objects) + "."
                 for s in pool]
        for i in range(n):
            idx = [i, *rng.sample([j for j in range(len(pool)) if j != i], c - 1)]
            w.row(_NEWS + paraphrase(pool[i], rng), "", [texts[j] for j in idx], [paths[j] for j in idx])
        return
    # MiniEdit: reference + modification -> the edited scene; candidates: the target, other edits of the
    # same reference (at most two: the hard negatives), then edits of other references (the gallery)
    refs = [smp.scene(ok=lambda sc: len({(o.colour, o.shape) for o in sc.objects}) == 3) for _ in range(n)]
    edits = []
    for r in refs:
        options = [(e, t) for e, t in _edit(r, rng) if e.caption() not in smp.seen]
        rng.shuffle(options)
        edits.append(options)
        for e, _ in options[:3]:
            smp.seen.add(e.caption())
    rendered: dict[str, str] = {}

    def path(s: Scene) -> str:
        if s.caption() not in rendered:
            rendered[s.caption()] = w.image(f"img{len(rendered):04d}", s.render(PX, PX))
        return rendered[s.caption()]

    gallery = [e for opts in edits for e, _ in opts[:1]]
    for i, r in enumerate(refs):
        (target, text), *hard = edits[i][:3]
        cands = [target, *[h for h, _ in hard]][:c]
        pool = [g for j, g in enumerate(gallery) if j != i and g.caption() not in {x.caption() for x in cands}]
        extra = c - len(cands)
        if extra > len(pool):
            pool += [smp.scene() for _ in range(extra - len(pool))]
        cands += rng.sample(pool, extra)
        w.row(_with_image(_CIR + text), path(r), [_TGT_IMAGE] * c, [path(x) for x in cands])


def _grounding(w: _Writer, smp: _Sampler, rng: random.Random, n: int, c: int) -> None:
    scenes: list[Scene] = []
    for _ in range(n):
        if w.task == "MiniGrounding":  # three shapes: each object is named by its shape
            scenes.append(smp.scene(shape=rng.sample(SHAPES, 3)))
        elif w.task == "MiniRefExp":  # three different-looking objects, named by their place
            scenes.append(smp.scene(ok=lambda sc: len({_looks(o) for o in sc.objects}) == 3))
        else:  # MiniPointing: three colours, the question asks for one
            scenes.append(smp.scene(colour=rng.sample(sorted(COLOURS), 3)))
    images = [s.render(PX, PX) for s in scenes]
    every_look = [(sh, co, sz) for sh in SHAPES for co in sorted(COLOURS) for sz in sorted(SIZES)]
    fillers: dict[tuple[str, str, str], str] = {}
    for i, s in enumerate(scenes):
        k = rng.randrange(3)
        o = s.objects[k]
        if w.task == "MiniGrounding":
            q = _VG_LABEL.format(o.shape)
        elif w.task == "MiniRefExp":
            q = _VG_REF.format(f"the object {_PLACE[o.position]}")
        else:
            q = _VG_POINT.format(f"Which object is {o.colour}?")
        # the target, the image's other two objects, then crops of the other query images' objects that
        # look unlike every one chosen so far; single-object fillers when those run out
        chosen = [(i, k)] + [(i, j) for j in range(3) if j != k]
        chosen = chosen[:c]
        looks = {_looks(s.objects[j]) for _, j in chosen}
        others = [(si, j) for si in range(len(scenes)) if si != i for j in range(3)]
        rng.shuffle(others)
        for si, j in others:
            if len(chosen) == c:
                break
            if _looks(scenes[si].objects[j]) not in looks:
                chosen.append((si, j))
                looks.add(_looks(scenes[si].objects[j]))
        paths = [w.image(f"crop{si:04d}_{j}", _crop(images[si], scenes[si].objects[j])) for si, j in chosen]
        for look in rng.sample([x for x in every_look if x not in looks], c - len(chosen)):
            if look not in fillers:
                obj = Obj(*look, "center")
                fillers[look] = w.image(f"filler_{'_'.join(look)}", _crop(Scene((obj,)).render(PX, PX), obj))
            paths.append(fillers[look])
        w.row(_with_image(q), w.image(f"q{i:04d}", images[i]), [_TGT_CROP] * c, paths)


# ---------------------------------------------------------------------- entry points
def _sizes(sizes: dict[str, Any]) -> dict[str, int]:
    unknown = set(sizes) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown MMEB-mini size(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    out = {k: int(v) for k, v in {**DEFAULTS, **sizes}.items()}
    if out["queries"] < 1:
        raise ConfigError(f"suite.mini.mmeb_queries={out['queries']}: needs at least 1 query per task")
    if not 2 <= out["candidates"] <= 36:
        raise ConfigError(f"suite.mini.mmeb_candidates={out['candidates']}: choose 2..36 candidates per query")
    return out


def generate(out: str | Path, seed: int = 0, **sizes: int) -> Path:
    """Write every MMEB-mini task into ``out`` (a new or empty folder): parquets, images, marker."""
    s = _sizes(sizes)
    n, c = s["queries"], s["candidates"]
    out = Path(out)
    reserved = reserved_captions(seed)
    for k, task in enumerate(TASKS):
        rng = random.Random(f"mmeb-mini/{seed + MMEB_SEED_OFFSET}/{task.name}")  # one stream per task
        smp = _Sampler(rng, reserved)
        w = _Writer(out, task.name)
        if task.meta == "classification":
            _classification(w, smp, rng, n)
        elif task.meta == "vqa":
            _vqa(w, smp, rng, n)
        elif task.meta == "retrieval":
            _retrieval(w, smp, rng, n, c)
        else:
            _grounding(w, smp, rng, n, c)
        w.save()
        reserved |= smp.seen  # no scene twice across tasks
    marker = {"version": MMEB_VERSION, "seed": int(seed), "sizes": s, "tasks": task_table(c)}
    (out / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    return out


def _want(seed: int, sizes: dict[str, int]) -> dict[str, Any]:
    s = _sizes(sizes)
    return {"version": MMEB_VERSION, "seed": int(seed), "sizes": s, "tasks": task_table(s["candidates"])}


def ensure(out: str | Path, seed: int = 0, **sizes: int) -> Path:
    """MMEB-mini in ``out``, generated on first use (built aside, renamed into place) and reused while its
    marker matches; regenerated when the marker records other sizes or seed. A non-empty folder without
    the marker is somebody's data: it is never written to (DataError naming it)."""
    return ensure_generated_dir(out, MARKER, _want(seed, sizes), lambda tmp: generate(tmp, seed=seed, **sizes),
                                "MMEB-mini data", "point the mini data (suite.mini.dir / --out) at another folder",
                                ".mmeb-mini-", ("version", "seed", "sizes"))


def read_task(root: str | Path, task: str) -> list[dict[str, Any]]:
    """A task's rows as written (column -> value), for tests and checks."""
    import pyarrow.parquet as pq

    return pq.read_table(Path(root) / task / PARQUET).to_pylist()


def chance_levels(root: str | Path, tasks: list[str] | None = None) -> dict[str, float]:
    """Each task's exact chance level read from its parquet: the mean over queries of 1/len(candidates)."""
    out = {}
    for t in tasks or TASK_NAMES:
        rows = read_task(root, t)
        out[t] = sum(1.0 / len(r["tgt_text"]) for r in rows) / len(rows)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Generate MMEB-mini (the real MMEB-eval V1 layout, 13 tasks).")
    ap.add_argument("--out", type=Path, required=True, help="folder to create (e.g. data/mini_mmeb)")
    ap.add_argument("--seed", type=int, default=0)
    for key, val in DEFAULTS.items():
        ap.add_argument(f"--{key}", type=int, default=val)
    args = ap.parse_args(argv)
    path = ensure(args.out, seed=args.seed, **{k: getattr(args, k) for k in DEFAULTS})
    print(f"MMEB-mini data in {path}: {', '.join(TASK_NAMES)}")


if __name__ == "__main__":
    main()
