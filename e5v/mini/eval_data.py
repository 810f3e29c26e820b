"""Generate the mini evaluation world: every benchmark's REAL on-disk format, tiny and offline.

Scenes of coloured shapes (:mod:`e5v.mini.world`) become:

* ``flickr30k/data/test-00000-of-00001.parquet``: the Hugging Face layout (image bytes, caption list,
  split column with a few train rows to be filtered out);
* ``coco/dataset_coco.json`` + ``coco/val2014/*.jpg``: the Karpathy layout, some images with 6-7
  captions (so "first 5" and "all captions" differ);
* ``cirr/captions/cap.rc2.{val,test1}.json``, ``cirr/image_splits/split.rc2.{val,test1}.json``,
  ``cirr/{dev,test1}/*.png``: groups of six images differing in one attribute, edit captions;
* ``fashioniq/captions/cap.{dress,shirt,toptee}.val.json``, ``fashioniq/image_splits/...``,
  ``fashioniq/images/*.png``;
* ``senteval/STS/STS1{2..6}-en-test/...``, ``senteval/STS/STSBenchmark/sts-test.csv``,
  ``senteval/SICK/SICK_test_annotated.txt`` (one empty gold line, dropped as in SentEval);
* ``mmeb/<Task>/test-00000-of-00001.parquet`` + ``mmeb/images/...``: MMEB-eval's V1 layout, twelve tasks
  in four meta-tasks (:mod:`e5v.mini.mmeb_data`).

Deterministic from the seed; written once into a temporary folder and renamed into place
(:func:`ensure`, which ``suite=mini`` calls on first use); evaluation reads it with the REAL loaders
(``eval.loaders``), as it reads the downloaded datasets.
Run: ``python -m e5v.mini.eval_data --out data/mini [--seed 0] [--images 16]``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

from e5v.data.atomic import rebuild_dir
from e5v.data.senteval import STS_SUBSETS
from e5v.mini import mmeb_data
from e5v.mini.world import COLOURS, POSITIONS, SHAPES, SIZES, Obj, Scene, sample_scenes

log = logging.getLogger(__name__)

MINI_VERSION = 1
DEFAULTS: dict[str, int] = {"images": 16, "cirr_groups": 4, "fiq_images": 16, "sts_pairs": 4,
                             "mmeb_queries": 8, "mmeb_candidates": 8}

_PLACE = {
    "left": "on the left",
    "right": "on the right",
    "top": "near the top",
    "bottom": "near the bottom",
    "center": "in the middle",
}


def caption_variants(scene: Scene) -> list[str]:
    """Seven distinct descriptions of one scene (the first is the world's own caption, :meth:`Scene.caption`)."""
    objs = scene.objects
    ph = [o.phrase() for o in objs]
    where = [f"{o.phrase()} {_PLACE[o.position]}" for o in objs]
    bare = [f"{o.colour} {o.shape}" for o in objs]
    j = " and ".join
    return [
        scene.caption(),
        f"There is {j(where)}.",
        f"A picture with {j(ph)}.",
        f"An image showing {j(bare)} on white.",
        f"{j(where)}.".capitalize(),
        f"Some shapes: {', '.join(bare)}.",
        f"A white background with {j(ph)}.",
    ]


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpg(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)


# ---------------------------------------------------------------------- caption retrieval
def make_flickr(out: Path, scenes: list[Scene], extra: list[Scene]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for split, group in (("test", scenes), ("train", extra)):
        for s in group:
            name = f"{1000 + len(rows)}.jpg"
            rows.append(
                {
                    "image": {"bytes": _jpg(s.render(96, 72)), "path": name},
                    "caption": caption_variants(s)[:5],
                    "split": split,
                    "filename": name,
                }
            )
    table = pa.Table.from_pylist(rows)
    path = out / "flickr30k" / "data" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def make_coco(out: Path, scenes: list[Scene], extra: list[Scene]) -> None:
    images = []
    for i, s in enumerate(scenes + extra):
        test = i < len(scenes)
        n_caps = 5 + (i % 5 == 1) + (i % 5 == 3) * 2 if test else 5  # some test images have 6 or 7
        fname = f"COCO_val2014_{100000 + i:012d}.jpg"
        if test:
            _write(out / "coco" / "val2014" / fname, _jpg(s.render(120, 80)))
        caps = caption_variants(s)[:n_caps]
        images.append(
            {
                "filepath": "val2014",
                "filename": fname,
                "imgid": i,
                "cocoid": 100000 + i,
                "split": "test" if test else ("train" if i % 2 else "restval"),
                "sentids": list(range(10 * i, 10 * i + len(caps))),
                "sentences": [
                    {"raw": c, "tokens": c.lower().strip(".").split(), "imgid": i, "sentid": 10 * i + k}
                    for k, c in enumerate(caps)
                ],
            }
        )
    _write(out / "coco" / "dataset_coco.json", json.dumps({"images": images, "dataset": "coco"}))


# ---------------------------------------------------------------------- composed retrieval
def _variants(base: Obj, rng: random.Random) -> list[tuple[Obj, str]]:
    """Five one-attribute edits of ``base`` with the caption that asks for each."""
    colours = [c for c in sorted(COLOURS) if c != base.colour]
    shapes = [s for s in SHAPES if s != base.shape]
    other_size = "large" if base.size == "small" else "small"
    c1, c2 = rng.sample(colours, 2)
    return [
        (replace(base, colour=c1), f"make the {base.shape} {c1}"),
        (replace(base, colour=c2), f"change its colour to {c2}"),
        (replace(base, shape=shapes[0]), f"turn the {base.shape} into a {shapes[0]}"),
        (replace(base, shape=shapes[1]), f"replace it with a {base.colour} {shapes[1]}"),
        (replace(base, size=other_size), f"make it {other_size}"),
    ]


def make_cirr(out: Path, rng: random.Random, n_groups: int) -> None:
    for split, folder, groups in (("val", "dev", n_groups), ("test1", "test1", max(2, n_groups - 1))):
        names: dict[str, str] = {}
        queries = []
        for g in range(groups):
            base = Obj(
                rng.choice(SHAPES),
                rng.choice(sorted(COLOURS)),
                rng.choice(sorted(SIZES)),
                rng.choice(sorted(POSITIONS)),
            )
            members = [(base, "")] + _variants(base, rng)
            member_names = [f"{folder}-{g}-{m}-img0" for m in range(len(members))]
            for (obj, _), name in zip(members, member_names):
                names[name] = f"./{folder}/{name}.png"
                _write(out / "cirr" / folder / f"{name}.png", _png(Scene((obj,)).render(96, 96)))
            for m in rng.sample(range(1, len(members)), 4):
                q: dict[str, Any] = {
                    "pairid": 1000 * (split == "test1") + len(queries),
                    "reference": member_names[0],
                    "caption": members[m][1],
                    "img_set": {"id": g, "members": member_names, "reference_rank": 0},
                }
                if split == "val":
                    q["target_hard"] = member_names[m]
                    q["target_soft"] = {member_names[m]: 1.0}
                    q["img_set"]["target_rank"] = m
                queries.append(q)
        _write(out / "cirr" / "captions" / f"cap.rc2.{split}.json", json.dumps(queries, indent=1))
        _write(out / "cirr" / "image_splits" / f"split.rc2.{split}.json", json.dumps(names, indent=1))


def make_fashioniq(out: Path, rng: random.Random, n_images: int) -> None:
    shape_of = {"dress": "triangle", "shirt": "square", "toptee": "circle"}
    for cat, shape in shape_of.items():
        objs: list[Obj] = []
        while len(objs) < n_images:
            o = Obj(shape, rng.choice(sorted(COLOURS)), rng.choice(sorted(SIZES)), rng.choice(sorted(POSITIONS)))
            if o not in objs:
                objs.append(o)
        names = [f"B00{cat[:2].upper()}{i:04d}" for i in range(n_images)]
        for o, n in zip(objs, names):
            _write(out / "fashioniq" / "images" / f"{n}.png", _png(Scene((o,)).render(80, 96)))
        caps = []
        for _ in range(max(4, n_images - 2)):
            a, b = rng.sample(range(n_images), 2)
            src, tgt = objs[a], objs[b]
            c1 = f"is {tgt.colour}" + ("." if rng.random() < 0.5 else "")
            c2 = (
                f"is {tgt.size} and sits {_PLACE[tgt.position]}"
                if (src.size, src.position) != (tgt.size, tgt.position)
                else "looks the same otherwise"
            )
            caps.append({"target": names[b], "candidate": names[a], "captions": [c1, c2 + " "]})
        _write(out / "fashioniq" / "captions" / f"cap.{cat}.val.json", json.dumps(caps, indent=1))
        _write(out / "fashioniq" / "image_splits" / f"split.{cat}.val.json", json.dumps(names, indent=1))


# ---------------------------------------------------------------------- STS
def _sts_pair(rng: random.Random) -> tuple[str, str, float]:
    a = Obj(rng.choice(SHAPES), rng.choice(sorted(COLOURS)), rng.choice(sorted(SIZES)), rng.choice(sorted(POSITIONS)))
    b = Obj(
        rng.choice([a.shape, rng.choice(SHAPES)]),
        rng.choice([a.colour, rng.choice(sorted(COLOURS))]),
        rng.choice([a.size, rng.choice(sorted(SIZES))]),
        rng.choice([a.position, rng.choice(sorted(POSITIONS))]),
    )
    same = sum(getattr(a, f) == getattr(b, f) for f in ("shape", "colour", "size", "position"))
    s1, s2 = caption_variants(Scene((a,)))[rng.randrange(3)], caption_variants(Scene((b,)))[rng.randrange(3)]
    return s1, s2, round(5.0 * same / 4 + rng.uniform(-0.2, 0.2), 2)


def make_sts(out: Path, rng: random.Random, n_pairs: int) -> None:
    root = out / "senteval"
    for year, subsets in STS_SUBSETS.items():
        for k, sub in enumerate(subsets):
            pairs = [_sts_pair(rng) for _ in range(n_pairs)]
            folder = root / "STS" / f"{year}-en-test"
            _write(folder / f"STS.input.{sub}.txt", "".join(f"{a}\t{b}\n" for a, b, _ in pairs))
            golds = [f"{g:.2f}" for _, _, g in pairs]
            if year == "STS16" and k == 0:
                golds[1] = ""  # a pair without gold: SentEval drops it
            _write(folder / f"STS.gs.{sub}.txt", "".join(f"{g}\n" for g in golds))
    rows = [_sts_pair(rng) for _ in range(2 * n_pairs)]
    _write(
        root / "STS" / "STSBenchmark" / "sts-test.csv",
        "".join(f"main-captions\tMSRvid\t2012test\t{i:04d}\t{g:.3f}\t{a}\t{b}\n" for i, (a, b, g) in enumerate(rows)),
    )
    rows = [_sts_pair(rng) for _ in range(2 * n_pairs)]
    _write(
        root / "SICK" / "SICK_test_annotated.txt",
        "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
        + "".join(f"{i + 1}\t{a}\t{b}\t{1 + 4 * g / 5:.1f}\tNEUTRAL\n" for i, (a, b, g) in enumerate(rows)),
    )


# ---------------------------------------------------------------------- entry points
def generate(out: str | Path, seed: int = 0, **sizes: int) -> Path:
    """Write the whole mini world into ``out`` (which must not exist or be empty)."""
    sizes = {**DEFAULTS, **sizes}
    unknown = set(sizes) - set(DEFAULTS)
    if unknown:
        raise KeyError(f"unknown mini size(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    out = Path(out)
    n = int(sizes["images"])
    scenes = sample_scenes(2 * n + 8, seed=seed, max_objects=2)
    rng = random.Random(seed)
    make_flickr(out, scenes[:n], scenes[2 * n : 2 * n + 4])
    make_coco(out, scenes[n : 2 * n], scenes[2 * n + 4 :])
    make_cirr(out, rng, int(sizes["cirr_groups"]))
    make_fashioniq(out, rng, int(sizes["fiq_images"]))
    make_sts(out, rng, int(sizes["sts_pairs"]))
    # MMEB-mini (e5v.mini.mmeb_data): its own seed stream, drawn after the others (which stay as they were)
    mmeb_data.generate(out / "mmeb", seed=seed, queries=int(sizes["mmeb_queries"]),
                       candidates=int(sizes["mmeb_candidates"]))
    _write(out / "mini.json", json.dumps({"version": MINI_VERSION, "seed": seed, "sizes": sizes}, indent=1) + "\n")
    return out


def ensure(out: str | Path, seed: int = 0, **sizes: int) -> Path:
    """The mini world in ``out``, generated on first use (atomic rename), reused when it matches."""
    from e5v import distributed as dist

    out = Path(out)
    want = {"version": MINI_VERSION, "seed": seed, "sizes": {**DEFAULTS, **sizes}}
    manifest = out / "mini.json"
    if dist.is_main():
        stale = False
        if manifest.is_file():
            have = json.loads(manifest.read_text())
            if have == want:
                dist.barrier()
                return out
            log.warning("%s holds mini data generated with %s; regenerating it for %s", out, have, want)
            stale = True
        elif out.exists() and any(out.iterdir()):
            raise FileExistsError(
                f"{out} exists and is not a mini-data folder (no mini.json); choose another suite.mini.dir"
            )
        rebuild_dir(out, lambda tmp: generate(tmp, seed=seed, **sizes), stale, prefix=".mini-")
    dist.barrier()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Generate the mini evaluation data (all benchmark formats).")
    ap.add_argument("--out", type=Path, required=True, help="folder to create (e.g. data/mini)")
    ap.add_argument("--seed", type=int, default=0)
    for key, val in DEFAULTS.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, default=val, dest=key)
    args = ap.parse_args(argv)
    sizes = {k: getattr(args, k) for k in DEFAULTS}
    path = ensure(args.out, seed=args.seed, **sizes)
    print(f"mini evaluation data in {path}")


if __name__ == "__main__":
    main()
