"""Committing a run: ONE Delta commit per run with its files, the rows it adopted, and the removal
of the rows they replace (files holding such rows are removed and, if they hold other rows too,
re-added as a rewritten copy without them), carrying the run's summary as `psp.run`; then the
run's summary beside the table (``OUTPUT/_runs/<run_id>.json``).

Concurrency: every commit is attempted at exactly the next version (`max_commit_retries=0`). If
another run committed since this run read the table, `commit_run` re-checks: when the other run
committed a row for one of this run's inputs, this run commits nothing and raises
`ConcurrentRunError` (a rerun adopts its rows); otherwise it recomputes its removals against the
new version and commits after it.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as _metadata
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.table import COMMIT_ATTEMPTS, RUN_FILES, ConcurrentRunError, OutputTable
from pipelines.writer import WrittenRun
from schemas.outputs import SCHEMA_VERSION, output_schema
from schemas.table import COMMIT_RUN, COMMIT_RUN_ID, RUNS_DIR


@dataclass
class CommitResult:
    """A committed run: the table version it made, rows added, and old rows it removed."""

    version: int
    added: int
    removed: int
    rewritten_files: int
    attempts: int


def _conflicts(table: OutputTable, dt, read_version: int | None, ids: pa.Array) -> pa.Table:
    """Rows for `ids` that another run committed after `read_version` (rows merely moved by a
    rewrite or compaction, same run_id and processed_at as before, do not count)."""
    if dt is None or read_version == dt.version():
        return pa.table({"image_id": pa.array([], pa.string())})
    cols = ("image_id", "source_uri", "run_id", "processed_at")
    now = table.state(dt, cols, ids)
    before_dt = table.load(read_version) if read_version is not None else None
    fresh = now.filter(pc.invert(pc.is_in(now["_file"], value_set=pa.array(sorted(table.files(before_dt)), pa.string()))))
    if fresh.num_rows == 0:
        return fresh
    before = table.state(before_dt, cols, fresh["image_id"])
    old = set(zip(before["image_id"].to_pylist(), before["run_id"].to_pylist(), before["processed_at"].to_pylist()))
    keep = [(i, r, t) not in old for i, r, t in zip(fresh["image_id"].to_pylist(), fresh["run_id"].to_pylist(),
                                                      fresh["processed_at"].to_pylist())]
    return fresh.filter(pa.array(keep, pa.bool_()))


def _removals(table: OutputTable, dt, drop_ids: pa.Array, run_id: str) -> tuple[list, int]:
    """Actions that take the rows of `drop_ids` (image_id or source_id among them: every face row of
    those inputs) out of `dt`'s version: RemoveAction per file
    holding one, plus an AddAction for a rewritten copy of the file's other rows. (actions, rows
    removed)."""
    from deltalake.transaction import RemoveAction

    if dt is None or len(drop_ids) == 0:
        return [], 0
    hit = table.state(dt, ("image_id",), drop_ids)
    if hit.num_rows == 0:
        return [], 0
    sizes = {r["path"]: r["size_bytes"] for r in pa.table(dt.get_add_actions(flatten=True)).select(["path", "size_bytes"]).to_pylist()}
    actions: list = []
    now_ms = int(time.time() * 1000)
    for rel in sorted(set(hit["_file"].to_pylist())):
        actions.append(RemoveAction(rel, True, now_ms, sizes.get(rel), {}))
        rows = table.read_file(rel)
        gone = pc.or_(pc.is_in(rows["image_id"], value_set=drop_ids), pc.is_in(rows["source_id"], value_set=drop_ids))
        rest = rows.filter(pc.invert(gone))
        if rest.num_rows:
            actions.append(table.write_file(f"{RUN_FILES}/{run_id}/rewrite-{uuid.uuid4().hex}.parquet", rest))
    return actions, hit.num_rows


def _dedupe(table: OutputTable, run: WrittenRun) -> WrittenRun:
    """`run` with each image_id once: a file holding a later copy of an id is rewritten without it
    (Ray retries write whole blocks again, so this should never happen; never commit a twin)."""
    if pc.count_distinct(run.ids).as_py() == len(run.ids):  # Arrow's hash, no Python object per row
        return run
    seen: set[str] = set()
    out = WrittenRun(run.run_id)
    for add in run.adds:
        rows = table.read_file(add.path)
        keep = [i for i, x in enumerate(rows["image_id"].to_pylist()) if x not in seen]
        seen.update(rows["image_id"].take(pa.array(keep, pa.int64())).to_pylist())
        if len(keep) == rows.num_rows:
            out.extend([add], rows["image_id"], rows["status"])
        elif keep:
            picked = rows.take(pa.array(keep, pa.int64()))
            out.extend([table.write_file(f"{RUN_FILES}/{run.run_id}/dedup-{uuid.uuid4().hex}.parquet", picked)],
                       picked["image_id"], picked["status"])
    return out


def commit_run(
    table: OutputTable,
    run: WrittenRun,
    n_styles: int,
    summary: Mapping[str, Any],
    read_version: int | None,
    remove_ids: Sequence[str] | pa.Array = (),
) -> CommitResult | None:
    """Commit `run` (its rows replace every current row of the same inputs: same image_id, or a
    source_id among the run's image_ids) and remove the rows of `remove_ids` (deleted inputs'
    source ids: all their face rows), in one Delta commit carrying `summary` as `psp.run`.

    `read_version`: the version the run planned against (None: no table then). Returns None when
    there is nothing to commit. Raises ConcurrentRunError when another run committed one of these
    inputs since `read_version` (nothing committed), and the delta-rs error if the commit fails.
    """
    from deltalake.exceptions import CommitFailedError
    from deltalake.transaction import CommitProperties

    remove = pa.array(list(remove_ids) if not isinstance(remove_ids, pa.Array) else remove_ids, pa.string())
    if not run.adds and len(remove) == 0:
        return None
    run = _dedupe(table, run.load(table))
    touched = pa.concat_arrays([run.ids, remove]).unique()
    meta = {COMMIT_RUN_ID: run.run_id, COMMIT_RUN: json.dumps(dict(summary), sort_keys=True, default=_json_default)}
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        dt = table.ensure(n_styles)
        clash = _conflicts(table, dt, read_version, touched)
        if clash.num_rows:
            others = sorted(set(clash["run_id"].to_pylist()))
            raise ConcurrentRunError(
                f"run {run.run_id} did not commit: run(s) {', '.join(others)} committed {clash.num_rows} of "
                f"its inputs to {table.uri} after it started (e.g. {clash['source_uri'][0].as_py()}). "
                "Nothing of this run is visible; rerun the same command: what is committed is kept and "
                "this run's finished rows are adopted, not redone"
            )
        removals, removed = _removals(table, dt, touched, run.run_id)
        actions = list(run.adds) + removals
        try:
            dt.create_write_transaction(
                actions, mode="append", schema=output_schema(n_styles),
                commit_properties=CommitProperties(custom_metadata=meta, max_commit_retries=0),
            )
        except CommitFailedError:
            # Another commit took the next version: re-check against it (our rewritten copies
            # are orphans now; vacuum removes them).
            if attempt == COMMIT_ATTEMPTS:
                raise
            time.sleep(0.2 * attempt)
            continue
        after = table.load()
        version = after.version()
        checkpoint(after)
        rewritten = sum(1 for a in removals if not hasattr(a, "deletion_timestamp"))
        return CommitResult(version, len(run.ids), removed, rewritten, attempt)
    return None  # pragma: no cover - the loop returns or raises


def checkpoint(dt) -> bool:
    """Write a Delta checkpoint of `dt`'s version (readers then open the table from it, not by
    replaying every commit). A failed checkpoint costs readers time, never data: False then."""
    import logging

    try:
        dt.create_checkpoint()
    except Exception as e:  # noqa: BLE001 - the commit is done; the next run checkpoints again
        logging.getLogger(__name__).warning("table %s: checkpoint after version %s failed: %s",
                                            dt.table_uri, dt.version(), e)
        return False
    return True


class StatusCounts:
    """A `pipelines.scan.scan_table` aggregate: rows per status."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def add(self, batch, file: str = "") -> None:
        for d in pc.value_counts(batch.column(0)).to_pylist():
            self.counts[d["values"]] = self.counts.get(d["values"], 0) + d["counts"]

    def merge(self, other: StatusCounts) -> None:
        for k, v in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v


def table_status_counts(table: OutputTable, version: int) -> dict[str, int]:
    """Rows per status of the table at `version`, read file by file (in Ray tasks for a table of
    many files): the caller's memory does not grow with the table."""
    from pipelines.scan import scan_table, table_files

    files = table_files(table.uri, table.storage_options, version)
    counts = scan_table(files, ["status"], StatusCounts).counts
    return dict(sorted((k, v) for k, v in counts.items() if v))


def write_run_summary(table: OutputTable, summary: Mapping[str, Any], version: int) -> dict:
    """Write ``OUTPUT/_runs/<run_id>.json``: the run's summary plus the whole table's counts at
    `version` (rows per status), so the state of the output is readable after every run."""
    doc = dict(summary)
    counts = table_status_counts(table, version)
    doc["table"] = {"version": version, "rows": sum(counts.values()), "counts": counts}
    fs, root = table.filesystem()
    text = json.dumps(doc, indent=2, sort_keys=True, default=_json_default) + "\n"
    fs.makedirs(f"{root}/{RUNS_DIR}", exist_ok=True)
    fs.pipe_file(f"{root}/{RUNS_DIR}/{doc['run_id']}.json", text.encode())
    return json.loads(text)


def run_metadata() -> dict[str, Any]:
    """Facts every run summary records: schema version and the versions shaping the outputs."""
    import platform

    def version(dist: str) -> str | None:
        try:
            return _metadata.version(dist)
        except _metadata.PackageNotFoundError:
            return None

    versions = {d: version(d) for d in ("psp-pipeline", "torch", "ray", "pyarrow", "numpy", "deltalake")}
    versions["python"] = platform.python_version()
    return {"schema_version": SCHEMA_VERSION, "versions": versions}


def _json_default(value: Any):
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return str(value)
