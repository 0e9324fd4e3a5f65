"""Nightly at scale: the bookkeeping path (list -> diff -> adopt -> collect -> manifest -> commit)
at 10k and 100k inputs, with a small batch of new images through the tiny model.

    python bench/scale.py                      # 10k and 100k inputs, 8 new images each
    python bench/scale.py --sizes 1000 10000 --new 8

What it measures, honestly: on this CPU-only machine the model inverts ~1 image/s, so 100k images
cannot go through it. Each size N is set up as a nightly output whose committed manifest already
holds N - NEW inputs (one synthetic output file, rows with the real listing's ETag/size/mtime), plus
NEW fresh image files. Then one real `run_nightly` runs in a fresh process: it lists all N files,
diffs them against the N - NEW manifest rows, sends the NEW images through the real Ray pipeline
and the tiny model, and commits an N-row manifest. Printed per size: phase times, bookkeeping
rows/s (N over the time outside the model stage), the memory the driver holds for the listing,
manifest and plan (RSS growth while they are alive), the driver's peak RSS, and the ratios between
sizes. The data plane runs in Ray workers and sees only the NEW rows; the driver's bookkeeping is
O(N) (one manifest row and one listing entry per input).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _png(seed: int, size: int = 24) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def setup(workdir: Path, n: int, new: int, checkpoint: str) -> None:
    """N - NEW inputs already committed (synthetic output file), NEW inputs not yet seen."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.nightly import checkpoint_sha256
    from pipelines.sources import list_inputs
    from schemas import manifest as mf

    inp, out = workdir / "in", workdir / "out"
    inp.mkdir(parents=True)
    blob = _png(0)
    for i in range(n - new):  # 1000 files per folder, as object stores are often laid out
        folder = inp / f"part-{i // 1000:04d}"
        folder.mkdir(exist_ok=True)
        (folder / f"img_{i:07d}.png").write_bytes(blob)
    items = list_inputs(str(inp))
    uris = [it.source_uri for it in items]
    run_id = "seed-run"
    rel = f"runs/{run_id}/part-0.parquet"
    os.makedirs(out / "runs" / run_id)
    ids = [mf.image_id_for(u) for u in uris]
    pq.write_table(
        pa.table({"image_id": ids, "source_uri": uris, "status": ["ok"] * len(uris),
                  "run_id": [run_id] * len(uris)}),
        out / rel,
    )
    sha = checkpoint_sha256(checkpoint)
    entries = mf.make_entries(
        {"image_id": i, "source_uri": it.source_uri, "etag": it.etag, "size": it.size,
         "mtime": it.mtime, "checkpoint_sha256": sha, "schema_version": 1, "run_id": run_id,
         "status": "ok", "output_file": rel}
        for i, it in zip(ids, items)
    )
    mf.commit_manifest(str(out), entries, run_id, expected=None)
    fresh = inp / "new"
    fresh.mkdir()
    for j in range(new):
        (fresh / f"new_{j:04d}.png").write_bytes(_png(1000 + j, size=40))


def measure(workdir: Path, checkpoint: str) -> dict:
    """One real nightly run over the prepared folder; returns its timings and peak RSS."""
    from jobs.nightly import run_nightly
    from pipelines.config import InvertConfig

    config = InvertConfig(
        input=str(workdir / "in"), output=str(workdir / "out"), checkpoint=checkpoint,
        align="none", device="cpu", batch_size=4, align_actors=1, images="none", cpu_threads=1,
        progress=False,
    )
    # What the driver holds for N inputs during a run: the listing, the manifest and the plan.
    import gc

    from jobs.nightly import as_listed, plan_nightly
    from pipelines.sources import list_inputs
    from schemas import manifest as mf

    warm = mf.read_manifest(config.output)  # import and first-use costs, not per-input memory
    list_inputs(str(Path(config.input) / "new"))
    plan_nightly([], mf.empty_manifest(), "0" * 64)
    del warm
    gc.collect()
    rss0 = _rss_mb()
    listing = [as_listed(it) for it in list_inputs(config.input)]
    manifest, _ = mf.read_manifest(config.output)
    plan = plan_nightly(listing, manifest, "0" * 64)
    gc.collect()
    held_mb = _rss_mb() - rss0
    del listing, manifest, plan
    gc.collect()

    t0 = time.perf_counter()
    result = run_nightly(config)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"wall_s": wall, "peak_rss_mb": peak_mb, "held_mb": held_mb, **result.to_dict()}


def _rss_mb() -> float:
    """Current resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--new", type=int, default=8, help="new images that go through the model")
    ap.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_checkpoint", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args._measure:  # child process: one measured run, JSON on the last line
        print(json.dumps(measure(Path(args._measure), args._checkpoint)))
        return

    from psp_core.testing import random_checkpoint

    rows = []
    with tempfile.TemporaryDirectory(prefix="psp-scale-") as tmp:
        checkpoint = str(random_checkpoint(os.path.join(tmp, "tiny.pt"), output_size=32, seed=0))
        for n in args.sizes:
            workdir = Path(tmp) / f"n{n}"
            t = time.perf_counter()
            setup(workdir, n, args.new, checkpoint)
            setup_s = time.perf_counter() - t
            proc = subprocess.run(
                [sys.executable, __file__, "--_measure", str(workdir), "--_checkpoint", checkpoint],
                capture_output=True, text=True, cwd=str(ROOT),
            )
            if proc.returncode:
                sys.exit(f"measured run for N={n} failed:\n{proc.stderr[-4000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            t = r["timings"]
            bookkeeping = r["wall_s"] - t.get("process_s", 0.0)
            rows.append((n, r, bookkeeping))
            print(
                f"N={n:>7}: setup {setup_s:6.1f}s | nightly wall {r['wall_s']:6.1f}s = list "
                f"{t['list_s']:.2f} + plan {t['plan_s']:.2f} + adopt {t.get('adopt_s', 0):.2f} + model "
                f"{t.get('process_s', 0):.1f} ({r['processed']} new rows) + collect "
                f"{t.get('collect_s', 0):.2f} + commit {t.get('commit_s', 0):.2f} | bookkeeping "
                f"{n / bookkeeping:,.0f} rows/s | listing+manifest+plan held {r['held_mb']:.1f} MB | "
                f"driver peak RSS {r['peak_rss_mb']:.0f} MB | "
                f"plan {r['plan']['new']} new / {r['plan']['unchanged']} unchanged, live {r['live']}",
                flush=True,
            )
            shutil_rm(workdir)
    if len(rows) >= 2:
        (n0, r0, b0), (n1, r1, b1) = rows[0], rows[-1]
        print(
            f"ratio N={n1}/N={n0}: rows x{n1 / n0:.0f}, bookkeeping time x{b1 / b0:.2f}, "
            f"driver peak RSS x{r1['peak_rss_mb'] / r0['peak_rss_mb']:.2f}, bookkeeping memory "
            f"{(r1['held_mb'] - r0['held_mb']) * 1024 / (n1 - n0):.2f} KB per extra input"
        )


def shutil_rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
