"""Embedding cache: round trip, validation on read, resume after an interrupted encoding, no pickle."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from e5v.prompts import PromptSet
from eval.cache import EmbeddingCache, sha
from eval.encode import Encoder, FileHasher, ImageRef


class FakeModel:
    """ModelHandle stand-in: counts encoded items, can fail after N embedder calls."""

    def __init__(self, fingerprint: str = "f" * 64, dim: int = 8, fail_after: int | None = None) -> None:
        self.fingerprint = fingerprint
        self.encoded: list[str] = []
        outer = self

        class _Emb:
            calls = 0

            def encode_text(self, texts, normalize=True, template="text", category=None):  # noqa: ANN001, ANN202
                _Emb.calls += 1
                if fail_after is not None and _Emb.calls > fail_after:
                    raise KeyboardInterrupt("simulated kill")
                outer.encoded.extend(texts)
                return np.stack([np.full(dim, len(t) + 1.0, np.float32) + np.arange(dim) for t in texts])

            def encode_image(self, images, normalize=True, template="image", category=None):  # noqa: ANN001, ANN202
                outer.encoded.extend(str(i) for i in images)
                return np.ones((len(images), dim), np.float32)

        self.embedder = _Emb()


@pytest.fixture()
def prompt() -> PromptSet:
    from e5v.prompts import load_prompt

    return load_prompt("e5v_llama3")


def test_roundtrip_dedup_and_normalisation(tmp_path: Path, prompt: PromptSet) -> None:
    model = FakeModel()
    enc = Encoder(model, prompt, EmbeddingCache(tmp_path), shard_size=2)
    texts = ["a", "bb", "a", "ccc", "dddd"]
    raw = enc.text(texts, normalize=False)
    assert model.encoded == ["a", "bb", "ccc", "dddd"]  # duplicates encoded once
    np.testing.assert_array_equal(raw[0], raw[2])
    normed = enc.text(texts)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, atol=1e-6)
    assert len(model.encoded) == 4  # second request: all from the cache
    enc2 = Encoder(FakeModel(), prompt, EmbeddingCache(tmp_path), shard_size=2)  # a new process
    np.testing.assert_array_equal(enc2.text(texts, normalize=False), raw)
    assert enc2.model.encoded == []
    # another prompt template or another model fingerprint is another namespace
    enc2.text(["a"], template="sts", normalize=False)
    assert enc2.model.encoded == ["a"]
    other = Encoder(FakeModel(fingerprint="e" * 64), prompt, EmbeddingCache(tmp_path))
    other.text(["a"])
    assert other.model.encoded == ["a"]


def test_interrupted_encoding_resumes_from_last_shard(tmp_path: Path, prompt: PromptSet) -> None:
    texts = [f"sentence {i}" for i in range(10)]
    model = FakeModel(fail_after=2)
    enc = Encoder(model, prompt, EmbeddingCache(tmp_path), shard_size=3)
    with pytest.raises(KeyboardInterrupt):
        enc.text(texts)
    assert len(model.encoded) == 6  # two shards of 3 were committed before the "kill"
    model2 = FakeModel()
    out = Encoder(model2, prompt, EmbeddingCache(tmp_path), shard_size=3).text(texts, normalize=False)
    assert model2.encoded == texts[6:]  # only the unfinished items
    full = Encoder(FakeModel(), prompt, EmbeddingCache(tmp_path / "fresh"), shard_size=3).text(texts, normalize=False)
    np.testing.assert_array_equal(out, full)


def _shards(root: Path) -> list[Path]:
    return sorted(root.rglob("shard-*.json"))


@pytest.mark.parametrize("damage", ["truncate_npy", "wrong_fingerprint", "shape", "pickled_object", "bad_json"])
def test_bad_shards_are_dropped_and_reencoded(tmp_path: Path, prompt: PromptSet, damage: str, caplog) -> None:  # noqa: ANN001
    enc = Encoder(FakeModel(), prompt, EmbeddingCache(tmp_path), shard_size=10)
    good = enc.text(["x", "y"], normalize=False)
    (meta,) = _shards(tmp_path)
    npy = meta.with_suffix(".npy")
    record = json.loads(meta.read_text())
    if damage == "truncate_npy":
        npy.write_bytes(npy.read_bytes()[:-5])
    elif damage == "wrong_fingerprint":
        record["fingerprint"] = "0" * 64
        meta.write_text(json.dumps(record))
    elif damage == "shape":
        record["keys"] = record["keys"][:1]
        meta.write_text(json.dumps(record))
    elif damage == "pickled_object":
        buf = io.BytesIO()
        np.save(buf, np.array([{"evil": 1}, None], dtype=object), allow_pickle=True)
        npy.write_bytes(buf.getvalue())
    else:
        meta.write_text("{not json")
    model = FakeModel()
    with caplog.at_level(logging.WARNING, logger="eval.cache"):
        again = Encoder(model, prompt, EmbeddingCache(tmp_path), shard_size=10).text(["x", "y"], normalize=False)
    assert "dropping bad shard" in caplog.text
    assert model.encoded == ["x", "y"]  # re-encoded, not served from the damaged shard
    np.testing.assert_array_equal(again, good)


def test_shard_files_are_plain_npy_and_json(tmp_path: Path, prompt: PromptSet) -> None:
    Encoder(FakeModel(), prompt, EmbeddingCache(tmp_path), shard_size=10).text(["x"])
    (meta,) = _shards(tmp_path)
    record = json.loads(meta.read_text())
    assert record["keys"] == [sha("text", "x")] and record["dtype"] == "float32" and record["shape"] == [1, 8]
    arr = np.load(meta.with_suffix(".npy"), allow_pickle=False)
    assert arr.dtype == np.float32 and arr.shape == (1, 8)
    ns = json.loads((meta.parent / "namespace.json").read_text())
    assert ns["prompt"] == prompt.template("text") and ns["fingerprint"] == "f" * 64
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporaries


def test_disabled_cache_still_never_encodes_twice(tmp_path: Path, prompt: PromptSet) -> None:
    model = FakeModel()
    enc = Encoder(model, prompt, EmbeddingCache(tmp_path, enabled=False))
    enc.text(["a", "b"])
    enc.text(["b", "a"])
    assert model.encoded == ["a", "b"]
    assert not list(tmp_path.rglob("*"))


def test_image_keys_follow_content_not_path(tmp_path: Path, prompt: PromptSet) -> None:
    from PIL import Image

    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    Image.new("RGB", (4, 4), "red").save(a)
    b.write_bytes(a.read_bytes())  # same bytes, another name
    Image.new("RGB", (4, 4), "blue").save(c)
    model = FakeModel()
    hasher = FileHasher(tmp_path / "hashes.json")
    enc = Encoder(model, prompt, EmbeddingCache(tmp_path / "cache"), hasher=hasher)
    enc.image([ImageRef(path=a), ImageRef(path=b), ImageRef(path=c), ImageRef(data=c.read_bytes(), label="mem")])
    assert model.encoded == [str(a), str(c)]
    hasher.save()
    assert len(json.loads((tmp_path / "hashes.json").read_text())) == 3


def test_stat_memo_hits_while_files_are_unchanged_and_merges_on_save(tmp_path) -> None:
    """eval.memo.StatMemo (the model-fingerprint memo and the image-hash memo): a value comes back only while
    the file stamp is the same; an edited file, an old-format or corrupt memo file is a miss; save() keeps
    what another process wrote meanwhile."""
    import os

    from eval.memo import StatMemo, file_stamp

    f = tmp_path / "w.safetensors"
    f.write_bytes(b"1234")
    memo_file = tmp_path / "memo.json"
    m = StatMemo(memo_file)
    m.put("k", [file_stamp(f)], "fp1")
    m.save()
    assert StatMemo(memo_file).get("k", [file_stamp(f)]) == "fp1"
    f.write_bytes(b"12345")  # size changes
    assert StatMemo(memo_file).get("k", [file_stamp(f)]) is None
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, touched
    m2 = StatMemo(memo_file)
    m2.put("k", [file_stamp(f)], "fp2")
    other = StatMemo(memo_file)
    other.put("x", [], "from another process")
    other.save()
    m2.save()
    assert json.loads(memo_file.read_text())["x"]["value"] == "from another process"
    assert StatMemo(memo_file).get("k", [file_stamp(f)]) == "fp2"
    memo_file.write_text(json.dumps({"k": "an old-format entry"}))
    assert StatMemo(memo_file).get("k", [file_stamp(f)]) is None
    memo_file.write_text("{torn")
    assert StatMemo(memo_file).get("k", [file_stamp(f)]) is None


def test_fingerprint_identity_records_the_resolved_dtype() -> None:
    """embedder.dtype=auto is recorded as what it resolves to here (float32 on the CPU), so a CPU run shares cache
    entries with float32 and never with a GPU's bfloat16 run; aliases (fp32) record the same name."""
    from e5v.backbones.base import dtype_name
    from e5v.config import compose
    from eval.model import ModelHandle

    def ident(dtype: str) -> dict:
        return ModelHandle(compose("eval", ["backbone=tiny", "suite=mini", f"embedder.dtype={dtype}"])).identity()

    assert ident("auto") == ident("float32") == ident("fp32")
    assert ident("auto")["dtype"] == "float32" and ident("bfloat16")["dtype"] == "bfloat16"
    assert ident("float16") != ident("float32")
    assert dtype_name("auto", "cpu") == "float32"
