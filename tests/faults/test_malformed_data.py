"""Guarantee 4, malformed data: a clear error naming the file and the row or key, or, where a skip policy is
configured (NLI rows, ``on_bad_image=skip`` outside evaluation), a count of what was skipped.

Existing (not repeated here): tests/test_embedder.py::test_bad_image_raises_naming_file (corrupt, truncated,
zero-byte, missing), ::test_bad_image_skip_reports, ::test_paths_and_modes (16-bit, CMYK, RGBA, P, LA),
::test_truncation_keeps_template_suffix; tests/eval/test_eval_loaders.py::test_bad_rows_name_file_row_and_key,
::test_cirr_unknown_target_is_reported, ::test_sts_whitespace_and_bad_gold; tests/test_train.py::
test_missing_columns_fail_before_model_load, ::test_bad_rows_skipped_or_rejected. The skipped-row count in a
real run's train_info.json is checked in test_run_outputs.py.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import make_image
from e5v import Embedder
from e5v.data.images import BadImageError
from e5v.data.nli import DataError, load_triplets
from eval.loaders import DataFormatError

SIZES = {"images": 6, "cirr_groups": 2, "fiq_images": 6, "sts_pairs": 3}


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from e5v.mini.eval_data import generate

    return generate(tmp_path_factory.mktemp("malformed") / "mini", seed=3, **SIZES)


def copy_of(mini: Path, dataset: str, tmp: Path) -> Path:
    root = tmp / dataset
    shutil.copytree(mini / dataset, root)
    return root


def edit_json(path: Path, change: Any) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------------- images
def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A 60-byte PNG whose header declares width x height pixels (900 M: over PIL's bomb limit)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_naming_the_file(embedder: Embedder, tmp_path: Path) -> None:
    import importlib

    for module in ("eval.runner", "eval.encode", "e5v.embedder", "e5v.train"):
        importlib.import_module(module)  # everything imported: nobody lifted PIL's limit

    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS <= 89_478_485
    good, bomb = tmp_path / "good.png", tmp_path / "bomb.png"
    make_image(40, 40, seed=1).save(good)
    bomb.write_bytes(bomb_png())
    with pytest.raises(BadImageError, match=r"bomb\.png: decompression bomb refused by PIL's limit"):
        embedder.encode_image([good, bomb])
    skip = Embedder(embedder.backbone, embedder.prompt, on_bad_image="skip")
    assert skip.encode_image([good, bomb, good]).shape == (2, embedder.dim)
    assert [(s.index, s.source) for s in skip.last_skipped] == [(1, str(bomb))]


@pytest.mark.parametrize("kind", ["bomb", "garbage", "truncated", "empty"])
def test_bad_image_bytes_in_a_dataset_name_the_item(embedder: Embedder, tmp_path: Path, kind: str) -> None:
    """Images stored as bytes (Hugging Face parquet rows) are named by their row label, not '<BytesIO>'."""
    from e5v.prompts import load_prompt
    from eval.cache import EmbeddingCache
    from eval.encode import Encoder, ImageRef

    buf = io.BytesIO()
    make_image(64, 64, seed=2).save(buf, format="JPEG")
    data = {"bomb": bomb_png(), "garbage": b"\x89PNG\r\n\x1a\n" + b"junk" * 20, "truncated": buf.getvalue()[:300],
            "empty": b""}[kind]
    model = SimpleNamespace(embedder=embedder, fingerprint="t" * 64)
    enc = Encoder(model, load_prompt("e5v_llama3"), EmbeddingCache(tmp_path), progress=False)
    refs = [ImageRef(data=buf.getvalue(), label="good.jpg"), ImageRef(data=data, label="row-17.jpg")]
    with pytest.raises(BadImageError, match=r"row-17\.jpg"):
        enc.image(refs)
    assert not list(tmp_path.rglob("shard-*.json"))  # nothing half-encoded was cached


# ---------------------------------------------------------------------- annotation files
def _karpathy(mini: Path, tmp: Path) -> tuple[Any, Path]:
    from eval.loaders.captions import load_captions

    root = copy_of(mini, "coco", tmp)
    return (lambda: load_captions(root, "coco", annotation="dataset_coco.json")), root / "dataset_coco.json"


def _cirr(mini: Path, tmp: Path) -> tuple[Any, Path]:
    from eval.loaders.cirr import load_cirr

    root = copy_of(mini, "cirr", tmp)
    return (lambda: load_cirr(root, "val")), root / "captions" / "cap.rc2.val.json"


def _fiq(mini: Path, tmp: Path) -> tuple[Any, Path]:
    from eval.loaders.fashioniq import load_fashioniq

    root = copy_of(mini, "fashioniq", tmp)
    return (lambda: load_fashioniq(root, "dress")), root / "captions" / "cap.dress.val.json"


def _set(i: int, key: str, value: Any) -> Any:
    def change(d: Any) -> None:
        rows = d["images"] if isinstance(d, dict) else d
        rows[i][key] = value

    return change


def _drop(i: int, key: str) -> Any:
    def change(d: Any) -> None:
        rows = d["images"] if isinstance(d, dict) else d
        del rows[i][key]

    return change


CASES = {
    "karpathy sentences not a list": (_karpathy, _set(2, "sentences", "a dog"),
                                      r"row 2 key 'sentences' is a str, expected list"),
    "karpathy sentence without raw": (_karpathy, _set(2, "sentences", [{"tokens": ["a"]}]),
                                      r"row 2 sentence 0 has no key 'raw'"),
    "karpathy filename a number": (_karpathy, _set(1, "filename", 12), r"row 1 key 'filename' is a int"),
    "karpathy empty caption": (_karpathy, _set(0, "sentences", [{"raw": "   "}]), r"empty or non-string caption"),
    "cirr img_set a list": (_cirr, _set(1, "img_set", []), r"row 1 key 'img_set' is a list, expected dict"),
    "cirr pairid a string": (_cirr, _set(0, "pairid", "7"), r"row 0 key 'pairid' is a str, expected int"),
    "cirr no caption": (_cirr, _drop(3, "caption"), r"row 3 has no key 'caption'"),
    "cirr reference not in gallery": (_cirr, _set(0, "reference", "dev-404-0-img0"),
                                      r"row 0 reference 'dev-404-0-img0' is not in .*split\.rc2\.val\.json"),
    "cirr member not in gallery": (_cirr, _set(0, "img_set", {"id": 1, "members": ["dev-404-0-img0"]}),
                                   r"row 0 img_set member\(s\) \['dev-404-0-img0'\]"),
    "fashioniq three captions": (_fiq, _set(0, "captions", ["a", "b", "c"]), r"row 0 'captions' must hold exactly 2"),
    "fashioniq no target": (_fiq, _drop(1, "target"), r"row 1 has no key 'target'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_annotation_rows_name_file_row_and_key(mini: Path, tmp_path: Path, case: str) -> None:
    loader, change, pattern = CASES[case]
    load, path = loader(mini, tmp_path)
    edit_json(path, change)
    with pytest.raises(DataFormatError, match=pattern) as err:
        load()
    assert str(path) in str(err.value)


def test_non_utf8_annotation_and_sts_files_are_named(mini: Path, tmp_path: Path) -> None:
    from eval.loaders.senteval import load_sts

    load, path = _cirr(mini, tmp_path)
    path.write_bytes(path.read_bytes().replace(b'"caption": "', b'"caption": "\xff\xfe', 1))
    with pytest.raises(DataFormatError, match=rf"{path.name}: not UTF-8"):
        load()
    sts = copy_of(mini, "senteval", tmp_path)
    f = sts / "STS" / "STS12-en-test" / "STS.input.MSRpar.txt"
    f.write_bytes(b"caf\xe9 au lait\tcoffee\n" + f.read_bytes().split(b"\n", 1)[1])
    with pytest.raises(DataFormatError, match=r"STS\.input\.MSRpar\.txt: not UTF-8"):
        load_sts(sts, "STS12")


def test_whitespace_only_sts_sentence_names_file_and_line(mini: Path, tmp_path: Path) -> None:
    from eval.loaders.senteval import load_sts

    sts = copy_of(mini, "senteval", tmp_path)
    f = sts / "STS" / "STS13-en-test" / "STS.input.headlines.txt"
    lines = f.read_text().splitlines()
    lines[1] = "  \t" + lines[1].split("\t", 1)[1]
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"STS\.input\.headlines\.txt:2: sentence 1 is empty or whitespace"):
        load_sts(sts, "STS13")


# ---------------------------------------------------------------------- duplicate ids
def test_duplicate_image_in_a_caption_dataset_is_an_error(mini: Path, tmp_path: Path) -> None:
    load, path = _karpathy(mini, tmp_path)

    def duplicate(d: Any) -> None:
        test_rows = [r for r in d["images"] if r["split"] == "test"]
        d["images"].append(dict(test_rows[1]))

    edit_json(path, duplicate)
    with pytest.raises(DataFormatError, match=r"image '.*' appears twice \(entries 1 and \d+ of the split\)"):
        load()


def test_duplicate_ids_in_cirr_are_errors(mini: Path, tmp_path: Path) -> None:
    load, path = _cirr(mini, tmp_path)
    edit_json(path, lambda d: d.__setitem__(2, {**d[2], "pairid": d[0]["pairid"]}))
    with pytest.raises(DataFormatError, match=r"row 2 repeats pairid \d+ \(first at row 0\)"):
        load()
    load, _ = _cirr(mini, tmp_path / "again")
    split = tmp_path / "again" / "cirr" / "image_splits" / "split.rc2.val.json"
    text = split.read_text()
    first_key = next(iter(json.loads(text)))
    split.write_text(text.replace("{", "{" + json.dumps(first_key) + ': "./dev/other.png", ', 1))
    with pytest.raises(DataFormatError, match=rf"split\.rc2\.val\.json: key '{first_key}' appears twice"):
        load()


def test_duplicate_fashioniq_gallery_names_are_merged_and_counted_in_results(
    mini: Path, tmp_path: Path, tiny_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from e5v.config import compose
    from eval.runner import evaluate

    world = tmp_path / "mini"
    shutil.copytree(mini, world)
    split = world / "fashioniq" / "image_splits" / "split.dress.val.json"
    edit_json(split, lambda names: names.append(names[0]))
    cfg = compose("eval", [
        "backbone=tiny", "suite=mini", f"suite.mini.dir={world}", "suite.mini.seed=3",
        *[f"suite.mini.{k}={v}" for k, v in SIZES.items()],
        f"cache.dir={tmp_path / 'cache'}", "embedder.device=cpu", "progress=false", "report.plot=false",
        "report.history=null", "benchmarks=[fashioniq]", "benchmark.fashioniq.categories=[dress]",
    ])
    with caplog.at_level(logging.WARNING, logger="eval.loaders.fashioniq"):
        res = evaluate(cfg, output_dir=tmp_path / "out")
    assert "1 duplicate image name(s) merged" in caplog.text and "split.dress.val.json" in caplog.text
    assert res["info"]["fashioniq"]["dress"]["duplicate_gallery_names_merged"] == 1
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["info"]["fashioniq"]["dress"]["duplicate_gallery_names_merged"] == 1


# ---------------------------------------------------------------------- NLI training data
def test_nli_non_utf8_row_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "nli.csv"
    f.write_bytes(b"sent0,sent1,hard_neg\n" + b"a dog,an animal,a cat\n" * 3000 + b"caf\xe9,b,c\n")
    with pytest.raises(DataError, match=r"nli\.csv: line 3002: not valid UTF-8 \(byte 0xe9"):
        load_triplets(path=str(f), cache_dir=str(tmp_path / "hf"))


def test_nli_whitespace_and_runaway_rows_are_counted_or_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "nli.csv"
    long = "word " * 2000  # 10,000 characters: a document pasted into a cell
    f.write_text(f"sent0,sent1,hard_neg\na,b,c\n\t ,b,c\nd,e,{long}\ng,h,i\n,k,l\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="e5v.data.nli"):
        t = load_triplets(path=str(f), cache_dir=str(tmp_path / "hf"))
    assert t.anchors == ["a", "g"]
    assert t.skipped == {"missing": 1, "empty": 1, "too_long": 1}
    assert "skipped 3 bad row(s)" in caplog.text and str(f) in caplog.text
    with pytest.raises(DataError, match=r"nli\.csv: row 3: column 'sent0' is empty"):
        load_triplets(path=str(f), on_bad_row="error", cache_dir=str(tmp_path / "hf"))
    g = tmp_path / "long.csv"
    g.write_text(f"sent0,sent1,hard_neg\na,b,c\nd,e,{long}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"long\.csv: row 3: column 'hard_neg' has 10000 characters"):
        load_triplets(path=str(g), on_bad_row="error", cache_dir=str(tmp_path / "hf"))
    assert len(load_triplets(path=str(g), max_chars=None, cache_dir=str(tmp_path / "hf"))) == 2


def test_extremely_long_text_at_evaluation_is_shortened_and_reported(
    embedder: Embedder, caplog: pytest.LogCaptureFixture
) -> None:
    text = "a red circle " * 4000  # 52,000 characters
    with caplog.at_level(logging.WARNING):
        out = embedder.encode_text(["short", text])
    assert out.shape == (2, embedder.dim) and np.isfinite(out).all()
    assert embedder.last_truncated == [1] and "had their text shortened" in caplog.text
