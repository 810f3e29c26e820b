"""Ordinary mistakes at the command line end as one line naming the culprit, not a traceback.

For every CLI (e5v-encode, e5v-merge, e5v-train, e5v-eval): exit status != 0, stderr holds one
``PROG: error: ...`` line (optionally followed by one ``hint:`` line) naming the file / line / id / option,
and no "Traceback". Most checks call ``main(argv)`` in-process (the message is the SystemExit's text,
which Python prints as is); a few run the installed console scripts to check what a user really sees.
Options and inputs are checked before the model loads: those tests make loading fail loudly.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_image

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------------------------- helpers
def one_line_error(prog: str, main, argv: list[str]) -> str:
    """Run ``main(argv)`` in-process; return the error line (checked: prefix, at most one hint line)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    text = info.value.code
    assert isinstance(text, str), f"expected an error message, got exit code {text!r}"
    lines = text.splitlines()
    assert lines[0].startswith(f"{prog}: error: "), text
    assert len(lines) <= 2 and all(line.strip().startswith("hint:") for line in lines[1:]), text
    return lines[0]


def run_cli(prog: str, *args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    e = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline",
             E5V_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for k in ("HYDRA_FULL_ERROR", "E5V_FULL_ERROR", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        e.pop(k, None)
    e.update(env or {})
    return subprocess.run([str(BIN / prog), *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=300)


def assert_cli_error(p: subprocess.CompletedProcess, prog: str) -> str:
    """Nonzero exit, no traceback, the last stderr lines are the error (+ optional hint); returns the error line."""
    assert p.returncode != 0, p.stdout[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-4000:]
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1, p.stderr[-4000:]
    tail = lines[errors[0] + 1 :]
    assert len(tail) <= 1 and all(line.strip().startswith("hint:") for line in tail), p.stderr[-4000:]
    return lines[errors[0]]


@pytest.fixture()
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model fails the test: the check under test must come first."""
    from e5v.embedder import Embedder

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr(Embedder, "from_pretrained", refuse)


def encode_error(argv: list[str]) -> str:
    from e5v.cli.encode import main

    return one_line_error("e5v-encode", main, argv)


def write_bad_folder(folder: Path) -> None:
    folder.mkdir(parents=True)
    make_image(40, 30, 0).save(folder / "good.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "sub").mkdir()
    (folder / "sub" / "notimage.jpg").write_bytes(b"this is text, not a JPEG")
    make_image(64, 64, 1).save(folder / "whole.png")
    data = (folder / "whole.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])


# ---------------------------------------------------------------------------------------------- e5v-encode: images
def test_encode_names_every_bad_image_before_loading(tmp_path: Path, no_model: None) -> None:
    folder = tmp_path / "photos"
    write_bad_folder(folder)
    line = encode_error(["--model", "tiny", "--images", str(folder), "--out", str(tmp_path / "out")])
    assert "3 of 5 images are bad" in line
    for name in ("empty.png (file is empty)", "sub/notimage.jpg (cannot identify image)",
                 "truncated.png (corrupt or truncated image data)"):
        assert name in line, line
    assert "good.png" not in line and "whole.png" not in line
    assert not (tmp_path / "out").exists()


def test_encode_truncated_image_found_while_encoding_writes_nothing(tmp_path: Path, tiny_dir: Path) -> None:
    """Headers all fine: the truncated file is found during encoding; every one is named, nothing written."""
    from e5v.cli.encode import main

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        make_image(40, 40, i).save(folder / f"ok{i}.png")
    data = (folder / "ok0.png").read_bytes()
    (folder / "cut_a.png").write_bytes(data[: len(data) // 2])
    (folder / "cut_b.png").write_bytes(data[: len(data) // 2 + 7])
    out = tmp_path / "out"
    line = one_line_error("e5v-encode", main, ["--model", "tiny", "--device", "cpu", "--images", str(folder), "--out", str(out)])
    assert "2 of 5 images are bad" in line and "cut_a.png" in line and "cut_b.png" in line, line
    assert not (out / "embeddings.npy").exists()
    # the hint works: skip embeds the others and lists the skipped
    assert main(["--model", "tiny", "--device", "cpu", "--images", str(folder), "--out", str(out), "--on-bad-image", "skip"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["count"] == 3 and sorted(s["id"] for s in meta["skipped"]) == ["cut_a.png", "cut_b.png"]
    assert meta["dtype"] == "float32"  # --dtype auto on CPU


def test_encode_all_images_skipped_is_an_error(tmp_path: Path, tiny_dir: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    line = encode_error(["--model", "tiny", "--device", "cpu", "--images", str(folder), "--out", str(tmp_path / "o"),
                         "--on-bad-image", "skip"])
    assert "all 1 images were skipped" in line and "a.png" in line


def test_encode_bad_images_console_script(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    write_bad_folder(folder)
    p = run_cli("e5v-encode", "--model", "tiny", "--images", str(folder), "--out", str(tmp_path / "out"))
    line = assert_cli_error(p, "e5v-encode")
    assert "empty.png" in line and "notimage.jpg" in line and "truncated.png" in line
    assert p.returncode == 1 and "--on-bad-image skip" in p.stderr.splitlines()[-1]


# ---------------------------------------------------------------------------------------------- e5v-encode: JSONL
def _jsonl(tmp_path: Path, rows: list) -> Path:
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    make_image(40, 40, 3).save(root / "ref.png")
    f = root / "q.jsonl"
    f.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return f


@pytest.mark.parametrize(
    "rows, expected",
    [
        ([{"id": "q1", "image": "ref.png", "text": "a"}, {"id": "q2", "image": "gone.png", "text": "b"}],
         ["bad image", "q.jsonl:2 (id 'q2'): gone.png: file not found"]),
        ([{"id": "q1", "img": "ref.png", "caption": "a"}],
         ["q.jsonl:1 (id 'q1'): key 'image' is missing", "img, caption"]),
        ([{"id": "q1", "image": "ref.png", "text": 3}], ["q.jsonl:1 (id 'q1'): key 'text' must be a string"]),
        ([{"id": "q1", "image": "ref.png", "text": "a"}, {"id": "q2", "image": "ref.png", "text": "b"},
          {"id": "q1", "image": "ref.png", "text": "c"}], ["q.jsonl:3: duplicate id 'q1' (first on line 1)"]),
        ([{"id": None, "image": "ref.png", "text": "a"}], ["q.jsonl:1: key 'id' must be a string or an integer"]),
        (['["ref.png", "a"]'], ["q.jsonl:1: each line must be a JSON object"]),
        (['{"image": "ref.png", "text": '], ["q.jsonl:1: invalid JSON"]),
        (["", "  "], ["q.jsonl has no rows"]),
    ],
    ids=["missing-image", "wrong-keys", "wrong-type", "duplicate-id", "bad-id", "not-object", "bad-json", "empty"],
)
def test_encode_jsonl_row_errors_name_line_and_id(tmp_path: Path, no_model: None, rows: list, expected: list) -> None:
    f = _jsonl(tmp_path, rows)
    line = encode_error(["--model", "tiny", "--jsonl", str(f), "--out", str(tmp_path / "out")])
    for part in expected:
        assert part in line, line


def test_encode_jsonl_unknown_key_warns(tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from e5v.cli.encode import main

    f = _jsonl(tmp_path, [{"id": "q1", "image": "ref.png", "text": "a", "iid": 4}])
    assert main(["--model", "tiny", "--device", "cpu", "--jsonl", str(f), "--out", str(tmp_path / "out")]) == 0
    assert "ignoring unknown key(s) 'iid' (line 1)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- e5v-encode: texts, empties
def test_encode_empty_inputs_are_errors_alike(tmp_path: Path, no_model: None) -> None:
    """An empty text file, an empty image folder and an empty JSONL: the same one-line error, nothing written."""
    empty_txt = tmp_path / "t.txt"
    empty_txt.write_text("")
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "notes.txt").write_text("no images here")
    empty_jsonl = tmp_path / "q.jsonl"
    empty_jsonl.write_text("\n")
    for flag, path in (("--texts", empty_txt), ("--images", tmp_path / "imgs"), ("--jsonl", empty_jsonl)):
        line = encode_error(["--model", "tiny", flag, str(path), "--out", str(tmp_path / "out")])
        assert str(path) in line and "nothing to encode" in line, line
    assert not (tmp_path / "out").exists()


def test_encode_texts_refuses_csv_and_folders(tmp_path: Path, no_model: None) -> None:
    csv = tmp_path / "sentences.csv"
    csv.write_text("sentence\n")  # header only
    line = encode_error(["--model", "tiny", "--texts", str(csv), "--out", str(tmp_path / "o")])
    assert "sentences.csv" in line and "not a plain text file" in line
    line = encode_error(["--model", "tiny", "--texts", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "is a folder" in line and "--images" in line
    line = encode_error(["--model", "tiny", "--images", str(csv), "--out", str(tmp_path / "o")])
    assert "is not a folder" in line
    line = encode_error(["--model", "tiny", "--texts", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")])
    assert "nope.txt: file not found" in line


# ---------------------------------------------------------------------------------------------- e5v-encode: options
@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--batch-size", "0"], "--batch-size 0: must be a whole number >= 1"),
        (["--max-length", "-5"], "--max-length -5: must be >= 1"),
        (["--template", "txt"], "--template 'txt': unknown template; choose one of"),
        (["--template", "image"], "--template 'image' takes an image only, but --texts gives a text only"),
        (["--template", "fashioniq_query"], "takes an image and a text"),
        (["--category", "dress"], "--category 'dress' is only used by the templates fashioniq_gallery, fashioniq_query"),
        (["--prompt", "e5v_llama"], "--prompt 'e5v_llama': unknown prompt config"),
        (["--device", "gpu"], "--device 'gpu': not a device"),
    ],
)
def test_encode_checks_options_before_loading(tmp_path: Path, no_model: None, extra: list, expected: str) -> None:
    f = tmp_path / "t.txt"
    f.write_text("a red circle\n")
    line = encode_error(["--model", "tiny", "--texts", str(f), "--out", str(tmp_path / "out"), *extra])
    assert expected in line, line


def test_encode_checks_template_category_and_device(tmp_path: Path, no_model: None) -> None:
    import torch

    folder = tmp_path / "imgs"
    folder.mkdir()
    make_image(40, 40, 0).save(folder / "a.png")
    line = encode_error(["--model", "tiny", "--images", str(folder), "--out", str(tmp_path / "o"),
                         "--template", "fashioniq_gallery"])
    assert "--template 'fashioniq_gallery' needs --category" in line
    if not torch.cuda.is_available():
        line = encode_error(["--model", "tiny", "--images", str(folder), "--out", str(tmp_path / "o"), "--device", "cuda"])
        assert "--device cuda: CUDA is not available" in line
    out = tmp_path / "taken"
    out.write_text("a file")
    line = encode_error(["--model", "tiny", "--images", str(folder), "--out", str(out)])
    assert f"--out {out} is a file" in line


def test_encode_dtype_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from e5v.cli.encode import build_parser, check_device_dtype

    assert build_parser().parse_args(["--texts", "t", "--out", "o"]).dtype == "auto"
    assert "bfloat16 on CUDA" in build_parser().format_help()
    assert check_device_dtype("cpu", "auto") == "float32"
    assert check_device_dtype("cpu", "float16") == "float16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert check_device_dtype("auto", "auto") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert check_device_dtype("auto", "auto") == "float16"


# ---------------------------------------------------------------------------------------------- model names
@pytest.mark.parametrize(
    "name, expected",
    [
        ("./models/e5v", "no such directory, and not a known model name: ./models/e5v"),
        ("/nonexistent/dir/e5-v", "no such directory, and not a known model name: /nonexistent/dir/e5-v"),
        ("tinyy", "no such directory, and not a known model name: tinyy (HF_HUB_OFFLINE=1"),
        ("someone/not-cached-model", "no such directory, and not a known model name: someone/not-cached-model"),
    ],
)
def test_unknown_model_is_one_line(tmp_path: Path, name: str, expected: str) -> None:
    f = tmp_path / "t.txt"
    f.write_text("a\n")
    line = encode_error(["--model", name, "--texts", str(f), "--out", str(tmp_path / "out")])
    assert expected in line, line


def test_model_resolution_in_the_library(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Embedder.from_pretrained and the config loader (llava_next.load) say the same before transformers runs."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hub_errors

    from e5v import Embedder
    from e5v.backbones import auto, llava_next

    with pytest.raises(auto.ModelNotFoundError, match=r"not a known model name: \./mdl/e5v\n.*hint"):
        Embedder.from_pretrained("./mdl/e5v")
    with pytest.raises(auto.ModelNotFoundError, match="not a known model name: tinyy.*\n.*did you mean tiny"):
        llava_next.load("tinyy")
    (tmp_path / "e5-v").mkdir()
    with pytest.raises(auto.ModelNotFoundError, match=re.escape(f"did you mean {tmp_path / 'e5-v'}?")):
        auto.check_model(str(tmp_path / "e5v"))
    with pytest.raises(auto.ModelNotFoundError, match="has no config.json"):
        auto.check_model(str(tmp_path / "e5-v"))
    (tmp_path / "e5-v" / "adapter_config.json").write_text("{}")
    with pytest.raises(auto.ModelNotFoundError, match="holds a LoRA adapter.*\n.*e5v-merge"):
        auto.check_model(str(tmp_path / "e5-v"))

    def missing(*a, **k):  # online, and the hub answers 404
        raise hub_errors.RepositoryNotFoundError.__new__(hub_errors.RepositoryNotFoundError, "404")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", missing)
    with pytest.raises(auto.ModelNotFoundError, match="not a known model name: someone/nothing .the Hugging Face hub has no"):
        auto.check_model("someone/nothing")

    def unreachable(*a, **k):
        raise hub_errors.LocalEntryNotFoundError("Please check your connection")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", unreachable)
    with pytest.raises(auto.ModelNotFoundError, match="cannot reach the Hugging Face hub to fetch someone/nothing"):
        auto.check_model("someone/nothing")


def test_unknown_model_console_script(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("a\n")
    p = run_cli("e5v-encode", "--model", "./checkpoints/mymodel", "--texts", str(f), "--out", str(tmp_path / "out"))
    assert "not a known model name: ./checkpoints/mymodel" in assert_cli_error(p, "e5v-encode")


# ---------------------------------------------------------------------------------------------- e5v-merge
@pytest.fixture()
def fake_run(tmp_path: Path, tiny_dir: Path) -> Path:
    """A run folder as e5v-train leaves it: checkpoints/step-000002/{adapter/, trainer_state.json, manifest.json}."""
    from e5v.backbones import tiny
    from e5v.train.checkpoint import write_manifest
    from e5v.lora import add_lora, save_adapter

    run = tmp_path / "outputs" / "train" / "run"
    step = run / "checkpoints" / "step-000002"
    step.mkdir(parents=True)
    peft_model = add_lora(tiny.load(seed=0, device="cpu").model, r=4)
    meta = {"backbone": {"_target_": "e5v.backbones.tiny.load", "seed": 0, "attn_implementation": "sdpa"}, "step": 2}
    save_adapter(peft_model, step / "adapter", meta)
    (step / "trainer_state.json").write_text(json.dumps({"step": 2}))
    write_manifest(step)
    return run


def merge_error(argv: list[str]) -> str:
    from e5v.cli.merge import main

    return one_line_error("e5v-merge", main, argv)


def test_merge_mistakes_are_one_line_before_loading(tmp_path: Path, fake_run: Path, monkeypatch) -> None:
    import e5v.lora

    def refuse(*a, **k):
        raise AssertionError("merge_to_dir was called before the mistake was reported")

    monkeypatch.setattr(e5v.lora, "merge_to_dir", refuse)
    out = tmp_path / "merged"
    assert "no such folder" in merge_error([str(tmp_path / "nope"), str(out)])
    assert str(tmp_path / "nope") in merge_error([str(tmp_path / "nope"), str(out)])
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text("{}")
    assert "is a full model" in merge_error([str(full), str(out)])
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    assert "the run has no checkpoint yet" in merge_error([str(tmp_path / "empty_run"), str(out)])
    out.mkdir()
    (out / "x").write_text("taken")
    assert f"output {out} is not empty" in merge_error([str(fake_run), str(out)])
    f = tmp_path / "afile"
    f.write_text("")
    assert f"output {f} is a file" in merge_error([str(fake_run), str(f)])
    assert "--allow-other-base only applies with --base" in merge_error([str(fake_run), str(tmp_path / "o"), "--allow-other-base"])
    line = merge_error([str(fake_run), str(tmp_path / "o"), "--base", "./models/base"])
    assert "not a known model name: ./models/base" in line


def test_merge_accepts_run_and_step_folders(tmp_path: Path, fake_run: Path, monkeypatch) -> None:
    import e5v.lora
    from e5v.cli.merge import main

    step = fake_run / "checkpoints" / "step-000002"
    calls: list = []
    monkeypatch.setattr(e5v.lora, "merge_to_dir", lambda adapter, out, **kw: calls.append((Path(adapter), kw)) or Path(out))
    assert main([str(step), str(tmp_path / "a"), "--base", "tiny", "--allow-other-base"]) == 0
    assert calls[-1] == (step / "adapter", {"base": "tiny", "dtype": "float32", "allow_other_base": True})
    monkeypatch.undo()
    out = tmp_path / "merged"
    assert main([str(fake_run), str(out)]) == 0  # the run folder: its newest complete step, merged for real
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_merge_missing_folder_console_script(tmp_path: Path) -> None:
    p = run_cli("e5v-merge", str(tmp_path / "outputs/train/nope"), str(tmp_path / "merged"))
    assert "outputs/train/nope: no such folder" in assert_cli_error(p, "e5v-merge")


# ---------------------------------------------------------------------------------------------- Hydra CLIs
def test_train_config_error_is_one_line_and_full_error_shows_traceback(tmp_path: Path) -> None:
    args = ("experiment=tiny_cpu", "trainer.precision=fp64", f"paths.output_dir={tmp_path}", "logger=none")
    p = run_cli("e5v-train", *args)
    assert "trainer.precision must be fp32, bf16 or fp16, got 'fp64'" in assert_cli_error(p, "e5v-train")
    assert p.returncode == 1
    full = run_cli("e5v-train", *args, env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr and "ConfigError" in full.stderr


def test_eval_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    p = run_cli("e5v-eval", "backbone=tiny", "suite=mini", f"checkpoint={tmp_path / 'nope'}",
                f"hydra.run.dir={tmp_path / 'eval'}")
    assert f"checkpoint={tmp_path / 'nope'}" in assert_cli_error(p, "e5v-eval")


@pytest.mark.parametrize("prog, first, example", [
    ("e5v-train", "Contrastive LoRA training", "e5v-train experiment=tiny_cpu"),
    ("e5v-eval", "e5v-eval: evaluate a model", "e5v-eval backbone=tiny suite=mini"),
])
def test_hydra_help_starts_with_description_and_examples(prog: str, first: str, example: str) -> None:
    p = run_cli(prog, "--help")
    assert p.returncode == 0, p.stderr[-2000:]
    head = p.stdout[: p.stdout.index("powered by Hydra")]
    assert p.stdout.startswith(first) and example in head


# ---------------------------------------------------------------------------------------------- the shared helper
def test_cli_errors_keeps_tracebacks_of_bugs(monkeypatch: pytest.MonkeyPatch) -> None:
    from e5v.cli.errors import UserError, cli_errors, is_expected

    with pytest.raises(SystemExit, match=r"^prog: error: bad value\n  hint: fix it$"):
        with cli_errors("prog"):
            raise UserError("bad value\nhint: fix it")
    with pytest.raises(SystemExit, match=r"^prog: error: .*nope.txt: No such file or directory$"):
        with cli_errors("prog"):
            open("/nonexistent/nope.txt")
    with pytest.raises(ZeroDivisionError):  # a bug: the traceback stays
        with cli_errors("prog"):
            1 / 0
    try:
        json.loads("{")  # a ValueError raised inside another library, not by this project's code
    except ValueError as e:
        assert not is_expected(e)
    monkeypatch.setenv("E5V_FULL_ERROR", "1")
    with pytest.raises(UserError):
        with cli_errors("prog"):
            raise UserError("shown with its traceback")
