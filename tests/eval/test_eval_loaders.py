"""Dataset readers on generated fixtures in the official formats, and their error messages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from e5v.mini.eval_data import generate
from eval.loaders import DataFormatError, MissingDataError
from eval.loaders.captions import load_captions
from eval.loaders.cirr import load_cirr
from eval.loaders.fashioniq import load_fashioniq
from eval.loaders.senteval import STS_SUBSETS, TASKS, load_sts

from evalkit import SMALL


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("mini"), seed=3, **SMALL)


def test_generation_is_deterministic(mini: Path, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", seed=3, **SMALL)
    for rel in (
        "coco/dataset_coco.json",
        "cirr/captions/cap.rc2.val.json",
        "fashioniq/captions/cap.dress.val.json",
        "senteval/STS/STS12-en-test/STS.input.MSRpar.txt",
        "cirr/dev/dev-0-0-img0.png",
    ):
        assert (mini / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_hf_parquet_layout_filters_the_test_split(mini: Path) -> None:
    d = load_captions(mini / "flickr30k", "flickr30k", annotation="dataset_flickr30k.json")
    assert len(d.images) == SMALL["images"] and len(d.captions) == 5 * SMALL["images"]
    assert all(im.data is not None for im in d.images)  # image bytes from the parquet file
    assert d.image_captions[1] == [5, 6, 7, 8, 9]


def test_karpathy_coco_first_five_vs_all_captions(mini: Path) -> None:
    first5 = load_captions(mini / "coco", "coco", annotation="dataset_coco.json", max_captions=5)
    every = load_captions(mini / "coco", "coco", annotation="dataset_coco.json", max_captions=None)
    n = SMALL["images"]
    assert len(first5.images) == len(every.images) == n  # train/restval rows skipped
    assert len(first5.captions) == 5 * n
    extra = sum(1 for i in range(n) if i % 5 == 1) + 2 * sum(1 for i in range(n) if i % 5 == 3)
    assert len(every.captions) == 5 * n + extra > 5 * n  # like 25,010 vs 25,000
    assert first5.images[0].path is not None and first5.images[0].path.parent.name == "val2014"


def test_clip_benchmark_layout(tmp_path: Path, mini: Path) -> None:
    shutil.copytree(mini / "coco" / "val2014", tmp_path / "imgs")
    names = sorted(p.name for p in (tmp_path / "imgs").iterdir())[:2]
    ann = [{"image": f"imgs/{n}", "caption": [f"cap {n} 1", f"cap {n} 2"]} for n in names]
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    d = load_captions(tmp_path, "flickr30k", annotation="ann.json")
    assert d.captions == [f"cap {names[0]} 1", f"cap {names[0]} 2", f"cap {names[1]} 1", f"cap {names[1]} 2"]
    assert d.caption_image.tolist() == [0, 0, 1, 1]


def test_missing_data_names_path_and_make_target(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError) as e:
        load_captions(tmp_path / "nowhere", "flickr30k")
    assert str(tmp_path / "nowhere") in str(e.value) and "make data-flickr30k" in str(e.value)
    (tmp_path / "cirr").mkdir()
    with pytest.raises(MissingDataError, match=r"cap\.rc2\.val\.json.*make data-cirr"):
        load_cirr(tmp_path / "cirr")
    with pytest.raises(MissingDataError, match="make data-senteval"):
        load_sts(tmp_path, "STS12")


def test_bad_rows_name_file_row_and_key(tmp_path: Path, mini: Path) -> None:
    root = tmp_path / "coco"
    shutil.copytree(mini / "coco", root)
    data = json.loads((root / "dataset_coco.json").read_text())
    del data["images"][2]["sentences"]
    (root / "dataset_coco.json").write_text(json.dumps(data))
    with pytest.raises(DataFormatError, match=r"dataset_coco\.json: row 2 has no key 'sentences'"):
        load_captions(root, "coco", annotation="dataset_coco.json")
    data["images"][2]["sentences"] = [{"raw": "x"}]
    data["images"][3]["filepath"] = "../../etc"
    (root / "dataset_coco.json").write_text(json.dumps(data))
    with pytest.raises(DataFormatError, match="escapes the data root"):
        load_captions(root, "coco", annotation="dataset_coco.json")


def test_cirr_val_and_test1(mini: Path) -> None:
    val = load_cirr(mini / "cirr", "val")
    assert len(val.queries) == 4 * SMALL["cirr_groups"] and len(val.gallery) == 6 * SMALL["cirr_groups"]
    q = val.queries[0]
    assert q.target in q.members and q.reference in q.members and q.target != q.reference
    test1 = load_cirr(mini / "cirr", "test1")
    assert all(q.target is None for q in test1.queries)
    split = json.loads((mini / "cirr/image_splits/split.rc2.val.json").read_text())
    assert split[val.gallery_names[0]].startswith("./dev/")


def test_cirr_unknown_target_is_reported(tmp_path: Path, mini: Path) -> None:
    root = tmp_path / "cirr"
    shutil.copytree(mini / "cirr", root)
    caps = json.loads((root / "captions/cap.rc2.val.json").read_text())
    caps[1]["target_hard"] = "dev-99-9-img0"
    (root / "captions/cap.rc2.val.json").write_text(json.dumps(caps))
    with pytest.raises(DataFormatError, match=r"row 1 target_hard 'dev-99-9-img0' is not in .*split\.rc2\.val\.json"):
        load_cirr(root)


def test_fashioniq_categories_and_jpg_twin(tmp_path: Path, mini: Path) -> None:
    root = tmp_path / "fiq"
    shutil.copytree(mini / "fashioniq", root)
    d = load_fashioniq(root, "toptee")
    assert len(d.gallery) == SMALL["fiq_images"] and all(len(q.captions) == 2 for q in d.queries)
    name = d.gallery_names[0]
    (root / "images" / f"{name}.png").rename(root / "images" / f"{name}.jpg")
    assert load_fashioniq(root, "toptee").gallery[0].path.suffix == ".jpg"
    with pytest.raises(ValueError, match="category"):
        load_fashioniq(root, "shoes")


def test_sts_files_read_like_senteval(mini: Path) -> None:
    for task in TASKS:
        p = load_sts(mini / "senteval", task)
        assert len(p.sent_a) == len(p.sent_b) == len(p.gold) >= 2
    sts16 = load_sts(mini / "senteval", "STS16")
    # one gold line is empty in the first STS16 subset: that pair is dropped
    assert len(sts16) == SMALL["sts_pairs"] * len(STS_SUBSETS["STS16"]) - 1
    sts12 = load_sts(mini / "senteval", "STS12")
    assert sorted(set(sts12.subset)) == sorted(STS_SUBSETS["STS12"])


def test_sts_whitespace_and_bad_gold(tmp_path: Path) -> None:
    folder = tmp_path / "STS" / "STSBenchmark"
    folder.mkdir(parents=True)
    (folder / "sts-test.csv").write_text(
        "g\tf\t2012\t1\t4.5\tA  dog\truns.\tA dog runs.\ng\tf\t2012\t2\t1.0\tA cat.\tA car.\n"
    )
    p = load_sts(tmp_path, "STSBenchmark")
    assert p.sent_a == ["A dog", "A cat."] and p.gold == [4.5, 1.0]
    (folder / "sts-test.csv").write_text("g\tf\t2012\t1\thigh\ta\tb\n")
    with pytest.raises(DataFormatError, match=r"sts-test\.csv:1: gold score 'high'"):
        load_sts(tmp_path, "STSBenchmark")


def test_mini_ensure_reuses_regenerates_and_refuses_foreign_folders(tmp_path: Path) -> None:
    from e5v.mini.eval_data import ensure

    out = ensure(tmp_path / "m", seed=1, **SMALL)
    stamp = (out / "mini.json").stat().st_mtime_ns
    assert ensure(tmp_path / "m", seed=1, **SMALL) == out and (out / "mini.json").stat().st_mtime_ns == stamp
    ensure(tmp_path / "m", seed=1, **{**SMALL, "images": 6})  # other sizes: regenerated in place
    assert json.loads((out / "mini.json").read_text())["sizes"]["images"] == 6
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a mini-data folder"):
        ensure(tmp_path / "foreign")
