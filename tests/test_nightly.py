"""Nightly incremental runs: the diff against the output table, and the end-to-end acceptance.

Unit tests (no Ray) pin the planning rules; the acceptance test runs the real pipeline through
`run_nightly` over a folder that changes between runs, into one Delta table.
"""
from __future__ import annotations

import datetime as dt
import os

import pyarrow as pa
import pytest

from pipelines.plan import ListedInput, as_listed, plan_nightly
from pipelines.table import STATE_COLUMNS
from schemas import image_id_for, output_schema
from schemas.ids import face_image_id

SHA_A = "a" * 64
SHA_B = "b" * 64


def state(*rows) -> pa.Table:
    """The current rows of an output table as `OutputTable.state` returns them."""
    schema = pa.schema([output_schema(1).field(c) for c in STATE_COLUMNS]).append(pa.field("_file", pa.string()))
    full = []
    for r in rows:
        mtime = r.get("mtime", 100.0)
        full.append({
            "image_id": face_image_id(r["uri"], r.get("face")), "source_id": image_id_for(r["uri"]),
            "source_uri": r["uri"], "status": r.get("status", "ok"),
            "checkpoint_sha256": r.get("sha", SHA_A), "source_size": r.get("size", 10),
            "source_mtime": None if mtime is None else dt.datetime.fromtimestamp(mtime, dt.UTC),
            "source_etag": r.get("etag"), "run_id": "r1", "_file": "runs/r1/part-0.parquet",
        })
    return pa.Table.from_pylist(full, schema=schema)


# -- planning ---------------------------------------------------------------------------------

def test_plan_buckets_new_changed_deleted_unchanged():
    current = state(
        {"uri": "s3://b/same.jpg", "etag": "e1"},
        {"uri": "s3://b/changed.jpg", "etag": "e1"},
        {"uri": "s3://b/gone.jpg", "etag": "e1"},
        {"uri": "/d/local_same.jpg", "mtime": 5.0},
        {"uri": "/d/local_touched.jpg", "mtime": 5.0},
        {"uri": "/d/local_grown.jpg", "size": 10, "mtime": 5.0},
    )
    listing = [
        ListedInput("s3://b/same.jpg", 10, "e1", 999.0),  # re-upload of the same bytes: same ETag
        ListedInput("s3://b/changed.jpg", 10, "e2", 100.0),
        ListedInput("s3://b/new.jpg", 3, "e9", 1.0),
        ListedInput("/d/local_same.jpg", 10, None, 5.0),
        ListedInput("/d/local_touched.jpg", 10, None, 6.0),
        ListedInput("/d/local_grown.jpg", 11, None, 5.0),
    ]
    plan = plan_nightly(listing, current, SHA_A)
    assert plan.new == ["s3://b/new.jpg"]
    assert sorted(plan.changed) == ["/d/local_grown.jpg", "/d/local_touched.jpg", "s3://b/changed.jpg"]
    assert plan.deleted == ["s3://b/gone.jpg"]
    assert plan.unchanged == 2
    assert plan.model_changed == [] and plan.retry == []


def test_mtime_survives_the_round_trip_through_the_table():
    # Epoch seconds with sub-microsecond noise, as listings report them: stored as timestamp[us],
    # compared after the same rounding, so an untouched file is never "changed".
    mtime = 1764151234.1234567
    plan = plan_nightly([ListedInput("/d/a.jpg", 10, None, mtime)], state({"uri": "/d/a.jpg", "mtime": mtime}), SHA_A)
    assert plan.unchanged == 1 and plan.to_process == []


def test_model_change_reprocesses_only_when_asked():
    current = state({"uri": "/d/a.jpg"}, {"uri": "/d/b.jpg", "sha": SHA_B})
    listing = [ListedInput("/d/a.jpg", 10, None, 100.0), ListedInput("/d/b.jpg", 10, None, 100.0)]
    assert plan_nightly(listing, current, SHA_B).to_process == []
    plan = plan_nightly(listing, current, SHA_B, reprocess_on_model_change=True)
    assert plan.model_changed == ["/d/a.jpg"] and plan.unchanged == 1


def test_retry_failed_only_retries_transient_statuses():
    current = state(
        {"uri": "/d/read.jpg", "status": "read_error"},
        {"uri": "/d/invert.jpg", "status": "invert_error"},
        {"uri": "/d/noface.jpg", "status": "no_face"},
        {"uri": "/d/broken.jpg", "status": "decode_error"},
    )
    listing = [ListedInput(u, 10, None, 100.0) for u in
               ["/d/read.jpg", "/d/invert.jpg", "/d/noface.jpg", "/d/broken.jpg"]]
    assert plan_nightly(listing, current, SHA_A).to_process == []
    plan = plan_nightly(listing, current, SHA_A, retry_failed=True)
    assert sorted(plan.retry) == ["/d/invert.jpg", "/d/read.jpg"]
    assert plan.unchanged == 2


def test_an_input_with_several_face_rows_is_planned_once():
    """--faces all: three rows of one photo are one input to the plan (changed, deleted, retried)."""
    def faces(uri, **kw):
        return [{"uri": uri, "face": k, **kw} for k in range(3)]

    current = state(*faces("/d/group.jpg", mtime=5.0), *faces("/d/gone.jpg"),
                    *faces("/d/same.jpg"), {"uri": "/d/one_failed.jpg", "face": 0},
                    {"uri": "/d/one_failed.jpg", "face": 1, "status": "invert_error"})
    listing = [ListedInput("/d/group.jpg", 10, None, 6.0), ListedInput("/d/same.jpg", 10, None, 100.0),
               ListedInput("/d/one_failed.jpg", 10, None, 100.0)]
    plan = plan_nightly(listing, current, SHA_A)
    assert (plan.changed, plan.deleted, plan.unchanged, plan.to_process) == (
        ["/d/group.jpg"], ["/d/gone.jpg"], 2, ["/d/group.jpg"])
    # one transient face row retries the whole input, once
    assert plan_nightly(listing, current, SHA_A, retry_failed=True).retry == ["/d/one_failed.jpg"]


def test_as_listed_normalises_source_items():
    from types import SimpleNamespace

    when = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
    item = as_listed(SimpleNamespace(uri="s3://b/k", size="12", etag='"abc"', mtime=when, kind="image"))
    assert item == ListedInput("s3://b/k", 12, "abc", when.timestamp())


# -- end to end (real Ray, real pipeline) -----------------------------------------------------

def png_bytes(seed: int, size: int = 40) -> bytes:
    """A small, seeded, distinct RGB PNG (the model does not care what it inverts)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_images(folder, seeds) -> list[str]:
    """Write `img_<seed>.png` for each seed under a local folder; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for s in seeds:
        path = os.path.join(str(folder), f"img_{s:04d}.png")
        with open(path, "wb") as f:
            f.write(png_bytes(s))
        paths.append(path)
    return paths


def file_uri(path) -> str:
    """How the pipeline names a local input (`SourceItem.source_uri`)."""
    return "file://" + os.path.abspath(str(path))


def nightly_config(input_uri, output_uri, checkpoint, **overrides):
    """A small, fast pipeline config: no alignment (random test images have no face), no image
    encoding, batches of 2 so a run has several tasks to lose and retry."""
    from pipelines.config import InvertConfig

    base = dict(
        input=str(input_uri), output=str(output_uri), checkpoint=checkpoint, align="none",
        device="cpu", batch_size=2, align_actors=1, images="none", cpu_threads=1,
    )
    base.update(overrides)
    return InvertConfig(**base)


def committed_rows(output_uri, storage_options=None):
    """{source_uri: (image_id, run_id, status)} of what readers see; asserts one row per image."""
    import schemas
    from schemas.table import table_exists

    if not table_exists(str(output_uri), storage_options):
        return {}
    table = schemas.read_outputs(str(output_uri), storage_options, ["image_id", "source_uri", "run_id", "status"])
    ids = table["image_id"].to_pylist()
    assert len(ids) == len(set(ids)), "a reader sees an image twice"
    return {r["source_uri"]: (r["image_id"], r["run_id"], r["status"]) for r in table.to_pylist()}


def committed_rows_as_of(output_uri, version):
    import schemas

    table = schemas.read_outputs(output_uri, columns=["source_uri", "run_id"], as_of=version)
    return dict(zip(table["source_uri"].to_pylist(), table["run_id"].to_pylist()))


@pytest.mark.slow
@pytest.mark.tier2
def test_nightly_processes_only_new_and_changed_inputs_and_reprocesses_on_model_change(
    ray_cluster, tiny_checkpoint, tmp_path
):
    import time

    import schemas
    from pipelines.run import run_nightly
    from psp_core.testing import random_checkpoint

    inp, out = tmp_path / "in", tmp_path / "out"
    # Small counts (each image costs a full IR-SE50 pass on CPU); batches of 2 still give each run
    # several tasks.
    paths = write_images(inp, range(12))
    config = nightly_config(inp, out, tiny_checkpoint)

    r1 = run_nightly(config)
    assert r1.committed and r1.plan.counts()["new"] == 12 and r1.replaced == 0
    assert r1.processed == 12 and r1.lost == 0 and r1.live == 12
    ids1, w1 = schemas.read_latents(str(out))
    assert len(ids1) == len(set(ids1)) == 12 and w1.shape == (12, 8, 512)

    # add 4, change 2, delete 1
    write_images(inp, range(100, 104))
    time.sleep(0.01)
    for p, seed in ((paths[3], 1003), (paths[4], 1004)):
        with open(p, "wb") as f:
            f.write(png_bytes(seed, size=41))
    os.remove(paths[5])
    r2 = run_nightly(config)
    assert r2.plan.counts() == {"new": 4, "changed": 2, "model_changed": 0, "retry": 0,
                                "deleted": 1, "unchanged": 9, "to_process": 6}
    assert r2.processed == 6 and r2.lost == 0 and r2.live == 15
    assert r2.replaced == 3  # two changed inputs' old rows and the deleted input's row
    seen = committed_rows(str(out))
    assert len(seen) == 15 and file_uri(paths[5]) not in seen
    # history keeps what the night before saw
    before = committed_rows_as_of(str(out), r1.version)
    assert len(before) == 12 and file_uri(paths[5]) in before
    assert seen[file_uri(paths[3])][1] == r2.run_id and seen[file_uri(paths[0])][1] == r1.run_id
    ids2, _ = schemas.read_latents(str(out))
    assert sorted(ids2) == sorted(v[0] for v in seen.values())

    # nothing changed: nothing to do, nothing committed
    r3 = run_nightly(config)
    assert r3.plan.to_process == [] and not r3.committed

    # a new checkpoint: kept rows unless asked, everything reprocessed with the flag
    ckpt2 = random_checkpoint(str(tmp_path / "psp_v2.pt"), output_size=32, seed=1)
    r4 = run_nightly(nightly_config(inp, out, str(ckpt2)))
    assert r4.plan.to_process == []
    r5 = run_nightly(nightly_config(inp, out, str(ckpt2)), reprocess_on_model_change=True)
    assert r5.plan.counts()["model_changed"] == 15 and r5.processed == 15 and r5.lost == 0
    seen = committed_rows(str(out))
    assert len(seen) == 15 and {v[1] for v in seen.values()} == {r5.run_id}
    ids5, w5 = schemas.read_latents(str(out))
    assert len(ids5) == len(set(ids5)) == 15
    runs = schemas.read_runs(str(out))  # every committed run's summary, from the table's history
    assert [r["run_id"] for r in runs] == [r1.run_id, r2.run_id, r5.run_id]
    assert runs[1]["plan"]["deleted"] == 1 and runs[2]["kind"] == "nightly"
