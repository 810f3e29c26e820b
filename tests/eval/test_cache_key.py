"""Embedding-cache namespaces are keyed on what prepares the model's inputs, not only on the weights:
a CPU box without torchvision (PIL image processor) and a GPU box with it (torchvision processor)
make different pixels, so their embeddings must not share cache entries; nor may two transformers
versions, or one checkpoint with another tokenizer/processor config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from e5v.prompts import load_prompt
from eval import encode
from eval.cache import EmbeddingCache
from eval.encode import Encoder, namespace_fingerprint, runtime_identity


class _Model:
    """ModelHandle stand-in: a fixed fingerprint, counts what it encodes."""

    def __init__(self, folder: Path | None = None) -> None:
        self.fingerprint = "f" * 64
        self.encoded: list[str] = []
        self.folder = folder
        outer = self

        class _Emb:
            def encode_text(self, texts, normalize=True, template="text", category=None):  # noqa: ANN001, ANN202
                outer.encoded.extend(texts)
                return np.ones((len(texts), 4), np.float32)

        self.embedder = _Emb()

    def backbone_config(self) -> dict:
        return {"_target_": "e5v.backbones.llava_next.load", "name_or_path": str(self.folder)} if self.folder else {}


BASE = {"image_backend": "pil", "transformers": "5.24.0", "tokenizers": "0.23.3", "torch": "2.13.0",
        "torchvision": None, "pillow": "13.0.0", "preprocessing_files": None}


@pytest.mark.parametrize(
    "change",
    [
        {"image_backend": "torchvision", "torchvision": "0.28.0"},  # GPU box: torchvision processor
        {"image_backend": "torchvision"},
        {"transformers": "4.44.2"},
        {"tokenizers": "0.19.1"},
        {"torch": "2.5.1"},
        {"pillow": "10.4.0"},
        {"preprocessing_files": "a" * 64},
    ],
)
def test_namespaces_differ_when_the_runtime_differs(tmp_path: Path, change: dict) -> None:
    prompt = load_prompt("e5v_llama3")
    assert namespace_fingerprint("f" * 64, BASE) != namespace_fingerprint("f" * 64, {**BASE, **change})
    first, second = _Model(), _Model()
    Encoder(first, prompt, EmbeddingCache(tmp_path), runtime=BASE, progress=False).text(["a", "b"])
    Encoder(second, prompt, EmbeddingCache(tmp_path), runtime={**BASE, **change}, progress=False).text(["a", "b"])
    assert second.encoded == ["a", "b"]  # not served from the other runtime's entries
    third = _Model()
    Encoder(third, prompt, EmbeddingCache(tmp_path), runtime=dict(BASE), progress=False).text(["a", "b"])
    assert third.encoded == []  # same runtime: cached


def test_runtime_identity_detects_backend_and_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    versions = {"transformers": "5.24.0", "tokenizers": "0.23.3", "torch": "2.13.0+cpu", "torchvision": "0.28.0+cu128",
                "pillow": "13.0.0"}
    monkeypatch.setattr(encode, "package_version", lambda pkg: versions.get(pkg))
    monkeypatch.setattr(encode, "image_backend", lambda: "pil")
    cpu = runtime_identity()
    assert cpu["image_backend"] == "pil" and cpu["torchvision"] is None  # installed but unusable: PIL classes
    assert cpu["torch"] == "2.13.0" and cpu["transformers"] == "5.24.0"  # build tag (+cpu/+cu128) dropped
    monkeypatch.setattr(encode, "image_backend", lambda: "torchvision")
    gpu = runtime_identity()
    assert gpu["image_backend"] == "torchvision" and gpu["torchvision"] == "0.28.0"
    assert namespace_fingerprint("f" * 64, cpu) != namespace_fingerprint("f" * 64, gpu)
    versions["transformers"] = "4.44.2"
    assert namespace_fingerprint("f" * 64, runtime_identity()) != namespace_fingerprint("f" * 64, gpu)


def test_this_machine_without_torchvision_is_pil() -> None:
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision installed")
    r = runtime_identity()
    assert r["image_backend"] == "pil" and r["torchvision"] is None and r["transformers"]


def test_processor_files_are_part_of_the_key(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (ckpt / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5]}))
    a = runtime_identity(_Model(ckpt))["preprocessing_files"]
    (ckpt / "model.safetensors").write_bytes(b"other weights")  # the weights are the model fingerprint's job
    assert runtime_identity(_Model(ckpt))["preprocessing_files"] == a
    (ckpt / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4, 0.5, 0.5]}))
    assert runtime_identity(_Model(ckpt))["preprocessing_files"] not in (a, None)
    assert runtime_identity(_Model())["preprocessing_files"] is None  # built in code (tiny) / fake


def test_namespace_description_records_the_runtime(tmp_path: Path) -> None:
    Encoder(_Model(), load_prompt("e5v_llama3"), EmbeddingCache(tmp_path), runtime=BASE, progress=False).text(["x"])
    (ns,) = tmp_path.rglob("namespace.json")
    desc = json.loads(ns.read_text())
    assert desc["runtime"] == BASE and desc["fingerprint"] == "f" * 64
    assert ns.parent.parent.name == namespace_fingerprint("f" * 64, BASE)[:32]
