"""A run at scale, end to end: the real `psp invert`, then `psp nightly` with 1 % changed and 1 % new
inputs, at N inputs (small generated PNGs, the model stubbed to zero time, `--align none --images
none`, so the data plane and the bookkeeping are what is measured).

    python bench/scale.py                          # N = 10k and 100k
    python bench/scale.py --sizes 10000 30000 --no-nightly

Each command runs as its own process (`python -m jobs ...`, a fresh local Ray cluster). Printed per
N and command: wall time per phase (list / plan / process / commit, from the run summary or the
nightly result), rows/s end to end (start-up included) and over the pipeline phase, the driver's peak
RSS (`wait4` rusage of the command's process: the driver only, not Ray's workers), the head node's
object-store use (peak growth of /dev/shm while the command runs: Ray's plasma store lives there, so
this is every object of the run, a bound on the pipeline's in-flight blocks), the number of the
table's data files and the size of the run's commit (its `_delta_log` JSON). Then, from the two
largest sizes, the slopes per input and what they project for 100 M inputs.

Inputs: 64 px random PNGs (about 12 KB each), 1,000 per folder (`part-NNNN/`), so the listing fans out
over prefixes as an object store's would. `--reuse`: the runs detect faces (`--align dlib`; none in
noise, so every row is a stored `no_face`), and a nightly with another checkpoint and
`--reprocess-on-model-change` redoes every input from its stored alignment (the plan's join with
the stored rows, `pipelines.diff.attach_stored_alignment`). The model: `psp_core.zero_time` (no weights, constant W+).
Timings on a shared 2-core machine are noisy: compare the sizes of one run of this script.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PER_FOLDER = 1000
FLAGS = ["--align", "none", "--images", "none", "--device", "cpu"]
#: --reuse: detection on (dlib finds no face in the 64 px noise: `no_face` rows, stored and reusable)
REUSE_FLAGS = ["--align", "dlib", "--images", "none", "--device", "cpu"]


def make_inputs(folder: Path, start: int, n: int, seed: int = 0) -> None:
    """Inputs start..start+n-1 as 64 px PNGs with distinct bytes, 1,000 per sub-folder."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed + start)
    base = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for i in range(start, start + n):
        part = folder / f"part-{i // PER_FOLDER:04d}"
        part.mkdir(parents=True, exist_ok=True)
        pixels = base.copy()
        pixels[0, 0] = (i % 256, i // 256 % 256, (i // 65536 + seed) % 256)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
        (part / f"img_{i:08d}.png").write_bytes(buf.getvalue())


def change_inputs(folder: Path, n: int, every: int) -> int:
    """Rewrite every `every`-th input with other bytes (a changed input); returns how many."""
    changed = 0
    for i in range(0, n, every):
        p = folder / f"part-{i // PER_FOLDER:04d}" / f"img_{i:08d}.png"
        data = bytearray(p.read_bytes())
        data[-13] ^= 0xFF  # inside the last chunk's CRC: other bytes, other size not needed
        p.write_bytes(bytes(data) + b"\0")  # and another size, so any listing fact sees it
        changed += 1
    return changed


def _shm_used() -> int:
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def run_measured(cmd: list[str]) -> dict:
    """Run `cmd`; its wall time, the driver's peak RSS (MB), peak /dev/shm growth (MB), stdout."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    base, peak, stop = _shm_used(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _shm_used() - base)
            stop.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    # GNU time's %M: the peak RSS of the driver process itself (Ray's workers are not its children)
    proc = subprocess.run(["/usr/bin/time", "-f", "PSP_MAXRSS_KB=%M", *cmd], env=env, cwd=str(ROOT),
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    out, err = proc.stdout, proc.stderr
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-4000:]}")
    rss_mb = int(err.rsplit("PSP_MAXRSS_KB=", 1)[1].split()[0]) / 1024
    return {"wall_s": wall, "rss_mb": rss_mb, "shm_mb": peak[0] / 2**20, "stdout": out}


def table_facts(out: Path) -> dict:
    from deltalake import DeltaTable

    dt = DeltaTable(str(out))
    log = sorted((out / "_delta_log").glob("*.json"))
    return {"files": len(dt.file_uris()), "commit_kb": log[-1].stat().st_size / 1024, "version": dt.version()}


def last_run(out: Path) -> dict:
    """The last run's summary (``OUTPUT/_runs/<run_id>.json``)."""
    runs = sorted((out / "_runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(runs[-1].read_text())


def other_checkpoint(checkpoint: str, path: Path) -> str:
    """The zero-time stand-in again with other bytes (another checkpoint_sha256: a "new model")."""
    import torch

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    ckpt["opts"]["bench_variant"] = 2
    torch.save(ckpt, path)
    return str(path)


def measure(n: int, tmp: Path, checkpoint: str, nightly: bool, reuse: bool = False) -> list[dict]:
    inp, out = tmp / f"in{n}", tmp / f"out{n}"
    t = time.perf_counter()
    make_inputs(inp, 0, n)
    print(f"N={n}: made {n} inputs in {time.perf_counter() - t:.0f}s", flush=True)
    rows = []
    flags = REUSE_FLAGS if reuse else FLAGS
    r = run_measured([sys.executable, "-m", "jobs", "invert", str(inp), str(out), "--checkpoint", checkpoint,
                      "--no-progress", *flags])
    doc = last_run(out)
    phases = doc.get("phases", {})
    head = next((ln for ln in r["stdout"].splitlines() if ln.startswith("run ")), "")  # "... (list_s .., commit_s ..)"
    if "commit_s" in head:
        phases = {k: float(v) for k, v in (part.split() for part in head.rsplit("(", 1)[1].rstrip(")").split(", "))}
    rows.append({"n": n, "cmd": "invert", "processed": doc["processed"], **r, **table_facts(out),
                 "phases": phases})
    if reuse:  # every input again with a new model: each aligned from its stored alignment
        r = run_measured([sys.executable, "-m", "jobs", "nightly", str(inp), str(out), "--checkpoint",
                          other_checkpoint(checkpoint, tmp / "zero_time_v2.pt"), "--reprocess-on-model-change",
                          *flags])
        res = json.loads(r["stdout"][r["stdout"].rindex('{\n  "run_id"'):])
        t = res["timings"]
        doc = last_run(out)
        reused = doc.get("stages", {}).get("align_reused", {}).get("rows", 0)
        phases = {"list_s": t.get("list_s", 0), "plan_s": t.get("plan_s", 0),
                  "process_s": t.get("adopt_s", 0) + t.get("process_s", 0), "commit_s": t.get("commit_s", 0)}
        rows.append({"n": n, "cmd": f"nightly, new model ({reused} reused)", "processed": res["processed"], **r,
                     **table_facts(out), "phases": phases})
    if nightly:
        k = max(1, n // 100)
        changed = change_inputs(inp, n, 100)
        make_inputs(inp, n, k, seed=1)
        r = run_measured([sys.executable, "-m", "jobs", "nightly", str(inp), str(out), "--checkpoint", checkpoint,
                          *flags])
        res = json.loads(r["stdout"][r["stdout"].rindex('{\n  "run_id"'):])
        t = res["timings"]
        phases = {"list_s": t.get("list_s", 0), "plan_s": t.get("plan_s", 0),
                  "process_s": t.get("adopt_s", 0) + t.get("process_s", 0), "commit_s": t.get("commit_s", 0)}
        rows.append({"n": n, "cmd": f"nightly ({changed} changed + {k} new)", "processed": res["processed"], **r,
                     **table_facts(out), "phases": phases})
    shutil.rmtree(inp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return rows


def report(rows: list[dict]) -> None:
    print(f"\n{'N':>8} {'command':<30} {'wall s':>7} {'list':>6} {'plan':>6} {'process':>8} {'commit':>7} "
          f"{'rows/s':>7} {'proc rows/s':>11} {'driver RSS MB':>13} {'obj store MB':>12} {'files':>6} {'commit KB':>9}")
    for r in rows:
        p = r["phases"]
        proc = r["processed"] / p["process_s"] if p.get("process_s") else 0.0
        print(f"{r['n']:>8} {r['cmd']:<30} {r['wall_s']:>7.1f} {p.get('list_s', 0):>6.1f} {p.get('plan_s', 0):>6.1f} "
              f"{p.get('process_s', 0):>8.1f} {p.get('commit_s', 0):>7.1f} {r['processed'] / r['wall_s']:>7.0f} "
              f"{proc:>11.0f} {r['rss_mb']:>13.0f} {r['shm_mb']:>12.0f} {r['files']:>6} {r['commit_kb']:>9.1f}")
    inv = [r for r in rows if r["cmd"] == "invert"]
    if len(inv) >= 2:
        a, b = inv[-2], inv[-1]
        dn = b["n"] - a["n"]
        rss = (b["rss_mb"] - a["rss_mb"]) * 2**20 / dn
        commit = (b["commit_kb"] - a["commit_kb"]) * 1024 / dn
        print(f"\nslopes N={a['n']} -> {b['n']}: driver peak RSS {rss:+.0f} B/input "
              f"(x{b['rss_mb'] / a['rss_mb']:.2f} for x{b['n'] / a['n']:.0f} inputs), commit {commit:+.2f} B/input, "
              f"table files {b['files']} vs {a['files']}")
        print(f"projected at 100 M inputs: driver peak RSS ~ {b['rss_mb'] + rss * (1e8 - b['n']) / 2**20:,.0f} MB, "
              f"commit ~ {(b['commit_kb'] * 1024 + commit * (1e8 - b['n'])) / 2**20:,.1f} MB "
              "(linear in the measured slopes; the fixed part is Ray, torch and imports)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--no-nightly", action="store_true", help="only the full invert runs")
    ap.add_argument("--tmp", default=None, help="work folder (default: a temporary one; needs ~13 KB per input)")
    ap.add_argument("--reuse", action="store_true",
                    help="--align dlib, then a nightly with another checkpoint and --reprocess-on-model-change "
                         "(every input aligned from its stored alignment) before the 1 %% nightly")
    args = ap.parse_args()
    from psp_core.zero_time import write_zero_time_checkpoint

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="psp-scale-", dir=args.tmp) as tmp_s:
        tmp = Path(tmp_s)
        checkpoint = write_zero_time_checkpoint(tmp / "zero_time.pt", output_size=1024)
        for n in args.sizes:
            rows += measure(n, tmp, checkpoint, not args.no_nightly, args.reuse)
            report(rows)
    print("\ncommand: python bench/scale.py --sizes " + " ".join(map(str, args.sizes))
          + (" --no-nightly" if args.no_nightly else "") + (" --reuse" if args.reuse else ""))


if __name__ == "__main__":
    main()
