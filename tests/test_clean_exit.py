"""Every command that reads an output table exits 0, every time (no SIGABRT at interpreter exit).

Arrow's scan finishes tearing down on its own threads after `to_table` returns; with deltalake's
default Python filesystem that teardown needs the GIL, and when the interpreter is already
finalizing the process aborts ("terminate called without an active exception", exit 134) in some
fraction of runs. The readers go through a native Arrow filesystem (`schemas.arrow_filesystem`).
Each reader runs 10 times in fresh processes (concurrently, to keep the suite's budget) and all
10 must exit 0. `psp edit` / `psp nightly` read through the same `read_outputs` but start Ray:
they are covered by tests/test_edit_pipeline.py and tests/test_nightly.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from output_tables import commit_table

import schemas
from schemas.testing import example_rows

REPEATS = 10
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exit") / "out"
    for k in range(2):  # two data files
        commit_table(folder, schemas.rows_to_table(example_rows(3, 1, 8, seed=k, prefix=f"p{k}"), 8), 8,
                     run_id=f"run-{k}")
    return str(folder)


def _readers(out: str, tmp: str) -> dict[str, list[str]]:
    labels = os.path.join(tmp, "labels.parquet")
    t = schemas.read_outputs(out, columns=["image_id", "status"])
    ok = [i for i, s in zip(t["image_id"].to_pylist(), t["status"].to_pylist()) if s == "ok"]
    pq.write_table(pa.table({"image_id": ok, "smiling": [i % 2 == 0 for i in range(len(ok))]}), labels)
    py = [sys.executable, "-c"]
    # the README's "Reading the output" snippets, as written there (Ray's read_delta aside)
    readme = textwrap.dedent(f"""
        import schemas
        ids, w = schemas.read_latents({out!r})
        table = schemas.read_outputs({out!r}, columns=["image_id", "status", "w_plus"])
        old = schemas.read_outputs({out!r}, as_of=2)
        runs = schemas.read_runs({out!r})
        from deltalake import DeltaTable
        dt = DeltaTable({out!r})
        df = dt.to_pandas(columns=["image_id", "status", "w_plus"], filesystem=schemas.arrow_filesystem({out!r}))
        faces = schemas.open_dataset({out!r})
        import duckdb
        duckdb.sql("SELECT status, count(*) FROM faces GROUP BY status").fetchall()
        assert len(df) == table.num_rows == 8 and w.shape == (6, 8, 512)
    """)
    psp = [sys.executable, "-m", "jobs"]
    return {
        "inspect": [*psp, "inspect", out],
        "readme": [*py, readme],
        "report": [*psp, "report", out, "--html", os.path.join(tmp, "r{i}.html")],
        "direction": [*psp, "direction", out, "--labels", labels, "--label", "smiling",
                      "-o", os.path.join(tmp, "d{i}.npy"), "--method", "mean_difference"],  # reads as the default
        "vacuum": [*psp, "vacuum", out, "--dry-run"],
    }


@pytest.mark.tier2
def test_every_table_reader_exits_0_ten_times_out_of_ten(table_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}

    def run(job):
        name, i, cmd = job
        p = subprocess.run([c.replace("{i}", str(i)) for c in cmd], env=env, capture_output=True, text=True,
                           timeout=300)
        return name, p.returncode, p.stderr[-400:]

    jobs = [(name, i, cmd) for name, cmd in _readers(table_dir, str(tmp_path)).items() for i in range(REPEATS)]
    with ThreadPoolExecutor(max_workers=REPEATS) as pool:
        results = list(pool.map(run, jobs))
    bad = [(name, rc, err) for name, rc, err in results if rc != 0]
    assert not bad, bad
