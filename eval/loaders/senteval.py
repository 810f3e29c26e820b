"""STS test sets in the SentEval layout (SimCSE's ``senteval.tar``), read as SentEval reads them.

Under ``<root>`` (the SentEval ``data/downstream`` folder):

* ``STS/STS1{2..6}-en-test/STS.input.<subset>.txt`` (``sentence1<TAB>sentence2`` per line) and
  ``STS.gs.<subset>.txt`` (one gold score per line; pairs whose gold line is empty are dropped);
* ``STS/STSBenchmark/sts-test.csv`` (tab separated: score in column 5, sentences in 6 and 7);
* ``SICK/SICK_test_annotated.txt`` (a header line, then pair_ID, sentence_A, sentence_B, relatedness).

Sentences are whitespace-tokenised and re-joined with single spaces, as SentEval + SimCSE do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from e5v.data.senteval import STS_SUBSETS  # the subset files of STS12-16 (shared with the mini world)
from e5v.errors import ConfigError
from eval.loaders import DataFormatError, MissingDatasetError, require

TASKS = (*STS_SUBSETS, "STSBenchmark", "SICKRelatedness")


@dataclass
class StsPairs:
    task: str
    sent_a: list[str]
    sent_b: list[str]
    gold: list[float]
    subset: list[str]  # which file each pair came from

    def __len__(self) -> int:
        return len(self.gold)


def _norm(s: str) -> str:
    return " ".join(s.split())


def _lines(path: Path, task: str) -> list[str]:
    require(path, "sts", f"{task} file '{path.name}'", "data-senteval")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{path}: not UTF-8 ({e})") from e


def _sentence(value: str, path: Path, line: int, which: str) -> str:
    """Whitespace-normalised sentence; an empty one is a malformed pair (it would score as noise)."""
    s = _norm(value)
    if not s:
        raise DataFormatError(f"{path}:{line}: {which} is empty or whitespace only")
    return s


def _gold(value: str, path: Path, line: int) -> float:
    try:
        return float(value)
    except ValueError:
        raise DataFormatError(f"{path}:{line}: gold score {value!r} is not a number") from None


def load_sts_year(root: Path, task: str) -> StsPairs:
    folder = root / "STS" / f"{task}-en-test"
    if not folder.is_dir():
        raise MissingDatasetError("sts", folder, f"{task} folder", "data-senteval")
    out = StsPairs(task, [], [], [], [])
    for sub in STS_SUBSETS[task]:
        inp = folder / f"STS.input.{sub}.txt"
        gs = folder / f"STS.gs.{sub}.txt"
        pairs, golds = _lines(inp, task), _lines(gs, task)
        if len(pairs) != len(golds):
            raise DataFormatError(f"{inp} has {len(pairs)} lines but {gs} has {len(golds)}; the files must align")
        for i, (p, g) in enumerate(zip(pairs, golds), start=1):
            if g.strip() == "":
                continue  # SentEval drops pairs without a gold score
            cols = p.split("\t")
            if len(cols) < 2:
                raise DataFormatError(f"{inp}:{i}: expected 'sentence1<TAB>sentence2'")
            out.sent_a.append(_sentence(cols[0], inp, i, "sentence 1"))
            out.sent_b.append(_sentence(cols[1], inp, i, "sentence 2"))
            out.gold.append(_gold(g.strip(), gs, i))
            out.subset.append(sub)
    return out


def load_stsb(root: Path) -> StsPairs:
    path = root / "STS" / "STSBenchmark" / "sts-test.csv"
    out = StsPairs("STSBenchmark", [], [], [], [])
    for i, line in enumerate(_lines(path, "STSBenchmark"), start=1):
        cols = line.strip().split("\t")
        if len(cols) < 7:
            raise DataFormatError(f"{path}:{i}: expected >= 7 tab-separated columns (score in 5, sentences in 6-7)")
        out.sent_a.append(_sentence(cols[5], path, i, "sentence 1 (column 6)"))
        out.sent_b.append(_sentence(cols[6], path, i, "sentence 2 (column 7)"))
        out.gold.append(_gold(cols[4], path, i))
        out.subset.append("test")
    return out


def load_sick(root: Path) -> StsPairs:
    path = root / "SICK" / "SICK_test_annotated.txt"
    out = StsPairs("SICKRelatedness", [], [], [], [])
    lines = _lines(path, "SICKRelatedness")
    for i, line in enumerate(lines[1:], start=2):  # first line is the header
        cols = line.strip().split("\t")
        if len(cols) < 4:
            raise DataFormatError(f"{path}:{i}: expected pair_ID, sentence_A, sentence_B, relatedness_score")
        out.sent_a.append(_sentence(cols[1], path, i, "sentence_A"))
        out.sent_b.append(_sentence(cols[2], path, i, "sentence_B"))
        out.gold.append(_gold(cols[3], path, i))
        out.subset.append("test")
    return out


def load_sts(root: str | Path, task: str) -> StsPairs:
    root = Path(root)
    if task not in TASKS:
        raise ConfigError(f"sts: unknown task {task!r}; choose from {TASKS}")
    if not root.is_dir():
        raise MissingDatasetError("sts", root, "SentEval data folder", "data-senteval")
    if task in STS_SUBSETS:
        pairs = load_sts_year(root, task)
    elif task == "STSBenchmark":
        pairs = load_stsb(root)
    else:
        pairs = load_sick(root)
    if len(pairs) < 2:
        raise DataFormatError(f"sts: {task} under {root} has {len(pairs)} scored pair(s); need at least 2")
    return pairs
