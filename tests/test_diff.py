"""The plan as a distributed join (`pipelines.diff`): the same buckets as the driver-side plan,
whether it runs in the calling process or in Ray tasks over several hash partitions, against a
real Delta table and real Parquet listing shards."""
from __future__ import annotations

import datetime as dt
import random

import numpy as np
import pyarrow as pa
import pytest

import schemas
from pipelines.adoption import facts_changed
from pipelines.diff import BUCKETS, STATE_COLUMNS, DiffRule, diff, diff_partition, partition_of, split
from pipelines.items import mtime_us
from pipelines.listing import SHARD_SCHEMA, Listing, write_shard
from pipelines.plan import plan_nightly
from pipelines.table import OutputTable
from schemas.ids import face_image_id, image_id_for
from schemas.status import FINAL_STATUSES
from tests.output_tables import commit_table

SHA_A, SHA_B = "a" * 64, "b" * 64
STATUSES = ["ok", "ok", "ok", "no_face", "decode_error", "read_error", "invert_error"]


def world(seed: int, n: int = 400):
    """A listing (SHARD_SCHEMA rows, a few URIs listed twice) and output rows (some inputs with
    several face rows, changed facts, other checkpoints, transient statuses, deleted inputs)."""
    rng = random.Random(seed)
    listed, rows = [], []
    for i in range(n):
        uri = f"s3://b/{'d' if i % 3 else 'e'}/{i:05d}.jpg" if i % 2 else f"/data/x/{i:05d}#a.jpg"
        etag = "" if i % 5 == 0 else f"e{i}"
        size, mtime = 1000 + i, 1.7e9 + i + 0.1234567
        if rng.random() < 0.85:
            listed.append({"uri": uri, "source_uri": uri, "kind": "file", "column": "", "offset": -1,
                           "size": size, "etag": etag, "mtime": mtime})
        if rng.random() < 0.7:  # the table has rows for it
            faces = rng.choice([None, None, 2, 3])
            r_etag = etag if rng.random() < 0.8 else "other"
            r_size = size if rng.random() < 0.9 else size + 1
            r_mtime = mtime if rng.random() < 0.9 else mtime + 5
            sha = SHA_A if rng.random() < 0.8 else SHA_B
            for face in range(faces or 1):
                rows.append({
                    "image_id": face_image_id(uri, face if faces else None), "source_id": image_id_for(uri),
                    "source_uri": uri, "status": rng.choice(STATUSES), "checkpoint_sha256": sha,
                    "source_size": r_size, "source_etag": r_etag or None,
                    "source_mtime": dt.datetime.fromtimestamp(r_mtime, dt.UTC),
                    "face_index": face if faces else None, "face_count": faces,
                })
    listed += [dict(r) for r in rng.sample(listed, 5)]  # listed twice: counted once
    return pa.Table.from_pylist(listed, schema=SHARD_SCHEMA), rows


def listing_of(table: pa.Table, folder, shards: int = 5) -> Listing:
    listing = Listing([], [], storage_options={}, root=str(folder))
    for k, part in enumerate(np.array_split(np.arange(table.num_rows), shards)):
        path = f"{folder}/part-{k:03d}.parquet"
        write_shard(table.take(pa.array(part)), path, {})
        listing.paths.append(path)
        listing.rows.append(len(part))
    return listing


def output_rows(rows, n_styles: int = 2) -> pa.Table:
    full = [dict(r, run_id="r1", processed_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)) for r in rows]
    return schemas.rows_to_table(full, n_styles)


def oracle(listed: pa.Table, rows: list[dict], rule: DiffRule) -> tuple[dict[str, list], list[str]]:
    """The plan written out input by input in plain Python (the rules of the module doc, with the
    row-level `facts_changed`): {bucket: source_uris in listing order}, deleted source_uris."""
    of: dict[str, list[dict]] = {}
    for r in rows:
        of.setdefault(r["source_uri"], []).append(r)
    out: dict[str, list] = {b: [] for b in BUCKETS}
    seen = set()
    for item in listed.to_pylist():
        uri = item["source_uri"]
        if uri in seen:
            continue
        seen.add(uri)
        mine = of.get(uri)
        if not mine:
            out["new"].append(uri)
            continue
        transient = any(r["status"] not in FINAL_STATUSES for r in mine)
        if rule.mode == "invert":
            out["retry" if transient else "unchanged"].append(uri)
            continue
        listed_facts = {"source_size": None if item["size"] < 0 else item["size"], "source_etag": item["etag"] or None,
                        "source_mtime": mtime_us(None if item["mtime"] != item["mtime"] else item["mtime"])}
        made = {"source_size": mine[0]["source_size"], "source_etag": mine[0]["source_etag"],
                "source_mtime": mtime_us(mine[0]["source_mtime"])}
        if facts_changed(listed_facts, made):
            out["changed"].append(uri)
        elif rule.reprocess_on_model_change and mine[0]["checkpoint_sha256"] != rule.checkpoint_sha256:
            out["model_changed"].append(uri)
        elif rule.retry_failed and transient:
            out["retry"].append(uri)
        else:
            out["unchanged"].append(uri)
    return out, sorted(set(of) - seen)


RULES = [DiffRule("nightly", SHA_A), DiffRule("nightly", SHA_A, reprocess_on_model_change=True),
         DiffRule("nightly", SHA_A, retry_failed=True), DiffRule("nightly", SHA_A, True, True), DiffRule("invert")]


@pytest.mark.parametrize("seed", [1, 2])
def test_a_partition_plans_each_input_by_the_rules(seed):
    listed, rows = world(seed)
    state = output_rows(rows).select(list(STATE_COLUMNS))
    for rule in RULES:
        todo, deleted, counts = diff_partition(listed, state, rule)
        want, want_deleted = oracle(listed, rows, rule)
        got = {b: todo.filter(pa.compute.equal(todo["bucket"], i))["source_uri"].to_pylist()
               for i, b in enumerate(BUCKETS) if b != "unchanged"}
        assert got == {b: v for b, v in want.items() if b != "unchanged"}, rule
        assert counts["unchanged"] == len(want["unchanged"]) and deleted.to_pylist() == want_deleted
        if rule.mode == "nightly":  # the in-process plan is the same function
            plan = plan_nightly(listed, state, SHA_A, rule.reprocess_on_model_change, rule.retry_failed)
            assert plan.to_process == [u for b in BUCKETS[:-1] for u in want[b]] and plan.deleted == want_deleted


def test_partitions_are_a_fixed_hash_and_keep_order():
    uris = pa.array([f"s3://b/{i}.jpg" for i in range(1000)])
    part = partition_of(uris, 7)
    assert part.min() == 0 and part.max() == 6 and len(set(part.tolist())) == 7
    # the same URI lands in the same partition in any batch (what makes the join correct)
    again = partition_of(pa.array([f"s3://b/{i}.jpg" for i in range(999, -1, -1)]), 7)
    assert again.tolist() == part.tolist()[::-1]
    parts = split(pa.table({"source_uri": uris, "i": np.arange(1000)}), 7)
    assert sum(p.num_rows for p in parts) == 1000
    assert all(np.all(np.diff(p["i"].to_numpy()) > 0) for p in parts)


@pytest.mark.parametrize("use_ray", [False, True])
def test_diff_over_a_delta_table_in_tasks_equals_the_driver_plan(use_ray, tmp_path, request, monkeypatch):
    if use_ray:
        request.getfixturevalue("ray_cluster")
    else:  # the rows to process come back in shards of at most TODO_SHARD_ROWS (a read task each)
        import pipelines.diff

        monkeypatch.setattr(pipelines.diff, "TODO_SHARD_ROWS", 50)
    listed, rows = world(3, n=600)
    commit_table(tmp_path / "out", output_rows(rows[: len(rows) // 2]), 2, run_id="r1")
    commit_table(tmp_path / "out", output_rows(rows[len(rows) // 2:]), 2, run_id="r2")  # two files
    table = OutputTable(str(tmp_path / "out"))
    current = table.load()
    listing = listing_of(listed, tmp_path / "listing")
    for rule in RULES[2:]:
        plan = diff(listing, table, current, str(tmp_path / "scratch"), rule, use_ray=use_ray,
                    partition_rows=150 if use_ray else 10**6)
        assert plan.partitions == (9 if use_ray else 1)  # ceil((605 listed + 786 rows) / 150)
        want, want_deleted = oracle(listed, rows, rule)
        got = plan.bucket_uris()
        for b in BUCKETS[:-1]:  # order inside a bucket: listing order per partition
            assert sorted(got[b]) == sorted(want[b]), b
        assert plan.counts["unchanged"] == len(want["unchanged"])
        assert plan.deleted.to_pylist() == want_deleted and plan.counts["deleted"] == len(want_deleted)
        assert plan.todo.total == plan.to_process == sum(len(want[b]) for b in BUCKETS[:-1])
        assert use_ray or (len(plan.todo.paths) > 1 and max(plan.todo.rows) <= 50)
        assert plan.table_rows == len(rows)
        todo = plan.todo.read_table(SHARD_SCHEMA.names)  # what the pipeline reads: the listing's rows, as listed
        by_uri = {r["source_uri"]: r for r in listed.to_pylist()}
        assert all(by_uri[r["source_uri"]] == r for r in todo.to_pylist())
        plan.todo.discard()
    # nothing listed: everything in the table is deleted; no table: everything is new
    empty = Listing([], [], storage_options={}, root=str(tmp_path / "none"))
    gone = diff(empty, table, current, str(tmp_path / "scratch"), DiffRule("nightly", SHA_A), use_ray=use_ray)
    assert gone.to_process == 0 and gone.counts["deleted"] == len({r["source_uri"] for r in rows})
    fresh = diff(listing, None, None, str(tmp_path / "scratch"), DiffRule("invert"), use_ray=use_ray)
    assert fresh.counts["new"] == fresh.to_process == len(set(listed["source_uri"].to_pylist()))
