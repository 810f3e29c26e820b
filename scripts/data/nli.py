"""NLI triplets for training: ``nli_for_simcse.csv`` (sent0, sent1, hard_neg; ~275K rows) from the hub dataset
``princeton-nlp/datasets-for-simcse``, placed at ``<root>/nli/nli_for_simcse.csv`` (``configs/data/nli.yaml``)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from e5v.data.nli import COLUMNS, DataError, check_columns
from scripts.data.common import Dataset, PrepContext, fetch_hub_file
from scripts.data.manifest import DatasetSpec, SourceSpec, VerifyError

FILE = "nli_for_simcse.csv"


class Nli(Dataset):
    name = "nli"

    def build(self, ctx: PrepContext, spec: DatasetSpec, source: SourceSpec, out: Path, dl: Path) -> None:
        path = fetch_hub_file(ctx, self.name, source, FILE, dl)
        os.replace(path, out / FILE)

    def verify(self, ctx: PrepContext, spec: DatasetSpec, out: Path) -> dict[str, int]:
        path = out / FILE
        try:
            check_columns(path, COLUMNS, hard_negatives=True)
        except DataError as e:
            raise VerifyError(str(e)) from e
        rows = empty = 0
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader)
            idx = [header.index(c) for c in COLUMNS]
            for line, row in enumerate(reader, start=2):
                if len(row) != len(header):
                    raise VerifyError(
                        f"{path}:{line}: {len(row)} fields, the header has {len(header)}; the file is damaged, "
                        "delete it and run again"
                    )
                rows += 1
                empty += any(not row[i].strip() for i in idx)
        if empty:
            ctx.say(self.name, f"{empty} row(s) with an empty field (training skips them: data.loader.on_bad_row)")
        return {"rows": rows}
