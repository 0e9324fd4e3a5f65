"""The Parquet sink through a real Ray Dataset write (local folder and S3 over HTTP via moto), read
back WITHOUT Ray by pyarrow, pandas, DuckDB and the schemas readers; `_SUCCESS.json`; reruns;
`psp inspect`."""
from __future__ import annotations

import datetime as dt
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import outputs as so
from schemas.testing import EXAMPLE_TIME as T0
from schemas.testing import example_rows

N_STYLES = 8


def make_rows(n_ok: int = 4, n_err: int = 2, seed: int = 0, run_id: str = "run-a", t=T0, prefix="img"):
    return example_rows(n_ok, n_err, N_STYLES, seed=seed, run_id=run_id, processed_at=t, prefix=prefix)

pytestmark = pytest.mark.slow


def ray_dataset(rows: list[dict], n_blocks: int):
    """A Ray Dataset whose last stage returns `rows_to_table` batches, as the pipeline's does."""
    import ray

    def to_table(batch: pa.Table) -> pa.Table:
        picked = [rows[i] for i in batch["id"].to_pylist()]
        return so.rows_to_table(picked, N_STYLES)

    ds = ray.data.range(len(rows), override_num_blocks=n_blocks)
    return ds.map_batches(to_table, batch_format="pyarrow", batch_size=None)


def test_ray_write_reads_back_without_ray(ray_cluster, tmp_path):
    import duckdb
    import pandas as pd

    from pipelines.sink import existing_image_ids, write_outputs

    rows = make_rows(n_ok=6, n_err=2)
    out = tmp_path / "out"
    write_outputs(ray_dataset(rows, n_blocks=3), str(out), "run-a", n_styles=N_STYLES)

    files = sorted(p.name for p in out.glob("*.parquet"))
    assert files and sorted(p.name for p in out.iterdir()) == files  # nothing else written
    assert all(re.fullmatch(r"part-run-a-[0-9a-f_]+-\d{6}-\d+\.parquet", f) for f in files), files
    # every file carries the identical v1 schema, metadata included
    for f in out.glob("*.parquet"):
        assert pq.read_schema(f).equals(so.output_schema(N_STYLES), check_metadata=True)

    table = pq.read_table(out)  # pyarrow dataset over the folder
    assert table.num_rows == 8
    by_id = {r["image_id"]: r for r in table.to_pylist()}
    for r in rows:
        got = by_id[so.image_id_for(r["source_uri"])]
        assert got["status"] == r["status"]
        if r["status"] == "ok":
            np.testing.assert_array_equal(np.asarray(got["w_plus"], np.float32), r["w_plus"].ravel())
            assert got["output_image"] == r["output_image"]
        else:
            assert got["w_plus"] is None and got["landmarks"] is None and got["error"] == r["error"]

    df = pd.read_parquet(out)
    assert sorted(df["status"].value_counts().items()) == [("decode_error", 2), ("ok", 6)]
    n = duckdb.sql(
        f"select count(*) from read_parquet('{out}/*.parquet') where status = 'ok' and len(w_plus) = {N_STYLES * 512}"
    ).fetchall()[0][0]
    assert n == 6

    ids, w = so.read_latents(str(out))
    assert w.shape == (6, N_STYLES, 512)
    want = {so.image_id_for(r["source_uri"]): r["w_plus"] for r in rows if r["status"] == "ok"}
    for image_id, latent in zip(ids, w):
        np.testing.assert_array_equal(latent, want[image_id])
    assert existing_image_ids(str(out)) == {so.image_id_for(r["source_uri"]) for r in rows}


def test_rerun_appends_and_readers_see_latest_only(ray_cluster, tmp_path):
    from pipelines.sink import existing_image_ids, write_outputs

    out = tmp_path / "out"
    first = make_rows(n_ok=3, n_err=2, run_id="run-a", t=T0)
    write_outputs(ray_dataset(first, n_blocks=2), str(out), "run-a", n_styles=N_STYLES)
    run_a_files = {p: p.read_bytes() for p in out.glob("part-run-a-*.parquet")}
    assert existing_image_ids(str(out), statuses={"ok"}) == {
        so.image_id_for(r["source_uri"]) for r in first if r["status"] == "ok"
    }
    # the rerun retries the two failures; they now succeed
    later = T0 + dt.timedelta(minutes=5)
    retry = [dict(r, status="ok", error=None, w_plus=np.full((N_STYLES, 512), k, np.float32),
                  run_id="run-b", processed_at=later) for k, r in enumerate(first[3:])]
    write_outputs(ray_dataset(retry, n_blocks=1), str(out), "run-b", n_styles=N_STYLES)

    # APPEND left the first run's files untouched
    assert {p: p.read_bytes() for p in out.glob("part-run-a-*.parquet")} == run_a_files
    assert list(out.glob("part-run-b-*.parquet"))
    assert pq.read_table(out).num_rows == 7  # raw files hold both rows of the retried images
    t = so.read_outputs(str(out))
    assert t.num_rows == 5 and set(t["status"].to_pylist()) == {"ok"}
    ids, w = so.read_latents(str(out))
    assert len(ids) == len(set(ids)) == 5
    np.testing.assert_array_equal(w[ids.index(so.image_id_for(first[4]["source_uri"]))], 1.0)


def test_block_with_wrong_shape_fails_the_write(ray_cluster, tmp_path):
    """A block from another model (n_styles 18) must fail the write, not land beside n_styles 8."""
    import ray

    from pipelines.sink import write_outputs

    good = so.rows_to_table(make_rows(2, 0), N_STYLES)
    bad = so.rows_to_table([{"source_uri": "x", "status": "ok", "run_id": "r",
                             "w_plus": np.zeros((18, 512), np.float32)}], 18)
    ds = ray.data.from_arrow([good, bad])
    with pytest.raises(Exception, match="(?i)cast|fixed_size_list|size"):
        write_outputs(ds, str(tmp_path / "out"), "run-x", n_styles=N_STYLES)


def test_run_id_must_be_file_name_safe(tmp_path):
    from pipelines.sink import OutputFilenameProvider, make_run_id

    with pytest.raises(ValueError, match="run_id"):
        OutputFilenameProvider("2026/11/26 run.1")
    rid = make_run_id()
    name = OutputFilenameProvider(rid).get_filename_for_task("abc123", 7)
    assert name == f"part-{rid}-abc123-000007-{{i}}.parquet"


def test_s3_write_read_success_and_inspect(ray_cluster, s3_server, tmp_path):
    import s3fs

    from jobs.inspect import inspect_output
    from pipelines.sink import existing_image_ids, read_success, write_outputs, write_success

    bucket = s3_server.make_bucket("sink")
    uri = f"s3://{bucket}/faces/out"
    opts = s3_server.storage_options
    rows = make_rows(n_ok=4, n_err=1)
    write_outputs(ray_dataset(rows, n_blocks=2), uri, "run-s3", n_styles=N_STYLES, storage_options=opts)
    summary = {
        "run_id": "run-s3",
        "counts": {"ok": 4, "decode_error": 1},
        "timings_s": {"decode": 0.5, "align": 1.25, "invert": 3.0},
        "checkpoint_sha256": "ab" * 32,
        "started": T0,
        "finished": T0 + dt.timedelta(seconds=9),
    }
    written = write_success(uri, summary, storage_options=opts)

    fs = s3fs.S3FileSystem(**opts)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{bucket}/faces/out"))
    assert "_SUCCESS.json" in names and any(n.startswith("part-run-s3-") for n in names)
    assert fs.exists(f"{bucket}/faces/out/_runs/run-s3.json")
    success = read_success(uri, storage_options=opts)
    assert success == written
    assert success["counts"] == {"ok": 4, "decode_error": 1}
    assert success["started"] == "2026-11-01T12:00:00+00:00"
    assert set(success["versions"]) >= {"psp-pipeline", "torch", "ray", "pyarrow"}
    assert success["versions"]["pyarrow"] == pa.__version__

    ids, w = so.read_latents(uri, storage_options=opts)
    ok = {so.image_id_for(r["source_uri"]): r["w_plus"] for r in rows if r["status"] == "ok"}
    assert sorted(ids) == sorted(ok)
    for image_id, latent in zip(ids, w):
        np.testing.assert_array_equal(latent, ok[image_id])
    assert len(existing_image_ids(uri, storage_options=opts)) == 5

    report = inspect_output(uri, storage_options=opts, n_rows=2)
    assert "schema version: 1" in report and f"n_styles: {N_STYLES}" in report
    assert re.search(r"ok\s+4", report) and re.search(r"decode_error\s+1", report)
    assert "output_image" in report and "read_outputs(" in report
    assert '"run_id": "run-s3"' in report
    assert report.count("|w_plus|=") == 2


def test_inspect_local_reports_reruns_and_missing_success(tmp_path):
    from jobs.inspect import inspect_output

    out = tmp_path / "out"
    out.mkdir()
    rows = make_rows(n_ok=2, n_err=1)
    pq.write_table(so.rows_to_table(rows, N_STYLES), out / "part-a.parquet")
    rerun = [dict(rows[0], run_id="run-b", processed_at=T0 + dt.timedelta(hours=1))]
    pq.write_table(so.rows_to_table(rerun, N_STYLES), out / "part-b.parquet")
    report = inspect_output(str(out), n_rows=5)
    assert "rows: 3 images (1 older rows superseded by reruns)" in report
    assert "_SUCCESS.json: absent" in report
    norm = float(np.linalg.norm(rows[1]["w_plus"]))
    assert f"|w_plus|={norm:.3f}" in report
    assert "cannot identify image file bad0.jpg" in report


def test_relative_local_output_lands_under_the_callers_cwd(ray_cluster, tmp_path, monkeypatch):
    """`psp invert --output out/`: Ray workers run elsewhere, the files must still land here."""
    from pipelines.sink import write_outputs

    monkeypatch.chdir(tmp_path)
    write_outputs(ray_dataset(make_rows(2, 1), n_blocks=1), "rel/out", "run-rel", n_styles=N_STYLES)
    assert so.read_outputs(str(tmp_path / "rel" / "out")).num_rows == 3
