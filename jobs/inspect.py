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

# Read everything except the large binary and tensor columns (images are only counted).
_SUMMARY_COLUMNS = [
    "image_id", "source_uri", "status", "error", "task", "image_format", "run_id", "processed_at",
]
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
    from schemas.outputs import output_schema
    from schemas.table import open_table, read_runs, status_counts, table_dataset, table_info

    dt = open_table(uri, storage_options, as_of)
    info = table_info(dt, uri)
    ds = table_dataset(dt, uri, storage_options)
    table = ds.to_table(columns=_SUMMARY_COLUMNS)
    counts = status_counts(dt, uri, storage_options)
    history = {c.get("version"): c for c in dt.history()}
    made = history.get(dt.version(), {}).get("timestamp")
    when = _dt.datetime.fromtimestamp(made / 1000, _dt.UTC).isoformat()[:19] + "Z" if made else "?"

    lines = [f"psp output table: {uri}"]
    lines.append(f"  version {dt.version()} ({when})" + (f", as of {as_of!r}" if as_of is not None else ", current"))
    lines.append(f"  rows: {table.num_rows} inputs (one row each) in {len(dt.file_uris())} data files")
    lines.append(f"  schema version: {info.schema_version}   n_styles: {info.n_styles}"
                 f"   tensor shapes: {json.dumps(info.tensor_shapes, sort_keys=True)}")
    lines.append("  status counts:")
    for status, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"    {status:<14} {n}")
    tasks = {t: n for t, n in zip(*np.unique([t for t in table["task"].to_pylist() if t], return_counts=True))} \
        if table.num_rows else {}
    if tasks:
        lines.append("  tasks: " + ", ".join(f"{t} ({n})" for t, n in sorted(tasks.items())))

    runs = read_runs(uri, storage_options, as_of)
    lines.append(f"  runs: {len(runs)} committed" + (f", the last {n_runs}:" if len(runs) > n_runs else ":"))
    lines.extend(_run_line(r) for r in runs[-n_runs:])
    lines.append("    (each run's full summary: the commit's psp.run info, and OUTPUT/_runs/<run_id>.json)")

    lines.append("  schema:")
    for field in output_schema(info.n_styles):
        lines.append(f"    {field.name:<18} {field.type}{'' if field.nullable else ' not null'}")

    head = table.slice(0, n_rows)
    lines.append(f"  first {head.num_rows} rows:")
    if head.num_rows:
        w = ds.to_table(columns=["image_id", "w_plus"], filter=pc.field("image_id").isin(head["image_id"]))
        norms = {i: (None if v is None else float(np.linalg.norm(np.asarray(v, np.float32))))
                 for i, v in zip(w["image_id"].to_pylist(), w["w_plus"].to_pylist())}
        for row in head.select(["image_id", "source_uri", "status", "error"]).to_pylist():
            norm = norms.get(row["image_id"])
            err = f"  error={row['error']!r}" if row["error"] else ""
            lines.append(f"    {row['image_id']}  {row['status']:<12} |w_plus|="
                         f"{'null' if norm is None else f'{norm:.3f}'}  {row['source_uri']}{err}")

    formats = [f for f in table["image_format"].to_pylist() if f not in (None, "none")]
    opts = ", storage_options=opts" if storage_options else ""
    lines += [
        f"  images: column `output_image` ({len(formats)} rows with bytes). To read the table:",
        f"    ids, w = schemas.read_latents({uri!r}{opts})      # w float32 [N, n_styles, 512], status ok",
        f"    t = schemas.read_outputs({uri!r}, columns=['image_id', 'output_image', 'image_format']{opts})",
        f"    schemas.open_dataset({uri!r}{opts})      # pyarrow dataset: .to_table(), DuckDB, Polars",
    ]
    ok = counts.get("ok", 0)
    lines.append(f"  ok: {ok}/{table.num_rows}")
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
