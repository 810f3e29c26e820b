"""MMEB-mini (e5v/mini/mmeb_data.py): the real MMEB-eval V1 layout, ground truth first (checked on the
pixels, independently of the generator), exact chance levels, deterministic, never over a user's folder."""

from __future__ import annotations

import ast
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from e5v.errors import ConfigError, DataError
from e5v.mini import mmeb_data as M
from e5v.mini.world import COLOURS, POSITIONS

SIZES = {"queries": 6, "candidates": 5}
WHITE = (255, 255, 255)
RGB_NAME = {v: k for k, v in COLOURS.items()}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return M.generate(tmp_path_factory.mktemp("mmeb") / "mmeb", seed=4, **SIZES)


def rows(root: Path, task: str) -> list[dict]:
    return pq.read_table(root / task / "test-00000-of-00001.parquet").to_pylist()


def img(root: Path, rel: str) -> np.ndarray:
    return np.asarray(Image.open(root / "images" / rel).convert("RGB"))


def colours_in(a: np.ndarray) -> set[str]:
    """Names of the world's colours present in an image (rendering has no anti-aliasing: exact fills)."""
    found = {tuple(int(x) for x in p) for p in np.unique(a.reshape(-1, 3), axis=0)}
    return {RGB_NAME[c] for c in found if c in RGB_NAME}


def test_task_table_mirrors_the_real_benchmark() -> None:
    table = M.task_table()
    assert list(table) == list(M.TASK_NAMES) and len(table) == 13
    metas = [v["meta"] for v in table.values()]
    assert {m: metas.count(m) for m in set(metas)} == {"classification": 3, "vqa": 3, "retrieval": 4, "grounding": 3}
    assert sorted(n for n, v in table.items() if v["split"] == "ood") == [
        "MiniCount-VQA", "MiniNews", "MiniObject", "MiniPointing", "MiniRefExp"]
    # each mirrored task exists in the real V1 table with the same meta-task and split (engineer A's loader)
    real = pytest.importorskip("eval.loaders.mmeb").V1_TASKS
    for name, v in table.items():
        assert (real[v["mirrors"]].meta, real[v["mirrors"]].split) == (v["meta"], v["split"]), name


def test_parquet_has_exactly_the_real_columns_and_types(root: Path) -> None:
    want = pa.schema([("qry_text", pa.string()), ("qry_img_path", pa.string()),
                      ("tgt_text", pa.list_(pa.string())), ("tgt_img_path", pa.list_(pa.string()))])
    assert sorted(p.name for p in root.iterdir()) == sorted([*M.TASK_NAMES, "images", "mini_mmeb.json"])
    for task in M.TASK_NAMES:
        assert [p.name for p in (root / task).iterdir()] == ["test-00000-of-00001.parquet"]
        schema = pq.read_schema(root / task / "test-00000-of-00001.parquet")
        assert schema.names == ["qry_text", "qry_img_path", "tgt_text", "tgt_img_path"], task
        assert [schema.field(n).type for n in schema.names] == [want.field(n).type for n in want.names], task
        assert len(rows(root, task)) == SIZES["queries"]


def test_every_image_exists_lists_are_aligned_and_never_repeat(root: Path) -> None:
    named = set()
    for task in M.TASK_NAMES:
        for r in rows(root, task):
            assert r["tgt_text"] and len(r["tgt_text"]) == len(r["tgt_img_path"]), task
            pairs = list(zip(r["tgt_text"], r["tgt_img_path"]))
            assert len(set(pairs)) == len(pairs), (task, r["qry_text"])  # no duplicate candidate
            for p in [r["qry_img_path"], *r["tgt_img_path"]]:
                if p:
                    assert p.startswith(f"{task}/Test/") and (root / "images" / p).is_file(), p
                    named.add(p)
            # the placeholder: first, on its own line, exactly when the side has an image
            assert r["qry_text"].startswith("<|image_1|>\n") == bool(r["qry_img_path"]), (task, r["qry_text"])
            for t, p in pairs:
                assert ("<|image_1|>" in t) == bool(p), (task, t, p)
    on_disk = {str(p.relative_to(root / "images")) for p in (root / "images").rglob("*.png")}
    assert on_disk == named  # no stray image either
    # grounding candidates: crops that never look alike (their centre pixel and size differ ...) -- at
    # least: no two candidate crops of a query are pixel-identical
    for task in ("MiniGrounding", "MiniRefExp", "MiniPointing"):
        for r in rows(root, task):
            digests = [hashlib.sha256(img(root, p).tobytes()).hexdigest() for p in r["tgt_img_path"]]
            assert len(set(digests)) == len(digests), task


def test_ground_truth_is_first_checked_on_the_pixels(root: Path) -> None:
    # classification by colour: the query image holds exactly the labelled colour
    for r in rows(root, "MiniColour"):
        assert colours_in(img(root, r["qry_img_path"])) == {r["tgt_text"][0]}
        assert sorted(r["tgt_text"]) == sorted(COLOURS)
    for r in rows(root, "MiniObject"):
        assert colours_in(img(root, r["qry_img_path"])) == {r["tgt_text"][0].split()[0]}
        assert len(r["tgt_text"]) == 18
    for r in rows(root, "MiniShape"):
        assert sorted(r["tgt_text"]) == ["circle", "square", "triangle"]
    # text -> image and image -> text: the caption's colours are exactly the ground-truth image's
    for r in rows(root, "MiniScene_t2i"):
        named = set(re.findall("|".join(COLOURS), r["qry_text"]))
        assert colours_in(img(root, r["tgt_img_path"][0])) == named
        assert r["qry_text"].startswith("Find me an everyday image that matches the given caption: ")
    for r in rows(root, "MiniScene_i2t"):
        assert colours_in(img(root, r["qry_img_path"])) == set(re.findall("|".join(COLOURS), r["tgt_text"][0]))
        assert len(re.findall(" at the ", r["tgt_text"][0])) == 3  # three objects, never in the other mini data
    # news-style: the paraphrase names the ground-truth image's colours; its text names its objects
    for r in rows(root, "MiniNews"):
        named = set(re.findall("|".join(COLOURS), r["qry_text"]))
        assert colours_in(img(root, r["tgt_img_path"][0])) == named
        assert set(re.findall("|".join(COLOURS), r["tgt_text"][0])) == named
    # VQA by position: the answer's place in the image holds the asked colour
    for r in rows(root, "MiniPosition-VQA"):
        colour = re.search(r"Where is the (\w+) (\w+)\?", r["qry_text"]).group(1)
        x, y = POSITIONS[r["tgt_text"][0]]
        a = img(root, r["qry_img_path"])
        assert tuple(a[int(y * a.shape[0]), int(x * a.shape[1])]) == COLOURS[colour]
    for r in rows(root, "MiniColour-VQA"):
        assert r["tgt_text"][0] in colours_in(img(root, r["qry_img_path"]))
    for r in rows(root, "MiniCount-VQA"):
        assert r["tgt_text"][0] in ("zero", "one", "two", "three") and len(r["tgt_text"]) == 4
    # pointing: the ground-truth crop is centred on an object of the asked colour; the other two objects of
    # the query image come next (the hardest distractors)
    for r in rows(root, "MiniPointing"):
        colour = re.search(r"Which object is (\w+)\?", r["qry_text"]).group(1)
        centres = [tuple(int(v) for v in img(root, p)[20, 20]) for p in r["tgt_img_path"]]
        assert centres[0] == COLOURS[colour] and COLOURS[colour] not in centres[1:3]
        assert {RGB_NAME[c] for c in centres[:3]} == colours_in(img(root, r["qry_img_path"]))
    # composed retrieval: the target differs from the reference; the reference itself is no candidate
    for r in rows(root, "MiniEdit"):
        ref = img(root, r["qry_img_path"])
        assert r["qry_img_path"] not in r["tgt_img_path"] and not np.array_equal(ref, img(root, r["tgt_img_path"][0]))
        m = re.search(r"make the (\w+) (\w+) (\w+)$", r["qry_text"])
        if m and m.group(3) in COLOURS:  # a colour edit: the new colour is in the target
            assert m.group(3) in colours_in(img(root, r["tgt_img_path"][0]))


def test_chance_levels_are_exact(root: Path) -> None:
    c = SIZES["candidates"]
    hand = {"MiniShape": 1 / 3, "MiniColour": 1 / 6, "MiniObject": 1 / 18, "MiniColour-VQA": 1 / 6,
            "MiniPosition-VQA": 1 / 5, "MiniCount-VQA": 1 / 4, "MiniScene_t2i": 1 / c, "MiniScene_i2t": 1 / c,
            "MiniEdit": 1 / c, "MiniNews": 1 / c, "MiniGrounding": 1 / c, "MiniRefExp": 1 / c, "MiniPointing": 1 / c}
    from_files = {t: float(np.mean([1 / len(r["tgt_text"]) for r in rows(root, t)])) for t in M.TASK_NAMES}
    assert from_files == pytest.approx(hand, abs=1e-12)
    assert M.chance_levels(root) == pytest.approx(hand, abs=1e-12)
    assert {t: v["chance"] for t, v in M.task_table(c).items()} == pytest.approx(hand, abs=1e-12)
    marker = json.loads((root / "mini_mmeb.json").read_text())
    assert marker["sizes"] == SIZES and marker["seed"] == 4
    assert {t: v["chance"] for t, v in marker["tasks"].items()} == pytest.approx(hand, abs=1e-12)


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_deterministic_from_the_seed(root: Path, tmp_path: Path) -> None:
    again = M.generate(tmp_path / "again", seed=4, **SIZES)
    assert _digests(again) == _digests(root)
    other = M.generate(tmp_path / "other", seed=5, **SIZES)
    a, b = _digests(other), _digests(root)
    assert a.keys() == b.keys() and a != b


def test_disjoint_from_pretraining_and_the_other_mini_data(root: Path) -> None:
    # the reserved pool is tiny_world's pretraining pool: same size and seed offset as e5v/mini/pretrain.py
    src = (Path(M.__file__).parent / "pretrain.py").read_text()
    recipe = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.AnnAssign)
                  and getattr(n.target, "id", "") == "RECIPE")
    assert ast.literal_eval(recipe.value)["pool"] == M.PRETRAIN_POOL
    assert f"sample_scenes(pool, seed=seed + {M.PRETRAIN_SEED_OFFSET}, max_objects=3)" in src
    reserved = M.reserved_captions(4)
    captions = [c for r in rows(root, "MiniScene_i2t") for c in r["tgt_text"]]
    captions += [r["qry_text"].split(": ", 1)[1] for r in rows(root, "MiniScene_t2i")]
    assert captions and not set(captions) & reserved
    assert all(c.count(" at the ") == 3 for c in captions)  # the other mini data show at most two objects


def test_sizes_are_checked() -> None:
    with pytest.raises(ConfigError, match="mmeb_candidates=1"):
        M.generate("/nonexistent/never", candidates=1)
    with pytest.raises(ConfigError, match="unknown MMEB-mini size"):
        M.generate("/nonexistent/never", galleries=3)


def test_ensure_never_overwrites_a_users_folder(tmp_path: Path, caplog) -> None:
    user = tmp_path / "mine"
    (user / "MiniShape").mkdir(parents=True)
    (user / "MiniShape" / "test-00000-of-00001.parquet").write_text("my own data")
    with pytest.raises(DataError, match=r"mine exists and is not generated MMEB-mini data \(no mini_mmeb.json\)"):
        M.ensure(user, seed=0, **SIZES)
    assert (user / "MiniShape" / "test-00000-of-00001.parquet").read_text() == "my own data"
    assert sorted(p.name for p in user.rglob("*")) == ["MiniShape", "test-00000-of-00001.parquet"]

    out = M.ensure(tmp_path / "gen", seed=0, **SIZES)  # generated, then reused untouched
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert M.ensure(out, seed=0, **SIZES) == out and {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamp
    M.ensure(out, seed=0, queries=3, candidates=4)  # other sizes: regenerated in place, with a warning
    assert len(rows(out, "MiniEdit")) == 3 and len(rows(out, "MiniEdit")[0]["tgt_text"]) == 4
    assert "regenerating" in caplog.text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mmeb-mini-")]  # no temporary left


def test_real_loader_reads_every_task(root: Path) -> None:
    """Engineer A's V1 loader (eval/loaders/mmeb.py) reads every task: images found, ground truth first."""
    loader = pytest.importorskip("eval.loaders.mmeb")
    for task in M.TASK_NAMES:
        t = loader.load_local_task(root, task)
        assert len(t.queries) == SIZES["queries"]
        q = t.queries[0]
        assert "<|image_1|>" not in q.query.text and all(c.image is None or Path(c.image.path).is_file()
                                                          for c in q.candidates)
        assert q.raw[2] == rows(root, task)[0]["tgt_text"]


# ---------------------------------------------------------------------- make replicate-mini / make demo
def _metrics(v: float, mmeb: float | None = None) -> dict:
    from scripts import replicate_mini as R

    m: dict = {}
    for _, bench, key in R.COLUMNS:
        m.setdefault(bench, {})[key] = v
    if mmeb is not None:
        m["mmeb"] = {key: mmeb + k for k, (_, _, key) in enumerate(R.MMEB_COLUMNS)}
    return m


def test_replicate_answers_the_mmeb_claim(tmp_path: Path) -> None:
    from scripts import replicate_mini as R

    runs = []
    for seed, (before, after, pairs) in enumerate([(20.0, 25.0, 24.0), (21.0, 27.0, 30.0), (19.0, 26.0, 28.0)]):
        runs += [{"seed": seed, "prompt": "none", "phase": "before", "metrics": _metrics(10.0)},  # no MMEB-mini
                 {"seed": seed, "prompt": "e5v_llama3", "phase": "before", "metrics": _metrics(30.0, before)},
                 {"seed": seed, "prompt": "e5v_llama3", "phase": "after", "metrics": _metrics(40.0, after)},
                 {"seed": seed, "prompt": "e5v_llama3", "phase": "pairs", "metrics": _metrics(45.0, pairs)}]
    chance = {c: 5.0 for c, *_ in R.COLUMNS} | {"avg": 5.0} | {c: 12.5 for c, *_ in R.MMEB_COLUMNS}
    found = {c["claim"]: c for c in R.claims(runs, chance)}
    a = found["5a text-only training (E5-V) moves MMEB-mini overall"]
    assert a["per_seed"] == {0: 5.0, 1: 6.0, 2: 7.0} and a["mean"] == 6.0 and a["sd"] == 1.0 and a["holds"]
    b = found["5b Table 7 on MMEB-mini: image-caption vs text-only training"]
    assert b["per_seed"] == {0: -1.0, 1: 3.0, 2: 2.0} and not b["holds"]
    assert found["5c zero-shot: E5-V prompts vs chance, MMEB-mini overall"]["per_seed"] == {0: 7.5, 1: 8.5, 2: 6.5}
    assert found["1a zero-shot: E5-V prompts vs no prompt"]["per_seed"] == {0: 20.0, 1: 20.0, 2: 20.0}
    # records without MMEB-mini (before it existed): the MMEB claims are left out, the others unchanged
    old = [{**r, "metrics": {k: v for k, v in r["metrics"].items() if k != "mmeb"}} for r in runs]
    assert not [c for c in R.claims(old, chance) if "MMEB" in c["claim"]]
    text = R.write_outputs(tmp_path, runs, chance, {"seeds": [0, 1, 2], "steps": 2, "seconds": 1.0},
                           [("last token, no prompt", "none"), ("E5-V prompts", "e5v_llama3")])
    mm = text.split("## MMEB-mini", 1)[1].split("## Claims")[0]
    assert "| E5-V prompts | text-only (NLI) | 26.0 +- 1.0 | 27.0 +- 1.0 | 28.0 +- 1.0 | 29.0 +- 1.0 | 30.0 +- 1.0 |" in mm
    assert "| chance | - | 12.5 | 12.5 | 12.5 | 12.5 | 12.5 |" in mm and "no prompt" not in mm
    assert "| 5a text-only training (E5-V) moves MMEB-mini overall | MMEB-mini | +5.0, +6.0, +7.0 | +6.0 +- 1.0 | yes |" in text
    assert json.loads((tmp_path / "results.json").read_text())["mmeb_table"][0]["setting"] == "E5-V prompts"


def test_replicate_and_demo_read_the_mmeb_rows_of_a_result() -> None:
    from e5v.config import compose
    from scripts import demo
    from scripts import replicate_mini as R

    cfg = compose("eval", ["suite=mini"])
    assert list(cfg.benchmark) == [*R.PAPER_BENCHMARKS, "mmeb"]  # the settings without MMEB-mini skip only it
    assert list(cfg.benchmark.mmeb.tasks) == list(M.TASK_NAMES)
    assert cfg.suite.mini.mmeb_queries == M.DEFAULTS["queries"]
    assert cfg.suite.mini.mmeb_candidates == M.DEFAULTS["candidates"]
    chance = {b: {k: 1.0 for _, bb, k in R.COLUMNS if bb == b} for _, b, _ in R.COLUMNS}
    chance["mmeb"] = {"overall/hit@1": 15.75, "classification/hit@1": 18.5, "vqa/hit@1": 20.6,
                      "retrieval/hit@1": 12.5, "grounding/hit@1": 12.5}
    row = R.chance_row({"chance": chance})
    assert row["MMEB-mini overall"] == 15.75 and row["MMEB-mini VQA"] == 20.6
    assert row["avg"] == 1.0  # the paper's columns only
    labels = [label for _, _, label in demo.ROWS]
    assert labels[-5:] == [c for c, *_ in R.MMEB_COLUMNS] and all(label in row for label in labels)
