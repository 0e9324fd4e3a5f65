"""Whole-table analysis in bounded memory (`pipelines.scan`, `pipelines.report.ReportStats`): folding
shards and merging gives what one pass gives, in Ray tasks as on the caller, and the report's PCA
axes are those of every row."""
from __future__ import annotations

import datetime as _dt

import numpy as np
import pyarrow.compute as pc
import pytest
from output_tables import commit_table

import schemas
from pipelines.report import _LIGHT as LIGHT
from pipelines.report import RANK_METRICS, ReportStats

N_STYLES = 4
T0 = _dt.datetime(2026, 11, 1, 12, 0, tzinfo=_dt.timezone.utc)


def _rows(start: int, n: int, rng) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        if i % 7 == 3:
            uri = f"s3://b/raw/bad{i}.png"
            rows.append(dict(source_uri=uri, status="decode_error" if i % 2 else "no_face",
                             error=f"{uri}: cannot identify image file at 0x7f{i:x}", run_id=f"run-{i % 3}",
                             processed_at=T0 + _dt.timedelta(seconds=i)))
            continue
        rows.append(dict(
            source_uri=f"s3://b/raw/face{i}.jpg", status="ok", task="ffhq_encode" if i % 5 else "ffhq_frontalize",
            face_score=float(rng.uniform(0, 3)), mse=float(rng.uniform(0, 0.1)), psnr=float(rng.uniform(15, 35)),
            ssim=None if i % 4 == 0 else float(rng.uniform(0.3, 1)), identity_distance=float(rng.uniform(0, 1)),
            w_plus=(rng.standard_normal((N_STYLES, 512)) + (i % 5 == 0)).astype(np.float32),
            checkpoint_sha256="cd" * 32, run_id=f"run-{i % 3}", processed_at=T0 + _dt.timedelta(seconds=i)))
    return rows


def _summary(stats: ReportStats) -> dict:
    mean, axes, ratio = stats.pca()
    return {
        "n": stats.n, "counts": dict(stats.counts), "runs": stats.run_history(), "errors": stats.error_groups(),
        "sample": [r["image_id"] for r in stats.sample.items()],
        "extremes": {m: [[r["image_id"] for r in k.items()] for k in stats.extremes[m]] for m in RANK_METRICS},
        "hist": {c: (stats.hist_n[c], h.items()) for c, h in stats.hist.items()},
        "pca": (np.round(mean, 6).tolist(), np.round(axes, 6).tolist(), np.round(ratio, 6).tolist()),
        "points": [p[0].tolist() for p in stats.w_points.items()],
    }


@pytest.fixture(scope="module")
def table():
    rng = np.random.default_rng(0)
    return schemas.rows_to_table(_rows(0, 90, rng), N_STYLES)


def test_shards_merged_equal_one_pass(table):
    """However the rows are cut into batches and shards, the merged aggregate is the same: counts,
    runs, error groups, the seeded sample, the worst/best rows, the histogram samples, the PCA."""
    def fold(cuts: list[int]) -> ReportStats:
        total = ReportStats(sample=5, n_extreme=3, seed=7)
        for lo, hi in zip([0, *cuts], [*cuts, table.num_rows]):
            part = ReportStats(sample=5, n_extreme=3, seed=7)
            for batch in table.slice(lo, hi - lo).to_batches(max_chunksize=11):
                part.add(batch, f"file-{lo}")
            total.merge(part)
        return total

    one = _summary(fold([]))
    assert one == _summary(fold([30, 31, 64]))
    assert one["counts"] == {"ok": 77, "decode_error": 7, "no_face": 6}
    assert len(one["sample"]) == 5 and len(one["extremes"]["mse"][0]) == 3
    # the seed chooses the sample; the same seed, the same rows
    assert _summary(fold([45]))["sample"] == one["sample"]


def test_pca_axes_are_those_of_every_row(table, monkeypatch):
    """The axes and explained variance come from the exact sums over every ok row (the scatter
    only samples), equal to an SVD of all rows' W+ means."""
    monkeypatch.setattr("pipelines.report.PCA_SAMPLE", 10)
    stats = ReportStats()
    for batch in table.to_batches():
        stats.add(batch)
    ok = table.filter(pc.equal(table["status"], "ok"))
    w = schemas.w_plus_to_numpy(ok).mean(axis=1, dtype=np.float64)
    x = w - w.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    mean, axes, ratio = stats.pca()
    assert len(stats.w_points) == 10 and stats.w_n == ok.num_rows
    np.testing.assert_allclose(mean, w.mean(axis=0), atol=1e-9)
    for k in range(2):
        np.testing.assert_allclose(np.abs(axes[k] @ vt[k]), 1.0, atol=1e-6)
    np.testing.assert_allclose(ratio, (s[:2] ** 2) / (s ** 2).sum(), atol=1e-9)


def test_scan_in_ray_tasks_equals_the_callers_scan(ray_cluster, tmp_path, monkeypatch):
    """A table of several data files folded in Ray tasks (shards of 2 files) gives what the
    caller's own streaming scan gives; `read_rows` fetches shown rows from their files only."""
    from pipelines import scan

    rng = np.random.default_rng(1)
    out = tmp_path / "out"
    for k in range(5):  # five commits, five data files
        commit_table(out, schemas.rows_to_table(_rows(20 * k, 20, rng), N_STYLES), N_STYLES, run_id=f"r{k}")
    files = scan.table_files(str(out))
    assert len(files.paths) == 5
    monkeypatch.setattr(scan, "SHARD_FILES", 2)
    columns = list(LIGHT)

    def make():
        return ReportStats(sample=4, n_extreme=2, seed=3)

    local = scan.scan_table(files, columns, make, use_ray=False)
    remote = scan.scan_table(files, columns, make, use_ray=True)
    assert _summary(local) == _summary(remote) and local.n == 100
    shown = local.sample.items()
    wanted: dict[str, set] = {}
    for r in shown:
        wanted.setdefault(r["file"], set()).add(r["image_id"])
    rows = scan.read_rows(files, wanted, ["source_uri", "status"])
    assert sorted(rows["image_id"].to_pylist()) == sorted(r["image_id"] for r in shown)
    assert set(rows["status"].to_pylist()) == {"ok"}


def test_psp_edit_reads_the_first_ok_latents_file_by_file(tmp_path):
    """`psp edit --limit N` plans the first N ok rows in file order from a scan of the status
    column; the Ray stage `read_files` then reads exactly those rows (W+ included) from the files."""
    import pyarrow as pa

    from pipelines.edit import LATENT_COLUMNS, _latent_files, _ok, latent_plan
    from pipelines.scan import read_files

    rng = np.random.default_rng(2)
    out = tmp_path / "out"
    for k in range(3):
        commit_table(out, schemas.rows_to_table(_rows(10 * k, 10, rng), N_STYLES), N_STYLES, run_id=f"r{k}")
    files, n_styles = _latent_files(str(out), None)
    assert n_styles == N_STYLES
    everything = schemas.read_outputs(str(out), columns=["image_id", "status", "w_plus"])
    ok = everything.filter(pc.equal(everything["status"], "ok"))
    plan = latent_plan(files, 12)
    assert [p["path"] for p in plan] == list(files.paths[:len(plan)])
    got = read_files({"path": np.array([p["path"] for p in plan]), "limit": np.array([p["limit"] for p in plan])},
                     files, LATENT_COLUMNS, _ok())
    assert got.num_rows == 12 and got["image_id"].to_pylist() == ok["image_id"].to_pylist()[:12]
    np.testing.assert_array_equal(schemas.w_plus_to_numpy(got), schemas.w_plus_to_numpy(ok.slice(0, 12)))
    whole = latent_plan(files, None)
    assert all(p["limit"] == -1 for p in whole) and len(whole) == 3
    assert isinstance(got, pa.Table)
