"""One base exception: every error class of e5v/, eval/ and scripts/ is an E5VError that keeps its builtin
base; the same condition raises the same class in training and in evaluation; the CLIs match by class."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from e5v.errors import ConfigError, DataError, E5VError, MissingDataError

REPO = Path(__file__).resolve().parents[1]


def _exception_classes() -> list[tuple[str, str, list[str]]]:
    """(file, class, base names) of every public class whose bases name an exception, by reading the source."""
    out = []
    for package in ("e5v", "eval", "scripts"):
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.ClassDef) or node.name.startswith("_"):
                    continue
                bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
                if any(b.endswith(("Error", "Exception")) for b in bases):
                    out.append((str(path.relative_to(REPO)), node.name, bases))
    return out


def test_every_error_class_derives_from_e5verror_and_keeps_its_builtin_base() -> None:
    import importlib

    found = _exception_classes()
    assert len(found) >= 20, found
    for file, name, _ in found:
        cls = getattr(importlib.import_module(file[:-3].replace("/", ".")), name)
        assert issubclass(cls, E5VError), f"{file}: {name} does not derive from e5v.errors.E5VError"
    # the builtin bases stay, so `except ValueError` / `except OSError` around older code still catch them
    from e5v.train.checkpoint import CheckpointCorrupt, CheckpointWriteError
    from e5v.data.atomic import NotGeneratedError
    from e5v.data.images import BadImageError
    from e5v.train import TrainingDiverged
    from eval.cache import CacheError

    for cls, builtin in ((ConfigError, ValueError), (DataError, ValueError), (MissingDataError, FileNotFoundError),
                         (BadImageError, ValueError), (CheckpointCorrupt, RuntimeError), (CacheError, RuntimeError),
                         (CheckpointWriteError, OSError), (TrainingDiverged, RuntimeError),
                         (NotGeneratedError, FileExistsError)):
        assert issubclass(cls, builtin), (cls, builtin)


def test_same_condition_same_class_in_training_and_evaluation(tmp_path: Path) -> None:
    from e5v.data.nli import check_columns
    from e5v.data.pairs import load_image_caption_pairs
    from eval.loaders import DataFormatError, read_json
    from eval.loaders.captions import load_captions

    # missing data
    with pytest.raises(MissingDataError) as train_err:
        check_columns(tmp_path / "nli.csv")
    with pytest.raises(MissingDataError) as eval_err:
        load_captions(tmp_path / "nowhere", "flickr30k")
    assert isinstance(train_err.value, FileNotFoundError) and isinstance(eval_err.value, FileNotFoundError)
    assert isinstance(train_err.value, DataError) and isinstance(eval_err.value, DataError)
    with pytest.raises(MissingDataError):
        load_image_caption_pairs(tmp_path / "pairs.json", tmp_path)
    # malformed data
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert DataFormatError is DataError
    with pytest.raises(DataError):
        read_json(bad, "flickr30k", "annotations")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_bytes(b"sent0,sent1,hard_neg\n\xff,b,c\n")
    with pytest.raises(DataError):
        check_columns(bad_csv)


def test_config_errors_are_one_class(tmp_path: Path) -> None:
    from e5v.config import compose
    from e5v.prompts import PromptConfigError
    from e5v.train import Trainer
    from eval.index import IndexSpec
    from eval.runner import evaluate

    assert issubclass(PromptConfigError, ConfigError)
    with pytest.raises(ConfigError, match=r"missing required value\(s\) \['lora\.r'\]"):
        Trainer(compose("train", ["experiment=tiny_cpu", "run_name=x", "lora.r=???"]), tmp_path / "t")
    cfg = compose("eval", ["backbone=tiny", "suite=mini", "benchmark.sts.root=???"])
    with pytest.raises(ConfigError, match=r"missing required value\(s\) \['benchmark\.sts\.root'\]"):
        evaluate(cfg, output_dir=tmp_path / "e")
    with pytest.raises(ConfigError, match="index.kind"):
        IndexSpec(kind="annoy")


def test_cli_treats_every_e5verror_as_expected() -> None:
    from e5v.cli.errors import UserError, cli_errors, is_expected

    class Brand(E5VError, RuntimeError):  # a class the CLI has never heard of by name
        pass

    assert issubclass(UserError, E5VError) and is_expected(Brand("x"))
    with pytest.raises(SystemExit, match=r"^prog: error: fix me$"):
        with cli_errors("prog"):
            raise Brand("fix me")
    assert not is_expected(RuntimeError("a bug"))  # raised outside the project's code: keeps its traceback
