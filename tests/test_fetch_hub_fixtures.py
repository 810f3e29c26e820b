"""scripts/fetch_hub_fixtures.py against a stand-in hub (the real one is unreachable here): which files it
fetches, the tensor names of a single-file checkpoint, SOURCE.md with the revision, nothing overwritten."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from scripts import fetch_hub_fixtures as F

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    files = {"config.json": b'{"model_type": "idefics3"}', "tokenizer_config.json": b'{"added_tokens_decoder": {}}',
             "preprocessor_config.json": b"{}", "tokenizer.json": b"BIG", "model.safetensors": b"WEIGHTS",
             "README.md": b"card"}
    served = tmp_path / "served"
    served.mkdir()
    for name, data in files.items():
        (served / name).write_bytes(data)
    fetched: list[str] = []

    class Api:
        def model_info(self, repo_id: str, revision: str | None = None) -> SimpleNamespace:
            return SimpleNamespace(sha=SHA, siblings=[SimpleNamespace(rfilename=n) for n in files])

    def download(repo_id: str, name: str, revision: str | None = None) -> str:
        assert revision == SHA  # every file at the one recorded revision
        fetched.append(name)
        return str(served / name)

    def metadata(repo_id: str, revision: str | None = None) -> SimpleNamespace:
        t = {"model.text_model.embed_tokens.weight": SimpleNamespace(dtype="BF16", shape=[49280, 576]),
             "lm_head.weight": SimpleNamespace(dtype="BF16", shape=[49280, 576])}
        return SimpleNamespace(files_metadata={"model.safetensors": SimpleNamespace(tensors=t)})

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", metadata)
    monkeypatch.setattr(F, "FIXTURES", tmp_path / "fixtures")
    return {"fetched": fetched}  # type: ignore[dict-item]


def test_fetch_writes_the_small_files_tensor_names_and_provenance(hub: dict, tmp_path: Path) -> None:
    F.fetch("HuggingFaceTB/SmolVLM-256M-Instruct", None, overwrite=False)
    d = tmp_path / "fixtures" / "HuggingFaceTB__SmolVLM-256M-Instruct"
    assert sorted(p.name for p in d.iterdir()) == ["SOURCE.md", "config.json", "preprocessor_config.json",
                                                   "tokenizer_config.json", "weight_keys.txt"]
    assert sorted(hub["fetched"]) == ["config.json", "preprocessor_config.json", "tokenizer_config.json"]  # no weights
    assert json.loads((d / "config.json").read_text()) == {"model_type": "idefics3"}
    keys = (d / "weight_keys.txt").read_text().splitlines()
    assert keys[1:] == ["lm_head.weight\tBF16\t[49280, 576]", "model.text_model.embed_tokens.weight\tBF16\t[49280, 576]"]
    source = (d / "SOURCE.md").read_text()
    assert SHA in source and all(f in source for f in ("config.json", "weight_keys.txt"))
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "helpers"))
    import hub_layout

    assert hub_layout.hub_keys(d) == {"lm_head.weight", "model.text_model.embed_tokens.weight"}  # the tests read it


def test_fetch_keeps_what_is_there_unless_overwrite(hub: dict, tmp_path: Path) -> None:
    d = tmp_path / "fixtures" / "HuggingFaceTB__SmolVLM-256M-Instruct"
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"mine": 1}')
    (d / "SOURCE.md").write_text("# earlier notes\nconfig.json from a public copy\n")
    F.fetch("HuggingFaceTB/SmolVLM-256M-Instruct", None, overwrite=False)
    assert json.loads((d / "config.json").read_text()) == {"mine": 1} and "config.json" not in hub["fetched"]
    assert "earlier notes" in (d / "SOURCE.md").read_text()   # kept below the new table
    F.fetch("HuggingFaceTB/SmolVLM-256M-Instruct", None, overwrite=True)
    assert json.loads((d / "config.json").read_text()) == {"model_type": "idefics3"}


def test_fetch_cli_names_an_unknown_backbone(capsys: pytest.CaptureFixture[str]) -> None:
    assert F.main(["not_a_backbone"]) == 2
    assert "not a configured hub backbone: not_a_backbone" in capsys.readouterr().err
