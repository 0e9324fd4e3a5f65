"""Nightly incremental runs: the diff, the manifest commit protocol, and the end-to-end acceptance.

Unit tests (no Ray) pin the planning rules and the commit protocol; the acceptance test runs the
real pipeline through `psp nightly` twice over a folder that changes in between.
"""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.nightly import (
    ListedInput,
    NightlyPlan,
    as_listed,
    next_manifest,
    plan_nightly,
)
from schemas import manifest as mf

SHA_A = "a" * 64
SHA_B = "b" * 64


def _entry(uri, etag=None, size=10, mtime=100.0, sha=SHA_A, status="ok", run="r1"):
    return {
        "image_id": mf.image_id_for(uri),
        "source_uri": uri,
        "etag": etag,
        "size": size,
        "mtime": mtime,
        "checkpoint_sha256": sha,
        "schema_version": 1,
        "run_id": run,
        "status": status,
        "output_file": f"runs/{run}/part-0.parquet" if status != mf.DELETED else None,
    }


# -- planning ---------------------------------------------------------------------------------

def test_plan_buckets_new_changed_deleted_unchanged():
    manifest = mf.make_entries(
        [
            _entry("s3://b/same.jpg", etag="e1"),
            _entry("s3://b/changed.jpg", etag="e1"),
            _entry("s3://b/gone.jpg", etag="e1"),
            _entry("/d/local_same.jpg", mtime=5.0),
            _entry("/d/local_touched.jpg", mtime=5.0),
            _entry("/d/local_grown.jpg", size=10, mtime=5.0),
        ]
    )
    listing = [
        ListedInput("s3://b/same.jpg", 10, "e1", 999.0),  # re-upload of the same bytes: same ETag
        ListedInput("s3://b/changed.jpg", 10, "e2", 100.0),
        ListedInput("s3://b/new.jpg", 3, "e9", 1.0),
        ListedInput("/d/local_same.jpg", 10, None, 5.0),
        ListedInput("/d/local_touched.jpg", 10, None, 6.0),
        ListedInput("/d/local_grown.jpg", 11, None, 5.0),
    ]
    plan = plan_nightly(listing, manifest, SHA_A)
    assert plan.new == ["s3://b/new.jpg"]
    assert sorted(plan.changed) == ["/d/local_grown.jpg", "/d/local_touched.jpg", "s3://b/changed.jpg"]
    assert plan.deleted == ["s3://b/gone.jpg"]
    assert plan.unchanged == 2
    assert plan.model_changed == [] and plan.retry == []


def test_model_change_reprocesses_only_when_asked():
    manifest = mf.make_entries([_entry("/d/a.jpg"), _entry("/d/b.jpg", sha=SHA_B)])
    listing = [ListedInput("/d/a.jpg", 10, None, 100.0), ListedInput("/d/b.jpg", 10, None, 100.0)]
    assert plan_nightly(listing, manifest, SHA_B).to_process == []
    plan = plan_nightly(listing, manifest, SHA_B, reprocess_on_model_change=True)
    assert plan.model_changed == ["/d/a.jpg"] and plan.unchanged == 1


def test_retry_failed_only_retries_transient_statuses():
    manifest = mf.make_entries(
        [
            _entry("/d/read.jpg", status="read_error"),
            _entry("/d/invert.jpg", status="invert_error"),
            _entry("/d/noface.jpg", status="no_face"),
            _entry("/d/broken.jpg", status="decode_error"),
        ]
    )
    listing = [ListedInput(u, 10, None, 100.0) for u in
               ["/d/read.jpg", "/d/invert.jpg", "/d/noface.jpg", "/d/broken.jpg"]]
    assert plan_nightly(listing, manifest, SHA_A).to_process == []
    plan = plan_nightly(listing, manifest, SHA_A, retry_failed=True)
    assert sorted(plan.retry) == ["/d/invert.jpg", "/d/read.jpg"]
    assert plan.unchanged == 2


def test_a_deleted_input_that_comes_back_is_new_and_tombstones_are_not_repeated():
    manifest = mf.make_entries([_entry("/d/x.jpg", status=mf.DELETED), _entry("/d/y.jpg", status=mf.DELETED)])
    plan = plan_nightly([ListedInput("/d/x.jpg", 10, None, 100.0)], manifest, SHA_A)
    assert plan.new == ["/d/x.jpg"] and plan.deleted == []


def test_as_listed_normalises_source_items():
    import datetime as dt
    from types import SimpleNamespace

    when = dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)
    item = as_listed(SimpleNamespace(uri="s3://b/k", size="12", etag='"abc"', mtime=when, kind="image"))
    assert item == ListedInput("s3://b/k", 12, "abc", when.timestamp())


def test_next_manifest_tombstones_deleted_replaces_processed_keeps_unprocessed():
    prev = mf.make_entries([_entry("/d/a.jpg"), _entry("/d/b.jpg"), _entry("/d/c.jpg")])
    plan = NightlyPlan(new=["/d/n.jpg"], changed=["/d/a.jpg", "/d/b.jpg"], deleted=["/d/c.jpg"])
    listing = {u: ListedInput(u, 20, None, 200.0) for u in ["/d/a.jpg", "/d/b.jpg", "/d/n.jpg"]}
    results = {  # b got no row this run (lost): it keeps its old entry and is planned again
        "/d/a.jpg": {"status": "ok", "output_file": "runs/r2/p.parquet"},
        "/d/n.jpg": {"status": "no_face", "output_file": "runs/r2/p.parquet"},
    }
    new = {r["source_uri"]: r for r in next_manifest(prev, plan, listing, results, "r2", SHA_B).to_pylist()}
    assert new["/d/a.jpg"]["run_id"] == "r2" and new["/d/a.jpg"]["size"] == 20
    assert new["/d/a.jpg"]["checkpoint_sha256"] == SHA_B
    assert new["/d/b.jpg"]["run_id"] == "r1" and new["/d/b.jpg"]["size"] == 10
    assert new["/d/c.jpg"]["status"] == mf.DELETED and new["/d/c.jpg"]["output_file"] is None
    assert new["/d/n.jpg"]["status"] == "no_face"
    replan = plan_nightly(list(listing.values()), mf.make_entries(new.values()), SHA_B)
    assert replan.changed == ["/d/b.jpg"] and replan.new == [] and replan.deleted == []


# -- commit protocol --------------------------------------------------------------------------

def _write_rows(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_commit_writes_manifest_then_pointer_and_readers_see_only_committed_rows(tmp_path):
    out = str(tmp_path / "out")
    assert mf.read_committed(out) is None  # not a nightly output: callers read it plainly
    row = lambda uri, run, v: {"image_id": mf.image_id_for(uri), "source_uri": uri, "run_id": run, "v": v}
    _write_rows(f"{out}/runs/r1/part-0.parquet", [row("/a", "r1", 1), row("/b", "r1", 1),
                                                  row("/b", "r1", 1)])  # a duplicated row
    m1 = mf.make_entries([
        {**_entry("/a", run="r1"), "output_file": "runs/r1/part-0.parquet"},
        {**_entry("/b", run="r1"), "output_file": "runs/r1/part-0.parquet"},
    ])
    p1 = mf.commit_manifest(out, m1, "r1", expected=None)
    assert p1.seq == 1 and os.path.exists(f"{out}/_manifests/{p1.manifest}")
    assert json.loads(open(f"{out}/_manifests/_CURRENT.json").read())["manifest"] == p1.manifest

    # Run 2 reprocesses /b, then "crashes" run 3 before its commit: its files exist, unreferenced.
    _write_rows(f"{out}/runs/r2/part-0.parquet", [row("/b", "r2", 2)])
    _write_rows(f"{out}/runs/r3/part-0.parquet", [row("/a", "r3", 3), row("/c", "r3", 3)])
    m2 = mf.make_entries([
        {**_entry("/a", run="r1"), "output_file": "runs/r1/part-0.parquet"},
        {**_entry("/b", run="r2"), "output_file": "runs/r2/part-0.parquet"},
    ])
    p2 = mf.commit_manifest(out, m2, "r2", expected=p1)
    table = mf.read_committed(out, columns=["source_uri", "v"])
    got = sorted(zip(table["source_uri"].to_pylist(), table["v"].to_pylist()))
    assert got == [("/a", 1), ("/b", 2)]  # latest row per image, no dup, nothing from run 3
    assert mf.committed_output_files(out) == [f"{out}/runs/r1/part-0.parquet", f"{out}/runs/r2/part-0.parquet"]

    # A run that started from p1 lost the race to p2: it must not commit.
    with pytest.raises(mf.ManifestError, match="rerun"):
        mf.commit_manifest(out, m2, "r4", expected=p1)
    assert mf.read_pointer(out) == p2


def test_commit_leaves_no_temporary_files_and_survives_a_torn_pointer_write(tmp_path):
    out = str(tmp_path / "o")
    m = mf.make_entries([_entry("/a")])
    mf.commit_manifest(out, m, "r1", expected=None)
    names = sorted(os.listdir(f"{out}/_manifests"))
    assert names == ["_CURRENT.json", "manifest-00000001-r1.parquet"]
    # A crash mid-write leaves only a temp file beside the pointer; readers still see run r1.
    with open(f"{out}/_manifests/_CURRENT.json.tmp-dead", "w") as f:
        f.write('{"seq": 2, "run_id": "r2", "manif')
    assert mf.read_pointer(out).run_id == "r1"


def test_commit_on_s3_is_readable_back(s3_server):
    bucket = s3_server.make_bucket("mf")
    out = f"s3://{bucket}/nightly"
    so = s3_server.storage_options
    s3_server.client().put_object(Bucket=bucket, Key="nightly/runs/r1/p.parquet", Body=_parquet_bytes(
        [{"image_id": mf.image_id_for("/a"), "source_uri": "/a", "run_id": "r1", "v": 7}]))
    entry = {**_entry("/a", run="r1"), "output_file": "runs/r1/p.parquet"}
    mf.commit_manifest(out, mf.make_entries([entry]), "r1", expected=None, storage_options=so)
    manifest, pointer = mf.read_manifest(out, so)
    assert pointer.run_id == "r1" and manifest["source_uri"].to_pylist() == ["/a"]
    assert mf.read_committed(out, ["v"], so)["v"].to_pylist() == [7]


def _parquet_bytes(rows):
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue().to_pybytes()


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
    table = mf.read_committed(output_uri, ["image_id", "source_uri", "run_id", "status"], storage_options)
    ids = table["image_id"].to_pylist()
    assert len(ids) == len(set(ids)), "a reader sees an image twice"
    return {r["source_uri"]: (r["image_id"], r["run_id"], r["status"]) for r in table.to_pylist()}


@pytest.mark.slow
def test_nightly_processes_only_new_and_changed_inputs_and_reprocesses_on_model_change(
    ray_cluster, tiny_checkpoint, tmp_path
):
    import time

    import schemas
    from jobs.nightly import run_nightly
    from psp_core.testing import random_checkpoint

    inp, out = tmp_path / "in", tmp_path / "out"
    paths = write_images(inp, range(30))
    config = nightly_config(inp, out, tiny_checkpoint)

    r1 = run_nightly(config)
    assert r1.committed and r1.plan.counts()["new"] == 30
    assert r1.processed == 30 and r1.lost == 0 and r1.live == 30
    ids1, w1 = schemas.read_latents(str(out))
    assert len(ids1) == len(set(ids1)) == 30 and w1.shape == (30, 8, 512)

    # add 10, change 2, delete 1
    write_images(inp, range(100, 110))
    time.sleep(0.01)
    for p, seed in ((paths[3], 1003), (paths[4], 1004)):
        with open(p, "wb") as f:
            f.write(png_bytes(seed, size=41))
    os.remove(paths[5])
    r2 = run_nightly(config)
    assert r2.plan.counts() == {"new": 10, "changed": 2, "model_changed": 0, "retry": 0,
                                "deleted": 1, "unchanged": 27, "to_process": 12}
    assert r2.processed == 12 and r2.lost == 0 and r2.live == 39
    seen = committed_rows(str(out))
    assert len(seen) == 39 and file_uri(paths[5]) not in seen
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
    assert r5.plan.counts()["model_changed"] == 39 and r5.processed == 39 and r5.lost == 0
    seen = committed_rows(str(out))
    assert len(seen) == 39 and {v[1] for v in seen.values()} == {r5.run_id}
    ids5, w5 = schemas.read_latents(str(out))
    assert len(ids5) == len(set(ids5)) == 39
