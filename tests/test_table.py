"""The output table's writer and commit protocol: Ray write tasks write a run's files through the
run sink (a public Ray Datasink), the driver commits once (locally and on S3 over HTTP via moto); two runs at once
never both commit an input; a crashed run is invisible, its rows are adopted by the next run and
`psp vacuum` deletes its files; readers (schemas, Ray `read_delta`, `psp inspect`) see one row
per input."""
from __future__ import annotations

import datetime
import json
import os

import numpy as np
import pyarrow as pa
import pytest

import schemas
from schemas import outputs as so
from schemas.testing import EXAMPLE_TIME as T0
from schemas.testing import example_rows

N_STYLES = 8


def make_rows(n_ok: int = 4, n_err: int = 2, seed: int = 0, run_id: str = "run-a", prefix="img"):
    return example_rows(n_ok, n_err, N_STYLES, seed=seed, run_id=run_id, processed_at=T0, prefix=prefix)


def stage(table, run_id, rows, name="part-0.parquet"):
    """What a run's write tasks leave behind: one data file under runs/<run_id>/, uncommitted."""
    from pipelines.writer import WrittenRun

    data = so.rows_to_table(rows, N_STYLES)
    written = WrittenRun(run_id)
    written.extend([table.write_file(f"runs/{run_id}/{name}", data)], data["image_id"], data["status"])
    return written


def current(out, storage_options=None):
    t = schemas.read_outputs(str(out), storage_options, columns=["image_id", "source_uri", "run_id", "status"])
    ids = t["image_id"].to_pylist()
    assert len(ids) == len(set(ids)), "an input has two rows in the current version"
    return {r["source_uri"]: r["run_id"] for r in t.to_pylist()}


# -- the commit protocol (no Ray) ---------------------------------------------------------------

@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_runs_at_once_never_both_commit_an_input(where, tmp_path, request):
    from pipelines.commit import commit_run
    from pipelines.table import ConcurrentRunError, OutputTable

    so_opts = None
    if where == "s3":
        s3 = request.getfixturevalue("s3_server")
        out, so_opts = f"s3://{s3.make_bucket('race')}/out", s3.storage_options
    else:
        out = str(tmp_path / "out")
    table = OutputTable(out, so_opts)
    v = table.ensure(N_STYLES).version()
    base = make_rows(4, 0, run_id="run-0")
    first = commit_run(table, stage(table, "run-0", base), N_STYLES, {"run_id": "run-0"}, v)

    # Runs A, B and C all plan against the same version; A and B both redo input 2.
    v = first.version
    a = stage(table, "run-a", [dict(base[2], run_id="run-a")])
    b = stage(table, "run-b", [dict(base[2], run_id="run-b"), dict(base[3], run_id="run-b")])
    c = stage(table, "run-c", [dict(base[1], run_id="run-c")])
    assert commit_run(table, a, N_STYLES, {"run_id": "run-a"}, v).version == v + 1
    with pytest.raises(ConcurrentRunError, match=r"run run-b did not commit: run\(s\) run-a committed 1 of its inputs.*rerun"):
        commit_run(table, b, N_STYLES, {"run_id": "run-b"}, v)
    # C touches nothing A did: it re-checks and commits after A.
    assert commit_run(table, c, N_STYLES, {"run_id": "run-c"}, v).version == v + 2
    seen = current(out, so_opts)
    uri = [r["source_uri"] for r in base]
    assert seen == {uri[0]: "run-0", uri[1]: "run-c", uri[2]: "run-a", uri[3]: "run-0"}


def test_crashed_run_is_invisible_adopted_by_the_next_and_vacuumed(tmp_path, capsys):
    from jobs.cli import main
    from pipelines.adoption import adoptable_rows, wanted_facts
    from pipelines.commit import commit_run
    from pipelines.listing import items_table
    from pipelines.table import OutputTable

    out = str(tmp_path / "out")
    table = OutputTable(out)
    dt = table.ensure(N_STYLES)
    rows = make_rows(4, 0, run_id="crashed")
    for r in rows:  # the listing facts the crashed run stamped on its rows
        r.update(source_size=100, source_etag="e1")
    stage(table, "crashed", rows[:2], "part-0.parquet")  # finished file, whole
    stage(table, "crashed", rows[2:], "part-1.parquet")  # rows[3]'s input changes before the rerun
    with open(f"{out}/runs/crashed/part-2.parquet", "wb") as f:
        f.write(b"PAR1 torn")  # the file being written when the driver died
    assert schemas.read_outputs(out).num_rows == 0  # invisible

    class Item:  # the rerun's listing
        def __init__(self, uri, etag):
            self.source_uri, self.size, self.etag, self.mtime = uri, 100, etag, None

    wanted = wanted_facts(items_table([Item(r["source_uri"], "e2" if i == 3 else "e1") for i, r in enumerate(rows)]))
    adopted = adoptable_rows(table, dt, wanted, "ab" * 32, retry_failed=False, exclude_run="rerun")
    assert sorted(adopted.ids.to_pylist()) == sorted(so.image_id_for(r["source_uri"]) for r in rows[:3])
    paths = sorted(a.path for a in adopted.adds)
    assert paths[0] == "runs/crashed/part-0.parquet" and paths[1].startswith("runs/rerun/adopted-")
    assert adoptable_rows(table, dt, wanted, "cd" * 32, False, "rerun").ids.to_pylist() == []  # other model
    adopted.run_id = "rerun"
    commit_run(table, adopted, N_STYLES, {"run_id": "rerun"}, dt.version())
    assert current(out) == {r["source_uri"]: "crashed" for r in rows[:3]}

    # vacuum: the crashed run's other files go, every file the table needs stays
    assert main(["vacuum", out, "--retention-hours", "0", "--no-compact"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(report["deleted"]) == ["runs/crashed/part-1.parquet", "runs/crashed/part-2.parquet"]
    assert current(out) == {r["source_uri"]: "crashed" for r in rows[:3]}
    assert os.path.exists(f"{out}/runs/crashed/part-0.parquet")


def test_vacuum_compacts_small_files_and_keeps_history_within_retention(tmp_path):
    from pipelines.commit import commit_run
    from pipelines.table import OutputTable, vacuum

    out = str(tmp_path / "out")
    table = OutputTable(out)
    for k in range(3):
        v = table.ensure(N_STYLES).version()
        commit_run(table, stage(table, f"run-{k}", make_rows(2, 1, seed=k, prefix=f"p{k}")),
                   N_STYLES, {"run_id": f"run-{k}"}, v)
    before = table.load().version()
    result = vacuum(out)  # default retention: 7 days
    assert result.compacted["numFilesRemoved"] == 3 and result.compacted["numFilesAdded"] == 1
    assert result.deleted_files == []  # young files stay: time travel still works
    assert schemas.read_outputs(out, as_of=before - 1).num_rows == 6
    assert len(table.load().file_uris()) == 1 and schemas.read_outputs(out).num_rows == 9


def test_output_of_another_model_or_kind_is_refused_before_any_work(tmp_path):
    from deltalake import DeltaTable, write_deltalake

    from pipelines.table import TABLE_NAME, OutputTable, TableMismatchError

    OutputTable(str(tmp_path / "a")).ensure(N_STYLES)
    with pytest.raises(TableMismatchError, match="n_styles=8; this checkpoint has n_styles=18"):
        OutputTable(str(tmp_path / "a")).ensure(18)
    write_deltalake(str(tmp_path / "b"), pa.table({"x": [1]}))
    with pytest.raises(TableMismatchError, match="psp.schema_version=None"):
        OutputTable(str(tmp_path / "b")).ensure(N_STYLES)
    # a first run that died between creating the table and setting its properties
    DeltaTable.create(str(tmp_path / "c"), so.output_schema(N_STYLES), name=TABLE_NAME)
    dt = OutputTable(str(tmp_path / "c")).ensure(N_STYLES)
    assert dt.metadata().configuration["psp.n_styles"] == str(N_STYLES)


# -- the Ray Delta sink -------------------------------------------------------------------------

pytest_slow = pytest.mark.slow


def ray_dataset(rows: list[dict], n_blocks: int):
    """A Ray Dataset whose last stage returns `rows_to_table` batches, as the pipeline's does."""
    import ray

    def to_table(batch: pa.Table) -> pa.Table:
        picked = [rows[i] for i in batch["id"].to_pylist()]
        return so.rows_to_table(picked, N_STYLES)

    ds = ray.data.range(len(rows), override_num_blocks=n_blocks)
    return ds.map_batches(to_table, batch_format="pyarrow", batch_size=None)


@pytest_slow
def test_ray_sink_writes_one_commit_read_back_by_ray_and_without(ray_cluster, tmp_path):
    import ray

    from pipelines.commit import commit_run
    from pipelines.table import OutputTable
    from pipelines.writer import write_run

    rows = make_rows(n_ok=6, n_err=2)
    out = str(tmp_path / "out")
    table = OutputTable(out)
    v = table.ensure(N_STYLES).version()
    for i, r in enumerate(rows):  # the listing facts the read stage hands on with each row
        r.update(source_size=1000 + i, source_etag=f"etag{i}",
                 source_mtime=datetime.datetime.fromtimestamp(1.7e9 + i / 8, datetime.UTC))
    written = write_run(ray_dataset(rows, n_blocks=3), table, "run-a", N_STYLES)
    # the driver gets add actions and status counts, not a value per row
    assert written.counts() == {"decode_error": 2, "ok": 6} and written.adds and len(written.ids) == 0
    assert all(a.path.startswith("runs/run-a/") for a in written.adds)
    assert schemas.read_outputs(out).num_rows == 0  # written, not committed: invisible
    result = commit_run(table, written, N_STYLES, {"run_id": "run-a"}, v)
    assert result.version == v + 1 and result.added == 8

    t = schemas.read_outputs(out)
    by_uri = {r["source_uri"]: r for r in t.to_pylist()}
    for i, r in enumerate(rows):  # listing facts recorded as the rows carried them
        got = by_uri[r["source_uri"]]
        assert (got["source_size"], got["source_etag"]) == (1000 + i, f"etag{i}")
        assert got["source_mtime"].timestamp() == pytest.approx(1.7e9 + i / 8, abs=1e-6)
    ids, w = schemas.read_latents(out)
    want = {so.image_id_for(r["source_uri"]): r["w_plus"] for r in rows if r["status"] == "ok"}
    assert w.shape == (6, N_STYLES, 512)
    for image_id, latent in zip(ids, w):
        np.testing.assert_array_equal(latent, want[image_id])

    # Ray read_delta, for downstream pipelines
    ds = ray.data.read_delta(out, columns=["image_id", "status", "w_plus"])
    got = ds.filter(lambda r: r["status"] == "ok").take_all()
    assert len(got) == 6
    np.testing.assert_array_equal(np.asarray(got[0]["w_plus"], np.float32).reshape(N_STYLES, 512),
                                  want[got[0]["image_id"]])


@pytest_slow
def test_run_files_are_single_row_groups_with_key_statistics_and_each_commit_checkpoints(ray_cluster, tmp_path):
    """The run sink's data files: one Parquet row group each, no more rows than the file target
    (give or take one block), Delta statistics on image_id / source_id / status only; the commit
    is followed by a Delta checkpoint; every row is there once."""
    import pyarrow.parquet as pq

    from pipelines.commit import commit_run
    from pipelines.table import OutputTable
    from pipelines.writer import FILE_TARGET_BYTES, write_run

    rows = make_rows(n_ok=10, n_err=2)
    out = tmp_path / "out"
    table = OutputTable(str(out))
    v = table.ensure(N_STYLES).version()
    # rows "as big as" a third of the byte target: three rows per file
    written = write_run(ray_dataset(rows, n_blocks=4), table, "run-f", N_STYLES, row_bytes=FILE_TARGET_BYTES // 3)
    assert written.counts() == {"decode_error": 2, "ok": 10} and len(written.adds) >= 2
    for add in written.adds:
        meta = pq.read_metadata(out / add.path)
        assert meta.num_row_groups == 1 and 1 <= meta.num_rows <= 6
        stats = json.loads(add.stats)
        assert stats["numRecords"] == meta.num_rows
        assert set(stats["minValues"]) == set(stats["maxValues"]) == {"image_id", "source_id", "status"}
        assert add.size == (out / add.path).stat().st_size
    assert sum(json.loads(a.stats)["numRecords"] for a in written.adds) == 12
    result = commit_run(table, written, N_STYLES, {"run_id": "run-f"}, v)
    assert json.loads((out / "_delta_log" / "_last_checkpoint").read_text())["version"] == result.version
    assert set(current(out)) == {r["source_uri"] for r in rows}


@pytest_slow
def test_block_of_another_model_fails_the_write(ray_cluster, tmp_path):
    """A block from another model (n_styles 18) must fail the write, not land beside n_styles 8."""
    import ray

    from pipelines.table import OutputTable
    from pipelines.writer import write_run

    good = so.rows_to_table(make_rows(2, 0), N_STYLES)
    bad = so.rows_to_table([{"source_uri": "x", "status": "ok", "run_id": "r",
                             "w_plus": np.zeros((18, 512), np.float32)}], 18)
    with pytest.raises(Exception, match="w_plus has 9216 values, expected 4096"):
        write_run(ray.data.from_arrow([good, bad]), OutputTable(str(tmp_path / "out")), "run-x", N_STYLES)


@pytest_slow
def test_s3_write_commit_summary_and_inspect(ray_cluster, s3_server, capsys):
    from jobs.cli import main
    from jobs.inspect import inspect_output
    from pipelines.commit import commit_run, write_run_summary
    from pipelines.table import OutputTable
    from pipelines.writer import write_run

    bucket = s3_server.make_bucket("sink")
    uri = f"s3://{bucket}/faces/out"
    opts = s3_server.storage_options
    rows = make_rows(n_ok=4, n_err=1)
    table = OutputTable(uri, opts)
    v = table.ensure(N_STYLES).version()
    written = write_run(ray_dataset(rows, n_blocks=2), table, "run-s3", N_STYLES)
    summary = {"run_id": "run-s3", "kind": "invert", "processed": 5, "counts": written.counts()}
    result = commit_run(table, written, N_STYLES, summary, v)
    doc = write_run_summary(table, summary, result.version)
    assert doc["table"] == {"version": result.version, "rows": 5, "counts": {"decode_error": 1, "ok": 4}}

    fs = s3_server.filesystem()
    assert json.loads(fs.cat(f"{bucket}/faces/out/_runs/run-s3.json"))["counts"] == {"decode_error": 1, "ok": 4}
    runs = schemas.read_runs(uri, opts)
    assert [(r["run_id"], r["version"], r["counts"]) for r in runs] == [("run-s3", result.version, {"decode_error": 1, "ok": 4})]
    ids, w = schemas.read_latents(uri, opts)
    ok = {so.image_id_for(r["source_uri"]): r["w_plus"] for r in rows if r["status"] == "ok"}
    assert sorted(ids) == sorted(ok)
    for image_id, latent in zip(ids, w):
        np.testing.assert_array_equal(latent, ok[image_id])

    report = inspect_output(uri, storage_options=opts, n_rows=2)
    assert f"schema version: {so.SCHEMA_VERSION}" in report and f"n_styles: {N_STYLES}" in report
    assert "rows: 5 inputs" in report and "ok: 4/5" in report
    assert "run-s3" in report and '"ok": 4' in report
    assert report.count("|w_plus|=") == 2
    assert main(["inspect", uri, "--storage-options", json.dumps(opts), "--as-of", str(v)]) == 0
    assert "rows: 0 inputs" in capsys.readouterr().out


@pytest_slow
def test_relative_local_output_lands_under_the_callers_cwd(ray_cluster, tmp_path, monkeypatch):
    """`psp invert ... out/`: Ray workers run elsewhere, the files must still land here."""
    from pipelines.commit import commit_run
    from pipelines.table import OutputTable
    from pipelines.writer import write_run

    monkeypatch.chdir(tmp_path)
    table = OutputTable("rel/out")
    v = table.ensure(N_STYLES).version()
    commit_run(table, write_run(ray_dataset(make_rows(2, 1), n_blocks=1), table, "run-rel", N_STYLES),
               N_STYLES, {"run_id": "run-rel"}, v)
    assert schemas.read_outputs(str(tmp_path / "rel" / "out")).num_rows == 3


@pytest_slow
def test_nightly_commit_replaces_rows_spread_over_files_in_ray_tasks(ray_cluster, tmp_path):
    """A nightly-style commit over a table of four files, joined and rewritten in Ray tasks (four
    partitions): the re-processed inputs' old rows and the deleted inputs' rows go, each touched
    file that keeps rows is re-added as a rewritten copy under the run's folder, a file left empty
    is only removed, a row Ray wrote twice is committed once; nothing else is lost or doubled. A
    run that planned before it clashes only on the inputs it committed, not on rows it moved."""
    from pipelines.commit import commit_run
    from pipelines.table import ConcurrentRunError, OutputTable

    out = tmp_path / "out"
    table = OutputTable(str(out))
    v = table.ensure(N_STYLES).version()
    old = []
    for k in range(4):
        rows = make_rows(5, 0, seed=k, run_id=f"run-{k}", prefix=f"p{k}")
        v = commit_run(table, stage(table, f"run-{k}", rows), N_STYLES, {"run_id": f"run-{k}"}, v).version
        old.append(rows)
    planned = v
    # Re-process input 0 of files 0-2 and inputs 0-1 of file 3; delete input 1 of file 0 and
    # inputs 2-4 of file 3 (file 3 is left empty). Ray wrote the row of p2/0 twice.
    redo = [dict(old[0][0]), dict(old[1][0]), dict(old[2][0]), dict(old[3][0]), dict(old[3][1])]
    for r in redo:
        r["run_id"] = "night"
    night = stage(table, "night", redo[:3], name="part-0.parquet")
    night.merge(stage(table, "night", [redo[2], *redo[3:]], name="part-1.parquet"))
    gone = [so.image_id_for(r["source_uri"]) for r in (old[0][1], *old[3][2:])]
    res = commit_run(table, night, N_STYLES, {"run_id": "night"}, planned, gone, use_ray=True, partition_rows=8)
    assert (res.version, res.added, res.removed, res.rewritten_files) == (planned + 1, 5, 9, 3)

    seen = current(out)  # one row per input
    want = {r["source_uri"]: r["run_id"] for rows in old for r in rows}
    want.update({r["source_uri"]: "night" for r in redo})
    for r in (old[0][1], *old[3][2:]):
        del want[r["source_uri"]]
    assert seen == want and len(seen) == 20 - 4
    files = sorted(table.files(table.load()))
    assert sum(p.startswith("runs/night/rewrite-") for p in files) == 3
    assert sum(p.startswith("runs/night/dedup-") for p in files) == 1
    assert not any(p.startswith(("runs/run-0/", "runs/run-1/", "runs/run-2/", "runs/run-3/")) for p in files)
    w = {r["image_id"]: r["w_plus"] for r in schemas.read_outputs(str(out), columns=["image_id", "w_plus"]).to_pylist()}
    for r in [*old[1][1:], *redo]:  # rewritten and new rows as they were written
        np.testing.assert_array_equal(np.asarray(w[so.image_id_for(r["source_uri"])], np.float32).ravel(),
                                      r["w_plus"].ravel())

    # Runs that planned before the nightly commit: one redoes an input it committed (clash), the
    # other one whose row it only moved into a rewritten copy (no clash: committed after it).
    with pytest.raises(ConcurrentRunError, match="run\\(s\\) night committed 1 of its inputs"):
        commit_run(table, stage(table, "late-a", [dict(old[1][0], run_id="late-a")]), N_STYLES,
                   {"run_id": "late-a"}, planned, use_ray=True, partition_rows=8)
    late = commit_run(table, stage(table, "late-b", [dict(old[1][3], run_id="late-b")]), N_STYLES,
                      {"run_id": "late-b"}, planned, use_ray=True, partition_rows=8)
    assert (late.version, late.removed) == (planned + 2, 1)
    assert current(out)[old[1][3]["source_uri"]] == "late-b" and len(current(out)) == 16


def test_a_rewrite_drops_exactly_the_given_rows_and_keeps_the_order():
    """The commit's rewrite keeps a touched file's other rows as slices of it: the same rows, in
    the same order, as a filter would give, for drops at the ends, in runs, repeated or all."""
    import pyarrow.compute as pc

    from pipelines.replace import without_rows

    rows = pa.table({"i": np.arange(50), "w": pa.array([[float(k)] * 3 for k in range(50)])})
    rng = np.random.default_rng(0)
    cases = [[], [0], [49], [0, 49], list(range(50)), [7, 7, 8], *[rng.choice(50, k) for k in (1, 5, 20, 45)]]
    for drop in cases:
        drop = np.asarray(drop, dtype=np.int64)
        expected = rows.filter(pc.invert(pc.is_in(pa.array(np.arange(50)), value_set=pa.array(drop))))
        got = without_rows(rows, drop)
        assert got.equals(expected), drop.tolist()
