"""e5v-encode: text file, image folder, JSONL; outputs, ids, refusal to overwrite, path safety."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_image
from e5v.cli.encode import main


def test_encode_texts(tmp_path, embedder) -> None:
    f = tmp_path / "t.txt"
    f.write_text("a red circle\ntwo blue squares\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["--model", "tiny", "--device", "cpu", "--texts", str(f), "--out", str(out)]) == 0
    x = np.load(out / "embeddings.npy")
    assert x.shape == (2, embedder.dim)
    assert (out / "ids.txt").read_text().split() == ["0", "1"]
    np.testing.assert_allclose(x, embedder.encode_text(["a red circle", "two blue squares"]), atol=1e-6)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["count"] == 2 and meta["prompt"] == "e5v_llama3"
    with pytest.raises(SystemExit, match="--overwrite"):
        main(["--model", "tiny", "--device", "cpu", "--texts", str(f), "--out", str(out)])
    f.write_text("only one\n")
    main(["--model", "tiny", "--device", "cpu", "--texts", str(f), "--out", str(out), "--overwrite"])
    assert np.load(out / "embeddings.npy").shape == (1, embedder.dim)


def test_encode_texts_rejects_empty_line(tmp_path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("a\n\nb\n")
    with pytest.raises(SystemExit, match=r"t\.txt:2: empty line"):
        main(["--model", "tiny", "--texts", str(f), "--out", str(tmp_path / "o")])


def test_encode_image_folder_with_skip(tmp_path, embedder) -> None:
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    make_image(40, 30, 0).save(folder / "b.png")
    make_image(30, 60, 1).save(folder / "sub" / "a.jpg")
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    main(["--model", "tiny", "--device", "cpu", "--images", str(folder), "--out", str(out), "--on-bad-image", "skip"])
    ids = (out / "ids.txt").read_text().split()
    assert ids == ["b.png", "sub/a.jpg"]
    x = np.load(out / "embeddings.npy")
    np.testing.assert_allclose(x, embedder.encode_image([folder / i for i in ids]), atol=1e-6)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped"][0]["id"] == "broken.png"


def test_encode_speed_options_give_the_same_embeddings(tmp_path, embedder) -> None:
    """--num-workers, --max-batch-tokens, --packing, --pack-tokens (the embedder group's options) change how
    the work is done, not the numbers; bad values are one line naming the option, before any model loads."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (w, h) in enumerate([(40, 30), (30, 60), (64, 64)]):
        make_image(w, h, i).save(folder / f"{i}.png")
    base = ["--model", "tiny", "--device", "cpu", "--images", str(folder)]
    main([*base, "--out", str(tmp_path / "a")])
    main([*base, "--out", str(tmp_path / "b"), "--num-workers", "2", "--max-batch-tokens", "400", "--batch-size", "2",
          "--packing", "true", "--pack-tokens", "64"])
    np.testing.assert_allclose(np.load(tmp_path / "b" / "embeddings.npy"), np.load(tmp_path / "a" / "embeddings.npy"),
                               atol=1e-5)
    meta_a, meta_b = (json.loads((tmp_path / d / "meta.json").read_text()) for d in "ab")
    assert (meta_a["packed"], meta_b["packed"]) == (False, True)  # CPU: auto = padded; --packing true packs
    assert meta_b["options"] == {"batch_size": 2, "max_batch_tokens": 400, "num_workers": 2, "packing": "true",
                                 "pack_tokens": 64, "compile": False, "dim": None}
    for opt, value, says in [("--num-workers", "-1", "must be >= 0"), ("--max-batch-tokens", "0", "must be >= 1"),
                             ("--pack-tokens", "0", "must be >= 1")]:
        with pytest.raises(SystemExit, match=f"{opt} {value}: {says}"):
            main([*base, "--out", str(tmp_path / "c"), opt, value])


def test_encode_jsonl_and_path_escape(tmp_path, embedder) -> None:
    root = tmp_path / "data"
    root.mkdir()
    make_image(40, 40, 3).save(root / "ref.png")
    f = root / "q.jsonl"
    f.write_text(json.dumps({"id": "q1", "image": "ref.png", "text": "make it red"}) + "\n")
    out = tmp_path / "out"
    main(["--model", "tiny", "--device", "cpu", "--jsonl", str(f), "--out", str(out)])
    assert (out / "ids.txt").read_text().split() == ["q1"]
    np.testing.assert_allclose(
        np.load(out / "embeddings.npy"),
        embedder.encode_interleaved([(root / "ref.png", "make it red")], template="cirr_query"),
        atol=1e-6,
    )
    (tmp_path / "secret.png").write_bytes(b"x")
    f.write_text(json.dumps({"image": "../secret.png", "text": "t"}) + "\n")
    with pytest.raises(SystemExit, match="escapes the data root"):  # one-line CLI error (e5v/cli/errors.py)
        main(["--model", "tiny", "--jsonl", str(f), "--out", str(tmp_path / "o2")])
    f.write_text(json.dumps({"image": "ref.png"}) + "\n")
    with pytest.raises(SystemExit, match=r"q\.jsonl:1: key 'text'"):
        main(["--model", "tiny", "--jsonl", str(f), "--out", str(tmp_path / "o3")])


def test_help_documents_inputs() -> None:
    out = subprocess.run([sys.executable, "-m", "e5v.cli.encode", "--help"], capture_output=True, text=True, check=True)
    for word in ("--texts", "--images", "--jsonl", "embeddings.npy", "ids.txt"):
        assert word in out.stdout
