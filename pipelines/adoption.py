"""Adopting the rows of crashed runs: files a run wrote under ``runs/<id>/`` that no commit names
(it died before its commit) hold finished rows; a rerun takes those made from the same bytes
(listing facts unchanged) and the same checkpoint instead of redoing them. An input's rows are
taken only all together (`face_count` of them, from one run).
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.listing import shard_facts
from pipelines.table import RUN_FILES, OutputTable
from pipelines.writer import WrittenRun
from schemas.table import COMMIT_RUN_ID


def wanted_facts(listed: pa.Table) -> pa.Table:
    """The `wanted` table of `adoptable_rows` from listing-shard rows (`SHARD_SCHEMA`'s source_uri,
    size, etag, mtime; `pipelines.listing.items_table` makes them from items): image_id (the
    input's source_id) and its listing facts as the output rows store them."""
    from schemas.ids import image_id_for

    facts = shard_facts(listed)
    return pa.table({
        "image_id": pa.array([image_id_for(u) for u in listed["source_uri"].to_pylist()], pa.string()),
        "source_size": facts["size"], "source_mtime": pc.cast(facts["mtime"], pa.timestamp("us", tz="UTC")),
        "source_etag": facts["etag"],
    })


def committed_run_ids(dt) -> set[str]:
    """Run ids of every commit the table's history knows (`psp.run_id` of its commit info)."""
    if dt is None:
        return set()
    return {c[COMMIT_RUN_ID] for c in dt.history() if c.get(COMMIT_RUN_ID)}


def uncommitted_runs(table: OutputTable, dt, exclude_run: str | None = None) -> list[str]:
    """Ids of the runs with files under ``runs/`` that no commit of `dt`'s history names (runs
    that died before their commit, or are still in flight), sorted; `exclude_run` left out."""
    fs, root = table.filesystem()
    base = f"{root}/{RUN_FILES}"
    try:
        fs.invalidate_cache(base)
        run_dirs = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False))
    except FileNotFoundError:
        return []
    skip = committed_run_ids(dt) | {exclude_run}
    return [r for r in run_dirs if r not in skip]


def adoptable_rows(
    table: OutputTable, dt, wanted: pa.Table, checkpoint_sha256: str | None, retry_failed: bool,
    exclude_run: str | None = None,
) -> WrittenRun:
    """Rows that uncommitted (crashed) runs wrote under ``runs/<id>/`` for inputs in `wanted`
    (a table with image_id = the input's source_id, source_size, source_mtime, source_etag: the
    current listing facts), made from the same bytes (facts unchanged) and the same checkpoint;
    with `retry_failed`, not transient failures. An input's rows are adopted all together or not
    at all: all `face_count` of them (one without a face count), from one run, each passing those
    tests. A file whose rows are all adopted is added as it is; from other files the adopted rows
    are copied into ``runs/<exclude_run>/adopted-*.parquet``. The first run (by id) wins."""
    from schemas.status import is_transient

    out = WrittenRun(exclude_run or "")
    if wanted.num_rows == 0:
        return out
    run_dirs = uncommitted_runs(table, dt, exclude_run)
    if not run_dirs:
        return out
    fs, root = table.filesystem()
    base = f"{root}/{RUN_FILES}"
    live = table.files(dt)
    facts = {r["image_id"]: r for r in wanted.select(["image_id", "source_size", "source_mtime", "source_etag"]).to_pylist()}
    small = ["image_id", "source_id", "face_count", "status", "checkpoint_sha256", "source_size",
             "source_mtime", "source_etag"]
    taken: set[str] = set()  # inputs (source_id) adopted from an earlier run
    for run in run_dirs:
        files = []  # (rel, full path, small columns)
        for full in sorted(p for p in fs.find(f"{base}/{run}") if p.endswith(".parquet")):
            rel = full[len(root) + 1:]
            if rel in live:
                continue
            try:  # the small columns first: a file adopted whole is never read further
                files.append((rel, full, table.read_file(rel, small)))
            except Exception:  # noqa: BLE001, S112 - cut short by the crash, or another schema
                continue
        rows_of: dict[str, list[tuple[int, int, str, bool]]] = {}  # source -> (file, row, image_id, ok)
        expected: dict[str, int] = {}
        for f, (_, _, rows) in enumerate(files):
            for i, r in enumerate(rows.to_pylist()):
                src = r["source_id"] or r["image_id"]
                want = facts.get(src)
                if want is None or src in taken:
                    continue
                ok = ((checkpoint_sha256 is None or r["checkpoint_sha256"] == checkpoint_sha256)
                      and not facts_changed(want, r)
                      and not (retry_failed and is_transient(r["status"])))
                rows_of.setdefault(src, []).append((f, i, r["image_id"], ok))
                expected[src] = max(1, r["face_count"] or 1)
        keep: dict[int, list[int]] = {}
        for src, found in rows_of.items():
            complete = len(found) == len({x[2] for x in found}) == expected[src]
            if complete and all(x[3] for x in found):
                taken.add(src)
                for f, i, _, _ in found:
                    keep.setdefault(f, []).append(i)
        for f in sorted(keep):
            rel, full, rows = files[f]
            picked_idx = sorted(keep[f])
            if len(picked_idx) == rows.num_rows:
                from deltalake.transaction import AddAction

                add = AddAction(rel, fs.size(full), {}, int(time.time() * 1000), True,
                                json.dumps({"numRecords": rows.num_rows}))
                picked = rows
            else:
                picked = table.read_file(rel).take(pa.array(picked_idx, pa.int64()))
                add = table.write_file(f"{RUN_FILES}/{exclude_run}/adopted-{uuid.uuid4().hex}.parquet", picked)
            out.extend([add], picked["image_id"], picked["status"])
    return out


def facts_changed(listed: Mapping[str, Any], made_from: Mapping[str, Any]) -> bool:
    """True if an input's listing facts (source_size/mtime/etag) differ from those a row was made
    from. Where both have an ETag it decides (with the size): re-uploaded identical bytes are no
    change. Without ETags size and mtime decide; with nothing comparable: changed."""
    a_size, b_size = listed.get("source_size"), made_from.get("source_size")
    if a_size is not None and b_size is not None and a_size != b_size:
        return True
    a_etag, b_etag = listed.get("source_etag"), made_from.get("source_etag")
    if a_etag is not None and b_etag is not None:
        return a_etag != b_etag
    a_mtime, b_mtime = listed.get("source_mtime"), made_from.get("source_mtime")
    if a_mtime is not None and b_mtime is not None:
        return a_mtime != b_mtime
    return a_etag != b_etag or a_mtime != b_mtime
