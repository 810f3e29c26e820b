"""SentEval STS test sets: SimCSE's ``senteval.tar`` (hub dataset ``princeton-nlp/datasets-for-simcse``).

The archive holds SentEval's ``data/downstream`` tree (possibly under a leading folder); its ``STS/`` and
``SICK/`` folders, the only ones the STS benchmark reads, are extracted to ``<root>/senteval/`` so that
``senteval/STS/STS12-en-test/...``, ``senteval/STS/STSBenchmark/sts-test.csv`` and
``senteval/SICK/SICK_test_annotated.txt`` exist (:mod:`eval.loaders.senteval`).
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from eval.loaders import DataFormatError, MissingDataError
from eval.loaders.senteval import TASKS, load_sts
from scripts.data.archives import extract_tar
from scripts.data.common import Dataset, PrepContext, PrepError, fetch_hub_file
from scripts.data.manifest import DatasetSpec, SourceSpec, VerifyError

FILE = "senteval.tar"
ANCHOR = "STS/STSBenchmark/sts-test.csv"
KEEP = ("STS/", "SICK/")


def find_prefix(names: list[str], archive: Path) -> str:
    """The folder inside the archive that holds ``STS/`` and ``SICK/`` (``""`` when they are at the top)."""
    for n in names:
        n = n.removeprefix("./")
        if n == ANCHOR or n.endswith("/" + ANCHOR):
            return n[: -len(ANCHOR)]
    raise PrepError(f"{archive}: no member ends with {ANCHOR}; is this SimCSE's senteval.tar? Delete it and run again")


class SentEval(Dataset):
    name = "senteval"

    def build(self, ctx: PrepContext, spec: DatasetSpec, source: SourceSpec, out: Path, dl: Path) -> None:
        tar = fetch_hub_file(ctx, self.name, source, FILE, dl)
        try:
            with tarfile.open(tar) as tf:
                prefix = find_prefix(tf.getnames(), tar)
        except tarfile.TarError as e:
            tar.unlink(missing_ok=True)
            raise PrepError(f"{tar} is not a readable tar ({e}); it was deleted: run again to re-download") from e

        def select(member: str) -> str | None:
            rel = member.removeprefix("./")
            if not rel.startswith(prefix):
                return None
            rel = rel[len(prefix) :]
            return rel if rel.startswith(KEEP) else None

        n = extract_tar(tar, out, select)
        ctx.say(self.name, f"extracted {n} files (STS/, SICK/) from {FILE}")

    def verify(self, ctx: PrepContext, spec: DatasetSpec, out: Path) -> dict[str, int]:
        counts = {}
        for task in TASKS:
            try:
                counts[task] = len(load_sts(out, task))
            except (MissingDataError, DataFormatError) as e:
                raise VerifyError(str(e)) from e
        return counts
