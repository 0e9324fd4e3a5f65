"""`psp inspect OUTPUT`: what is in an output table, in words a user can act on."""
from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.compute as pc

from pipelines.options import add_arguments, from_args, option, shared


@dataclass
class InspectOptions:
    """`psp inspect OUTPUT`'s options."""

    rows: int = option(3, "rows to show", parse=int, minimum=0, scope="inspect")
    as_of: str | None = option(None, "inspect an earlier version of the table (a number, or e.g. "
                               "2026-11-27T02:00:00Z)", metavar="VERSION|TIMESTAMP", scope="inspect")
    storage_options: dict[str, Any] | None = shared("storage_options", scope="inspect")

class TableCounts:
    """Rows, rows per status and per task, rows with an image: folded from column batches
    (`pipelines.scan.scan_table`), so inspecting a table of any size holds only the counts."""

    def __init__(self):
        self.rows, self.images = 0, 0
        self.status: dict[str, int] = {}
        self.task: dict[str, int] = {}

    def add(self, batch, file: str = "") -> None:
        self.rows += batch.num_rows
        for name, counts in (("status", self.status), ("task", self.task)):
            for value in batch.column(name).drop_null().to_pylist():
                counts[value] = counts.get(value, 0) + 1
        formats = batch.column("image_format").drop_null()
        self.images += len(formats) - pc.sum(pc.equal(formats, "none")).as_py() if len(formats) else 0

    def merge(self, other: TableCounts) -> None:
        self.rows += other.rows
        self.images += other.images
        for mine, theirs in ((self.status, other.status), (self.task, other.task)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v


_RUN_KEYS = ("kind", "processed", "adopted", "replaced", "skipped", "counts", "plan", "lost",
             "checkpoint_sha256", "wall_s")


def _run_line(run: Mapping[str, Any]) -> str:
    facts = ", ".join(f"{k}={json.dumps(run[k], sort_keys=True)}" for k in _RUN_KEYS if run.get(k) not in (None, {}, []))
    return f"    v{run['version']:<4} {run['committed_at'][:19]}Z  {run.get('run_id')}: {facts}"


def inspect_output(
    uri: str, storage_options: Mapping[str, Any] | None = None, n_rows: int = 3, as_of: Any = None,
    n_runs: int = 10,
) -> str:
    """A text report on the output table at `uri` (local path or fsspec URI), at its current
    version or `as_of` (a version number or a time).

    Covers: version and when it was made, rows (one per input) and data files, counts per status
    (recomputed from this version), schema version, n_styles and tensor shapes, the last `n_runs`
    committed runs with their summaries, the schema, the first `n_rows` rows (image_id, status,
    |w_plus|, source_uri, error) and how to read the table with other tools.
    """
    from pipelines.scan import first_rows, scan_table, table_files
    from schemas.outputs import output_schema
    from schemas.table import open_table, read_runs, table_info

    dt = open_table(uri, storage_options, as_of)
    info = table_info(dt, uri)
    files = table_files(uri, storage_options, dt.version())
    stats = scan_table(files, ["status", "task", "image_format"], TableCounts)
    history = {c.get("version"): c for c in dt.history()}
    made = history.get(dt.version(), {}).get("timestamp")
    when = _dt.datetime.fromtimestamp(made / 1000, _dt.UTC).isoformat()[:19] + "Z" if made else "?"

    lines = [f"psp output table: {uri}"]
    lines.append(f"  version {dt.version()} ({when})" + (f", as of {as_of!r}" if as_of is not None else ", current"))
    lines.append(f"  rows: {stats.rows} inputs (one row each) in {len(files.paths)} data files")
    lines.append(f"  schema version: {info.schema_version}   n_styles: {info.n_styles}"
                 f"   tensor shapes: {json.dumps(info.tensor_shapes, sort_keys=True)}")
    lines.append("  status counts:")
    for status, n in sorted(stats.status.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"    {status:<14} {n}")
    if stats.task:
        lines.append("  tasks: " + ", ".join(f"{t} ({n})" for t, n in sorted(stats.task.items())))

    runs = read_runs(uri, storage_options, as_of)
    lines.append(f"  runs: {len(runs)} committed" + (f", the last {n_runs}:" if len(runs) > n_runs else ":"))
    lines.extend(_run_line(r) for r in runs[-n_runs:])
    lines.append("    (each run's full summary: the commit's psp.run info, and OUTPUT/_runs/<run_id>.json)")

    lines.append("  schema:")
    for field in output_schema(info.n_styles):
        lines.append(f"    {field.name:<18} {field.type}{'' if field.nullable else ' not null'}")

    head = first_rows(files, n_rows, ["image_id", "source_uri", "status", "error", "w_plus"])
    lines.append(f"  first {head.num_rows} rows:")
    for row in head.to_pylist():
        norm = None if row["w_plus"] is None else float(np.linalg.norm(np.asarray(row["w_plus"], np.float32)))
        err = f"  error={row['error']!r}" if row["error"] else ""
        lines.append(f"    {row['image_id']}  {row['status']:<12} |w_plus|="
                     f"{'null' if norm is None else f'{norm:.3f}'}  {row['source_uri']}{err}")

    opts = ", storage_options=opts" if storage_options else ""
    lines += [
        f"  images: column `output_image` ({stats.images} rows with bytes). To read the table:",
        f"    ids, w = schemas.read_latents({uri!r}{opts})      # w float32 [N, n_styles, 512], status ok",
        f"    t = schemas.read_outputs({uri!r}, columns=['image_id', 'output_image', 'image_format']{opts})",
        f"    schemas.open_dataset({uri!r}{opts})      # pyarrow dataset: .to_table(), DuckDB, Polars",
    ]
    lines.append(f"  ok: {stats.status.get('ok', 0)}/{stats.rows}")
    return "\n".join(lines) + "\n"


def register(subparsers: Any) -> None:
    """Add `psp inspect` to the `psp` CLI's subparsers."""
    p = subparsers.add_parser("inspect", help="counts per status, runs, schema and a few rows of an output table")
    p.add_argument("output", metavar="OUTPUT")
    add_arguments(p, InspectOptions, scopes=("inspect",))
    p.set_defaults(func=_main)


def _main(args: Any) -> int:
    o = from_args(InspectOptions, args)
    print(inspect_output(args.output, o.storage_options, n_rows=o.rows, as_of=o.as_of))
    return 0
