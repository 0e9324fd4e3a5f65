"""Test helper: commit hand-made output rows to a real output table (Delta), the way a run does at
its end (`pipelines.table`), without Ray or a model."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa


def commit_table(folder: str | Path, data: pa.Table, n_styles: int, run_id: str = "run-test") -> str:
    """Commit `data` (an output-schema table, e.g. `schemas.rows_to_table(rows, n_styles)`) as run
    `run_id` to the output table at `folder` (created when missing); returns the folder as str."""
    from pipelines.commit import commit_run
    from pipelines.table import OutputTable
    from pipelines.writer import WrittenRun

    table = OutputTable(str(folder))
    dt = table.ensure(n_styles)
    if data.num_rows:
        written = WrittenRun(run_id)
        written.extend([table.write_file(f"runs/{run_id}/part-0.parquet", data)], data["image_id"], data["status"])
        commit_run(table, written, n_styles, {"run_id": run_id, "kind": "test"}, dt.version())
    return str(folder)
