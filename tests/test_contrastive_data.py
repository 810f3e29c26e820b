"""Stage-2 data: MMEB-train's real layout, JSONL rows, as_rows, mixtures with homogeneous sub-batches, mined
negatives, and the mini MMEB-train data. Run: ``.venv/bin/python -m pytest -q tests/test_contrastive_data.py``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from e5v.data.contrastive import (
    MMEB_TEMPLATES,
    NLI_TEMPLATES,
    PAIR_TEMPLATES,
    ContrastiveRows,
    Item,
    as_rows,
    attach_mined,
    load_jsonl_rows,
    load_mmeb_train,
    strip_placeholder,
)
from e5v.data.mixture import Mixture, MixtureSampler, load_mixture
from e5v.data.nli import StepSampler, Triplets
from e5v.data.paths import UnsafePathError
from e5v.errors import ConfigError, DataError, MissingDataError

COLS = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")


# ---------------------------------------------------------------------- fixtures
def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path)


def _write_subset(folder: Path, rows: list[dict], split: str = "original", drop_neg: bool = False) -> Path:
    """A subset folder as the hub has it: <Subset>/<split>-00000-of-00001.parquet, six string columns."""
    cols = COLS[:4] if drop_neg else COLS
    schema = pa.schema([(c, pa.string()) for c in cols])
    folder.mkdir(parents=True, exist_ok=True)
    f = folder / f"{split}-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist([{c: r.get(c, "") for c in cols} for r in rows], schema=schema), f)
    return f


@pytest.fixture()
def mmeb(tmp_path: Path) -> tuple[Path, Path]:
    img = tmp_path / "image"
    for rel in ("ImageNet_1K/a.jpg", "ImageNet_1K/b.jpg", "ImageNet_1K/c.jpg"):
        _png(img / rel)
    rows = [
        {"qry": "<|image_1|>\nRepresent the given image for classification\n", "qry_image_path": "ImageNet_1K/a.jpg",
         "pos_text": "goldfish", "pos_image_path": "", "neg_text": "shark", "neg_image_path": ""},
        {"qry": "Find me an everyday image that matches the given caption: a dog", "qry_image_path": "",
         "pos_text": "<|image_1|>\nRepresent the given image.", "pos_image_path": "ImageNet_1K/b.jpg",
         "neg_text": "<|image_1|> Represent the given image.", "neg_image_path": "ImageNet_1K/c.jpg"},
        {"qry": "", "qry_image_path": "", "pos_text": "x"},  # missing query
        {"qry": "q", "pos_text": "", "pos_image_path": ""},  # empty positive
        {"qry": "<|image_1|>\nq", "qry_image_path": "ImageNet_1K/nope.jpg", "pos_text": "p"},  # image not found
        {"qry": "q" * 100, "pos_text": "p"},  # too long at max_chars=80
        {"qry": "last", "pos_text": "p", "neg_text": "", "neg_image_path": ""},
    ]
    _write_subset(tmp_path / "ImageNet_1K", rows)
    return tmp_path / "ImageNet_1K", img


# ---------------------------------------------------------------------- MMEB-train
def test_strip_placeholder_is_the_eval_loaders() -> None:
    import eval.loaders.mmeb as ev

    assert ev.strip_placeholder is strip_placeholder
    assert strip_placeholder("<|image_1|>\nRepresent the given image.\n") == ("Represent the given image.\n", True)
    assert strip_placeholder("<|image_1|> Select the dog") == ("Select the dog", True)
    assert strip_placeholder("no image\n") == ("no image\n", False)


def test_mmeb_train_real_layout(mmeb: tuple[Path, Path]) -> None:
    folder, img = mmeb
    rows = load_mmeb_train(folder, img, max_chars=80)
    assert rows.name == "ImageNet_1K" and rows.templates == MMEB_TEMPLATES and rows.image_root == str(img)
    assert rows.ids == ["ImageNet_1K:0", "ImageNet_1K:1", "ImageNet_1K:6"]
    assert rows.skipped == {"missing_query": 1, "empty_positive": 1, "image_not_found": 1, "too_long": 1}
    root = img.resolve()
    assert rows.queries[0] == Item("Represent the given image for classification\n", str(root / "ImageNet_1K/a.jpg"), "")
    assert rows.positives[0] == [Item("goldfish")] and rows.negatives[0] == [Item("shark")]
    assert rows.queries[1] == Item("Find me an everyday image that matches the given caption: a dog")
    assert rows.positives[1] == [Item("Represent the given image.", str(root / "ImageNet_1K/b.jpg"))]
    assert rows.negatives[1] == [Item("Represent the given image.", str(root / "ImageNet_1K/c.jpg"))]
    assert rows.negatives[2] == []  # "" / "" is no negative
    # one parquet file: same rows, the name from its folder (a hub shard name)
    same = load_mmeb_train(folder / "original-00000-of-00001.parquet", img, max_chars=80)
    assert same.ids == rows.ids and same.queries == rows.queries
    assert load_mmeb_train(folder, img, max_chars=80, limit=2).ids == ["ImageNet_1K:0", "ImageNet_1K:1"]
    assert load_mmeb_train(folder, img, name="cls", max_chars=80).ids[0] == "cls:0"


def test_mmeb_train_errors(mmeb: tuple[Path, Path], tmp_path: Path) -> None:
    folder, img = mmeb
    with pytest.raises(DataError, match=r"row 2.*'qry'"):
        load_mmeb_train(folder, img, on_bad_row="error")
    sub = tmp_path / "Img"
    _write_subset(sub, [{"qry": "ok", "pos_text": "p"},
                        {"qry": "<|image_1|>\nq", "qry_image_path": "ImageNet_1K/nope.jpg", "pos_text": "p"}])
    with pytest.raises(DataError, match=r"Img.*row 1, column 'qry_image_path'.*'ImageNet_1K/nope.jpg' not found"):
        load_mmeb_train(sub, img, on_bad_row="error")
    with pytest.raises(MissingDataError, match="diverse_instruction-\\*.parquet.*original-00000"):
        load_mmeb_train(folder, img, split="diverse_instruction")
    with pytest.raises(MissingDataError, match="git clone https://huggingface.co/datasets/TIGER-Lab/MMEB-train"):
        load_mmeb_train(tmp_path / "NoSuchSubset", img)
    bad = _write_subset(tmp_path / "Bad", [{"qry": "q", "pos_text": "p"}], drop_neg=True)
    assert load_mmeb_train(bad.parent, img).negatives == [[]]  # neg columns absent: no negatives
    pq.write_table(pa.table({"qry": ["q"], "pos_text": ["p"]}), bad)
    with pytest.raises(DataError, match="missing column.*qry_image_path"):
        load_mmeb_train(bad.parent, img)


def test_mmeb_train_path_escape_always_raises(tmp_path: Path) -> None:
    img = tmp_path / "image"
    img.mkdir()
    _png(tmp_path / "secret.png")
    for rel in ("../secret.png", str(tmp_path / "secret.png")):
        sub = tmp_path / f"S{len(rel)}"
        _write_subset(sub, [{"qry": "<|image_1|>\nq", "qry_image_path": rel, "pos_text": "p"}])
        for policy in ("skip", "error"):
            with pytest.raises(UnsafePathError):
                load_mmeb_train(sub, img, on_bad_row=policy)
    (img / "link").symlink_to(tmp_path)
    _write_subset(tmp_path / "L", [{"qry": "q", "pos_text": "p", "neg_image_path": "link/secret.png"}])
    with pytest.raises(UnsafePathError):
        load_mmeb_train(tmp_path / "L", img)


# ---------------------------------------------------------------------- JSONL
def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_rows(tmp_path: Path) -> None:
    _png(tmp_path / "im" / "a.png")
    f = _jsonl(tmp_path / "mine.jsonl", [
        {"query": {"text": "a cat", "instruction": "Find the image"}, "positives": [{"image": "a.png"}],
         "negatives": [{"text": "a dog"}]},
        {"id": "r1", "query": {"image": "a.png", "text": "what?"}, "positives": [{"text": "x"}, {"text": "y"}]},
        {"query": {"text": ""}, "positives": [{"text": "x"}]},  # missing query
        {"query": {"text": "q"}, "positives": []},  # no positive
        {"query": {"text": "q"}, "positives": [{"image": "gone.png"}]},  # image not found
        "",
        {"query": {"text": "z"}, "positives": [{"text": "w"}], "negatives": [{"instruction": "only"}]},  # empty neg
    ])
    rows = load_jsonl_rows(f, image_root=tmp_path / "im")
    a = str((tmp_path / "im" / "a.png").resolve())
    assert rows.ids == ["mine:0", "r1"] and rows.templates == MMEB_TEMPLATES
    assert rows.queries == [Item("a cat", None, "Find the image"), Item("what?", a)]
    assert rows.positives == [[Item(image=a)], [Item("x"), Item("y")]]
    assert rows.negatives == [[Item("a dog")], []]
    assert rows.skipped == {"missing_query": 1, "no_positive": 1, "image_not_found": 1, "empty_negative": 1}
    with pytest.raises(DataError, match=r"line 3, key 'query'"):
        load_jsonl_rows(f, image_root=tmp_path / "im", on_bad_row="error")


@pytest.mark.parametrize("row, match", [
    ({"query": {"text": "q"}, "positive": [{"text": "p"}]}, r"line 1: unknown key\(s\) \['positive'\]"),
    ({"query": {"txt": "q"}, "positives": [{"text": "p"}]}, r"key 'query': unknown key\(s\) \['txt'\]"),
    ({"query": {"text": "q"}}, "no key 'positives'"),
    ({"query": {"text": 3}, "positives": [{"text": "p"}]}, "key 'text' is a int"),
])
def test_jsonl_structural_errors(tmp_path: Path, row: dict, match: str) -> None:
    f = _jsonl(tmp_path / "x.jsonl", [row])
    with pytest.raises(DataError, match=match):
        load_jsonl_rows(f, on_bad_row="skip")


def test_jsonl_duplicate_id_and_escape(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "d.jsonl", [{"id": "a", "query": {"text": "q"}, "positives": [{"text": "p"}]},
                                      {"id": "a", "query": {"text": "q2"}, "positives": [{"text": "p"}]}])
    with pytest.raises(DataError, match=r"line 2: duplicate id 'a' \(first on line 1\)"):
        load_jsonl_rows(f)
    (tmp_path / "root").mkdir()
    f = _jsonl(tmp_path / "e.jsonl", [{"query": {"image": "../e.jsonl"}, "positives": [{"text": "p"}]}])
    with pytest.raises(UnsafePathError):
        load_jsonl_rows(f, image_root=tmp_path / "root")


# ---------------------------------------------------------------------- as_rows
def test_as_rows_triplets_and_pairs(tmp_path: Path) -> None:
    from e5v.data.pairs import ImageCaptionPairs

    t = Triplets(["a", "b"], ["a2", "b2"], ["na", "nb"], "/d/nli.csv", {"empty": 1})
    r = as_rows(t)
    assert isinstance(r, ContrastiveRows) and r.templates == NLI_TEMPLATES
    assert r.queries == [Item("a"), Item("b")] and r.positives == [[Item("a2")], [Item("b2")]]
    assert r.negatives == [[Item("na")], [Item("nb")]] and r.ids == ["nli:0", "nli:1"]
    assert r.source == "/d/nli.csv" and r.skipped == {"empty": 1}
    assert as_rows(Triplets(["a"], ["b"], None, "x.csv")).negatives == [[]]
    p = ImageCaptionPairs(["/r/1.jpg", "/r/2.jpg"], ["one", "two"], "/d/pairs.json", "/r", ["7", "9"], {"too_long": 2})
    r = as_rows(p)
    assert r.templates == PAIR_TEMPLATES and r.image_root == "/r" and r.anchor_kind == "image"
    assert r.queries == [Item(image="/r/1.jpg"), Item(image="/r/2.jpg")]
    assert r.positives == [[Item("one")], [Item("two")]] and r.negatives == [[], []]
    assert r.ids == ["pairs:0", "pairs:1"] and r.skipped == {"too_long": 2}
    assert as_rows(r) is r
    m = Mixture([r])
    assert as_rows(m) is m
    with pytest.raises(ConfigError):
        as_rows([1, 2])


# ---------------------------------------------------------------------- mixtures
def _rows(name: str, n: int) -> ContrastiveRows:
    return ContrastiveRows(name, [Item(f"{name}{i}") for i in range(n)], [[Item("p")] for _ in range(n)],
                           [[] for _ in range(n)], f"/{name}", ids=[f"{name}:{i}" for i in range(n)])


def test_mixture_columns_and_identity() -> None:
    a, b = _rows("a", 5), _rows("b", 3)
    b.templates = {"text": "train"}
    b.image_root = "/img"
    m = Mixture([a, b], weights=[1, 3], sub_batch=2)
    assert len(m) == 8 and m.ids == [f"a:{i}" for i in range(5)] + ["b:0", "b:1", "b:2"]
    assert m.dataset_index.tolist() == [0] * 5 + [1] * 3 and m.offsets.tolist() == [0, 5, 8]
    assert m.queries[6] == Item("b1") and m.templates_of(6) == {"text": "train"} and m.image_root_of(6) == "/img"
    assert m.templates_of(0) == MMEB_TEMPLATES and m.skipped == {"a": {}, "b": {}}
    p = m.identity_payload()
    assert p["weights"] == [1.0, 3.0] and p["sub_batch"] == 2 and p["datasets"][1] == b.identity_payload()
    assert Mixture([a, b]).weights == [5.0, 3.0]  # default: sizes
    with pytest.raises(ConfigError, match="unique"):
        Mixture([a, _rows("a", 2)])
    with pytest.raises(ConfigError, match="2 mixture weight"):
        Mixture([a], weights=[1, 2])


def _independent_schedule(sizes: list[int], probs: np.ndarray, seed: int, gb: int, sb: int, steps: int) -> list:
    """Re-derive the documented schedule step by step: sub-batch datasets from rng([seed, step, 0x4D49]); each
    dataset walks its passes (rng([seed, d, pass, 0x4D58]) permutations), the tail that does not fill a
    sub-batch left to the next pass, whose first gb-sb rows avoid the previous pass's last gb-sb used rows."""
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    state = [[0, 0, np.random.default_rng([seed, d, 0, 0x4D58]).permutation(n).tolist()] for d, n in enumerate(sizes)]
    out = []
    for step in range(steps):
        ds = np.random.default_rng([seed, step, 0x4D49]).choice(len(sizes), size=gb // sb, p=probs)
        batch = []
        for d in ds:
            epoch, pos, perm = state[d]
            if pos + sb > sizes[d]:
                used_tail = perm[pos - (gb - sb):pos]
                fresh = np.random.default_rng([seed, int(d), epoch + 1, 0x4D58]).permutation(sizes[d]).tolist()
                first = [x for x in fresh if x not in used_tail][:gb - sb]
                perm = first + [x for x in fresh if x not in first]
                epoch, pos = epoch + 1, 0
            batch.extend(int(offsets[d]) + x for x in perm[pos:pos + sb])
            state[d] = [epoch, pos + sb, perm]
        out.append(batch)
    return out


def test_sampler_homogeneous_weights_determinism() -> None:
    sizes = [40, 25, 61]
    m = Mixture([_rows(n, k) for n, k in zip("xyz", sizes)], weights=[1, 2, 5], sub_batch=4)
    s = MixtureSampler(m, global_batch=16, seed=3)
    assert s.steps_per_epoch == 126 // 16
    steps = 400
    expect = _independent_schedule(sizes, m.probabilities, 3, 16, 4, steps)
    for step in range(steps):
        assert s.rows(step).tolist() == expect[step]
    counts = Counter()
    for step in range(steps):
        rows, groups = s.rows(step), s.groups(step)
        assert len(rows) == 16 and groups.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
        for g in range(4):
            ds = set(m.dataset_index[rows[groups == g]].tolist())
            assert len(ds) == 1  # homogeneous
            counts[ds.pop()] += 1
        assert len(set(rows.tolist())) == 16
    freq = np.array([counts[d] for d in range(3)]) / (4 * steps)
    assert np.allclose(freq, [1 / 8, 2 / 8, 5 / 8], atol=0.03), freq
    # without replacement inside each dataset's pass: dataset x's first 10 sub-batches cover 40 distinct rows
    xs = [r for step in range(steps) for r in s.rows(step).tolist() if m.dataset_index[r] == 0][:40]
    assert sorted(xs) == list(range(40))
    # a fresh sampler, asked for step N cold, agrees with one that walked 0..N-1; ranks slice the global batch
    cold = MixtureSampler(m, global_batch=16, seed=3)
    assert cold.rows(257).tolist() == s.rows(257).tolist()
    full = s.rows(123)
    assert np.concatenate([s.rows(123, r, 4) for r in range(4)]).tolist() == full.tolist()
    assert MixtureSampler(m, 16, seed=4).rows(5).tolist() != s.rows(5).tolist()
    assert s.position(20) == {"step": 20, "epoch": 2, "batch_in_epoch": 6, "steps_per_epoch": 7}


def test_sampler_single_dataset_is_step_sampler() -> None:
    r = _rows("a", 50)
    ref = StepSampler(50, 8, seed=11)
    for sub in (None, 8, 2):
        s = MixtureSampler(r, 8, 11, sub_batch=sub)
        for step in (0, 1, 5, 6, 7, 13):
            assert s.rows(step).tolist() == ref.rows(step).tolist()
            assert s.rows(step, 1, 2).tolist() == ref.rows(step, 1, 2).tolist()
            assert s.position(step) == ref.position(step)
        assert s.steps_per_epoch == ref.steps_per_epoch
    assert MixtureSampler(Mixture([r], sub_batch=4), 8, 11).groups(0).tolist() == [0] * 4 + [1] * 4


def test_sampler_config_errors() -> None:
    m = Mixture([_rows("a", 10), _rows("b", 3)], sub_batch=4)
    with pytest.raises(ConfigError, match="not a multiple of data.sub_batch=3"):
        MixtureSampler(m, 8, 0, sub_batch=3)
    with pytest.raises(DataError, match=r"\('b', 3\).*fewer rows than data.sub_batch=4"):
        MixtureSampler(m, 8, 0)


# ---------------------------------------------------------------------- mined negatives
def _mined(folder: Path, name: str, lines: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "provenance.json").write_text("{}")
    _jsonl(folder / f"{name}.jsonl", lines)


def test_attach_mined(tmp_path: Path) -> None:
    img = tmp_path / "image"
    _png(img / "n.png")
    rows = ContrastiveRows("S", [Item("q0"), Item("q1")], [[Item("p0")], [Item("p1")]], [[Item("own0")], []],
                           "/s", image_root=str(img), ids=["S:0", "S:1"])
    neg = lambda t, im=None: {"text": t, "image": im, "instruction": ""}  # noqa: E731
    _mined(tmp_path / "m", "S", [
        {"id": "S:1", "negatives": [neg("b1"), neg("b2", "n.png")], "scores": [0.5, 0.4], "positive_score": 0.9},
        {"id": "S:0", "negatives": [neg("a1"), neg("a2"), neg("a3")], "scores": [0.3, 0.2, 0.1],
         "positive_score": 0.8},
    ])
    n_png = str((img / "n.png").resolve())
    r = attach_mined(rows, tmp_path / "m", k=2)
    assert r.negatives == [[Item("a1"), Item("a2")], [Item("b1"), Item("b2", n_png)]]
    assert rows.negatives == [[Item("own0")], []]  # the input is left as it was
    assert attach_mined(rows, tmp_path / "m").negatives[0] == [Item("a1"), Item("a2"), Item("a3")]
    r = attach_mined(rows, tmp_path / "m", k=1, mode="append")
    assert r.negatives == [[Item("own0"), Item("a1")], [Item("b1")]]
    with pytest.raises(DataError, match=r"1 row\(s\) have fewer than mined_k=3.*'S:1' has 2.*larger pool"):
        attach_mined(rows, tmp_path / "m", k=3)
    _mined(tmp_path / "m2", "S", [{"id": "S:0", "negatives": [neg("a1")]}])
    with pytest.raises(DataError, match=r"1 of 2 row\(s\) have no mined negatives \(first: 'S:1'\)"):
        attach_mined(rows, tmp_path / "m2")
    _mined(tmp_path / "m3", "S", [{"id": "S:0", "negatives": [neg("a", "../../x.png")]},
                                  {"id": "S:1", "negatives": [neg("b")]}])
    with pytest.raises(UnsafePathError):
        attach_mined(rows, tmp_path / "m3")
    with pytest.raises(MissingDataError, match="no mined negatives for dataset 'T'"):
        attach_mined(ContrastiveRows("T", [], [], [], "/t"), tmp_path / "m")


def test_mined_through_the_loaders(mmeb: tuple[Path, Path], tmp_path: Path) -> None:
    folder, img = mmeb
    ids = load_mmeb_train(folder, img, max_chars=80).ids
    _mined(tmp_path / "mined", "ImageNet_1K",
           [{"id": i, "negatives": [{"text": f"hard {i}", "image": None, "instruction": ""}]} for i in ids])
    rows = load_mmeb_train(folder, img, max_chars=80, mined=tmp_path / "mined", mined_k=1)
    assert rows.negatives == [[Item(f"hard {i}")] for i in ids]
    m = load_mixture([{"path": str(folder), "image_root": str(img)}], sub_batch=1, mined=str(tmp_path / "mined"),
                     max_chars=80)
    assert m.negatives == rows.negatives and m.sub_batch == 1


# ---------------------------------------------------------------------- mini MMEB-train
def test_mini_mmeb_train_layout_and_disjointness(tmp_path: Path) -> None:
    from e5v.mini import eval_data, mmeb_data, stage2_data
    from e5v.mini.world import sample_scenes

    root = tmp_path / "mmeb_train"
    m = stage2_data.mini_mmeb_train(root, n_rows=12, seed=0, sub_batch=4)
    assert m.names == list(stage2_data.SUBSETS) and len(m) == 60 and m.sub_batch == 4
    for s in stage2_data.SUBSETS:  # the real layout: file name, six string columns
        t = pq.read_table(root / s / "original-00000-of-00001.parquet")
        assert t.schema.names == list(COLS) and all(pa.types.is_string(x.type) for x in t.schema)
    rows = pq.read_table(root / "MiniShape" / "original-00000-of-00001.parquet").to_pylist()
    assert rows[0]["qry"] == "<|image_1|>\nRepresent the given image for classification"
    assert rows[0]["pos_text"] in ("circle", "square", "triangle") and rows[0]["neg_text"] != rows[0]["pos_text"]
    t2i = load_mmeb_train(root / "MiniScene_t2i", root / "images")
    assert t2i.queries[0].image is None and Path(t2i.positives[0][0].image).is_file() and t2i.skipped == {}
    # scenes: the images' captions are the t2i queries / i2t positives; all two-object training scenes
    caps = [q.text.split(": ", 1)[1] for q in t2i.queries]
    caps += [p[0].text for p in load_mmeb_train(root / "MiniScene_i2t", root / "images").positives]
    assert all(c.count(" at the ") == 2 for c in caps)  # two objects
    eval_root = eval_data.generate(tmp_path / "mini", seed=0, images=16, cirr_groups=2, fiq_images=4, sts_pairs=2,
                                   mmeb_queries=2, mmeb_candidates=4)
    held = {s.caption() for s in sample_scenes(2 * 16 + 8, seed=0, max_objects=2)}  # flickr / coco scenes
    assert not held & set(caps)
    coco = json.loads((eval_root / "coco" / "dataset_coco.json").read_text())
    coco_caps = {c["raw"] for im in coco["images"] for c in im["sentences"]}
    assert not coco_caps & set(caps)
    mini_mmeb_texts = set()
    for task in mmeb_data.TASK_NAMES:
        for r in mmeb_data.read_task(eval_root / "mmeb", task):
            mini_mmeb_texts |= {r["qry_text"], *r["tgt_text"]}
    assert not any(c in t for c in caps for t in mini_mmeb_texts)
    # a regeneration with the same values is a no-op; a user's folder is never written
    before = (root / stage2_data.MARKER).stat().st_mtime_ns
    stage2_data.ensure(root, n_rows=12, seed=0)
    assert (root / stage2_data.MARKER).stat().st_mtime_ns == before
    user = tmp_path / "user"
    user.mkdir()
    (user / "mine.txt").write_text("x")
    with pytest.raises(DataError, match="not generated mini MMEB-train"):
        stage2_data.ensure(user, n_rows=2)
    assert sorted(p.name for p in user.iterdir()) == ["mine.txt"]
    # deterministic from the seed
    again = stage2_data.generate(tmp_path / "again", n_rows=12, seed=0)
    for s in stage2_data.SUBSETS:
        assert pq.read_table(again / s / "original-00000-of-00001.parquet").equals(
            pq.read_table(root / s / "original-00000-of-00001.parquet"))


def test_data_configs(tmp_path: Path) -> None:
    from e5v.config import compose, instantiate

    cfg = compose("train", ["data=mini_mmeb_train", f"paths.data_dir={tmp_path}", "run_name=x",
                            "data.loader.n_rows=8"])
    m = instantiate(cfg.data.loader)
    assert isinstance(m, Mixture) and len(m) == 40 and m.sub_batch == cfg.data.sub_batch == 8
    cfg = compose("train", ["data=mmeb_train", f"paths.data_dir={tmp_path}", "run_name=x"])
    assert [d["name"] for d in cfg.data.loader.datasets][:2] == ["ImageNet_1K", "N24News"]
    assert len(cfg.data.loader.datasets) == 20
    with pytest.raises(MissingDataError, match=r"mmeb_train/ImageNet_1K not found.*git clone"):
        instantiate(cfg.data.loader)
