"""Guarantee 5, path safety: an image path read from a dataset file (JSON, parquet) cannot leave the configured
data root: ``..`` escapes, absolute paths and symlinks that point outside are rejected with an error naming
the annotation file and row.

Existing: tests/test_paths.py::test_safe_join (the helper), tests/eval/test_eval_loaders.py::
test_bad_rows_name_file_row_and_key (a Karpathy ``filepath`` of ``../../etc``), tests/test_cli.py::
test_encode_jsonl_and_path_escape (``e5v-encode --jsonl``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import make_image
from eval.loaders import DataFormatError

SIZES = {"images": 4, "cirr_groups": 2, "fiq_images": 4, "sts_pairs": 2}
ATTACKS = ("dotdot", "absolute", "symlink")


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from e5v.mini.eval_data import generate

    return generate(tmp_path_factory.mktemp("paths") / "mini", seed=5, **SIZES)


@pytest.fixture()
def outside(tmp_path: Path) -> Path:
    """A real image outside every data root: what an attacker would like us to read."""
    d = tmp_path / "outside"
    d.mkdir()
    make_image(40, 40, seed=9).save(d / "secret.png")
    return d


def hostile(attack: str, root: Path, outside: Path, prefix: str = "") -> str:
    """A path, as written in the dataset file, that points at outside/secret.png."""
    if attack == "dotdot":
        depth = len(Path(prefix).parts) if prefix else 0
        return "../" * (depth + 1) + os.path.relpath(outside / "secret.png", root.parent)
    if attack == "absolute":
        return str(outside / "secret.png")
    link_dir = root / Path(prefix) if prefix else root
    link_dir.mkdir(parents=True, exist_ok=True)
    (link_dir / "evil").symlink_to(outside, target_is_directory=True)
    return "evil/secret.png"


def assert_refused(err: pytest.ExceptionInfo[Any], annotation: Path) -> None:
    msg = str(err.value)
    assert "escapes the data root" in msg or "absolute path" in msg, msg
    assert str(annotation) in msg and "row" in msg, msg


@pytest.mark.parametrize("attack", ATTACKS)
def test_clip_benchmark_image_paths_stay_inside(mini: Path, tmp_path: Path, outside: Path, attack: str) -> None:
    from eval.loaders.captions import load_captions

    root = tmp_path / "flickr"
    shutil.copytree(mini / "coco" / "val2014", root / "imgs")
    good = sorted(p.name for p in (root / "imgs").iterdir())[0]
    ann = [{"image": f"imgs/{good}", "caption": ["a"]}, {"image": hostile(attack, root, outside), "caption": ["b"]}]
    (root / "ann.json").write_text(json.dumps(ann))
    with pytest.raises(DataFormatError) as err:
        load_captions(root, "flickr30k", format="clip_benchmark", annotation="ann.json")
    assert_refused(err, root / "ann.json")
    assert "row 1" in str(err.value)


@pytest.mark.parametrize("attack", ATTACKS)
def test_karpathy_filenames_stay_inside(mini: Path, tmp_path: Path, outside: Path, attack: str) -> None:
    from eval.loaders.captions import load_captions

    root = tmp_path / "coco"
    shutil.copytree(mini / "coco", root)
    ann = root / "dataset_coco.json"
    data = json.loads(ann.read_text())
    row = next(i for i, e in enumerate(data["images"]) if e["split"] == "test")
    entry = data["images"][row]
    if attack == "symlink":
        hostile("symlink", root, outside, prefix=entry["filepath"])
        entry["filename"] = "evil/secret.png"
    else:
        entry["filename"] = hostile(attack, root, outside, prefix=entry["filepath"])
    ann.write_text(json.dumps(data))
    with pytest.raises(DataFormatError) as err:
        load_captions(root, "coco", annotation="dataset_coco.json")
    assert_refused(err, ann)


@pytest.mark.parametrize("attack", ATTACKS)
def test_cirr_split_paths_stay_inside(mini: Path, tmp_path: Path, outside: Path, attack: str) -> None:
    from eval.loaders.cirr import load_cirr

    root = tmp_path / "cirr"
    shutil.copytree(mini / "cirr", root)
    split = root / "image_splits" / "split.rc2.val.json"
    names = json.loads(split.read_text())
    victim = sorted(names)[1]
    names[victim] = hostile(attack, root, outside)
    split.write_text(json.dumps(names))
    with pytest.raises(DataFormatError) as err:
        load_cirr(root, "val")
    assert_refused(err, split)
    assert victim in str(err.value)  # the row of a {name: path} file is its key


@pytest.mark.parametrize("attack", ["dotdot", "symlink"])
def test_fashioniq_names_stay_inside(mini: Path, tmp_path: Path, outside: Path, attack: str) -> None:
    """FashionIQ files hold image NAMES put into ``images/{name}.png``; an absolute name stays inside the
    pattern's folder (``images//etc/x.png``), so only ``..`` and symlinks can point outside."""
    from eval.loaders.fashioniq import load_fashioniq

    root = tmp_path / "fiq"
    shutil.copytree(mini / "fashioniq", root)
    split = root / "image_splits" / "split.dress.val.json"
    names = json.loads(split.read_text())
    if attack == "dotdot":
        names[1] = "../../outside/secret"
    else:
        (root / "images" / "evil.png").symlink_to(outside / "secret.png")
        names[1] = "evil"
    split.write_text(json.dumps(names))
    with pytest.raises(DataFormatError) as err:
        load_fashioniq(root, "dress")
    assert_refused(err, split)


@pytest.mark.parametrize("attack", ATTACKS)
def test_parquet_image_paths_stay_inside(tmp_path: Path, outside: Path, attack: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from eval.loaders.captions import load_captions

    root = tmp_path / "hf"
    (root / "data").mkdir(parents=True)
    make_image(40, 40, seed=1).save(root / "ok.png")
    rows = [
        {"image": {"bytes": None, "path": "ok.png"}, "caption": ["a"]},
        {"image": {"bytes": None, "path": hostile(attack, root, outside)}, "caption": ["b"]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "test-00000-of-00001.parquet")
    with pytest.raises(DataFormatError) as err:
        load_captions(root, "flickr30k", format="hf")
    assert_refused(err, root / "data" / "test-00000-of-00001.parquet")


def test_symlinks_that_stay_inside_the_root_are_fine(mini: Path, tmp_path: Path) -> None:
    from eval.loaders.cirr import load_cirr

    root = tmp_path / "cirr"
    shutil.copytree(mini / "cirr", root)
    (root / "alias").symlink_to(root / "dev", target_is_directory=True)
    split = root / "image_splits" / "split.rc2.val.json"
    names = json.loads(split.read_text())
    victim = sorted(names)[0]
    names[victim] = names[victim].replace("./dev/", "alias/")
    split.write_text(json.dumps(names))
    data = load_cirr(root, "val")
    assert data.gallery[0].path == (root / "dev" / Path(names[victim]).name).resolve()
