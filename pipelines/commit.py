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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata as _metadata
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.diff import PARTITION_ROWS
from pipelines.replace import RUN, TABLE, Changes, changes
from pipelines.table import COMMIT_ATTEMPTS, ConcurrentRunError, OutputTable
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


def commit_actions(dt, adds: Sequence[Any], got: Changes) -> list:
    """The commit's Delta actions: the run's `adds` (a file with twins replaced by its rewritten
    copy, or left out when none of its rows is left), and per table file holding rows it replaces
    a RemoveAction plus, if other rows are left, an AddAction of its rewritten copy."""
    from deltalake.transaction import AddAction, RemoveAction

    def add_of(copy) -> AddAction:
        path, size, modified_ms, stats = copy
        return AddAction(path, size, {}, modified_ms, True, stats)

    actions = []
    for i, add in enumerate(adds):
        if (RUN, i) not in got.dropped:
            actions.append(add)
        elif got.copies.get((RUN, i)) is not None:
            actions.append(add_of(got.copies[(RUN, i)]))
    touched = sorted(key for key in got.dropped if key[0] == TABLE)
    if touched:
        sizes = pa.table(dt.get_add_actions(flatten=True)).select(["path", "size_bytes"])
        wanted = {got.paths[key] for key in touched}
        sizes = {p: s for p, s in zip(sizes["path"].to_pylist(), sizes["size_bytes"].to_pylist()) if p in wanted}
        now_ms = int(time.time() * 1000)
        for key in touched:
            actions.append(RemoveAction(got.paths[key], True, now_ms, sizes.get(got.paths[key]), {}))
            if got.copies.get(key) is not None:
                actions.append(add_of(got.copies[key]))
    return actions


def commit_run(
    table: OutputTable,
    run: WrittenRun,
    n_styles: int,
    summary: Mapping[str, Any],
    read_version: int | None,
    remove_ids: Sequence[str] | pa.Array = (),
    *,
    use_ray: bool | None = None,
    partition_rows: int = PARTITION_ROWS,
) -> CommitResult | None:
    """Commit `run` (its rows replace every current row of the same inputs: same image_id, or a
    source_id among the run's image_ids) and remove the rows of `remove_ids` (deleted inputs'
    source ids: all their face rows), in one Delta commit carrying `summary` as `psp.run`.

    `read_version`: the version the run planned against (None: no table then). Returns None when
    there is nothing to commit. Raises ConcurrentRunError when another run committed one of these
    inputs since `read_version` (nothing committed), and the delta-rs error if the commit fails.

    Which rows go (and the run's twins, rows Ray wrote twice) is a join in Ray tasks
    (`pipelines.replace`); touched files are rewritten there. The driver holds file names and
    counts, never a value per row. use_ray: None: Ray tasks when Ray is up or the commit is big;
    partition_rows: rows (the run's and the table's) per partition of the join.
    """
    from deltalake.exceptions import CommitFailedError
    from deltalake.transaction import CommitProperties

    remove = pa.array(list(remove_ids) if not isinstance(remove_ids, pa.Array) else remove_ids, pa.string())
    if not run.adds and len(remove) == 0:
        return None
    meta = {COMMIT_RUN_ID: run.run_id, COMMIT_RUN: json.dumps(dict(summary), sort_keys=True, default=_json_default)}
    paths = [a.path for a in run.adds]
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        dt = table.ensure(n_styles)
        got = changes(table, dt, paths, run.rows, remove, read_version, run.run_id, use_ray=use_ray,
                      partition_rows=partition_rows)
        if got.clash:
            raise ConcurrentRunError(
                f"run {run.run_id} did not commit: run(s) {', '.join(got.clash_runs)} committed {got.clash} of "
                f"its inputs to {table.uri} after it started (e.g. {got.clash_uri}). "
                "Nothing of this run is visible; rerun the same command: what is committed is kept and "
                "this run's finished rows are adopted, not redone"
            )
        actions = commit_actions(dt, run.adds, got)
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
        rewritten = sum(1 for (kind, _), c in got.copies.items() if kind == TABLE and c is not None)
        return CommitResult(version, run.rows - got.rows_dropped(RUN), got.rows_dropped(TABLE), rewritten, attempt)
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
