"""What a local Ray cluster and a running Ray Data pipeline cost the CPUs while they do no work:
the part of a run's CPU that grows with its wall time, not with its rows.

    sudo python bench/ray_background.py            # root: each case in its own cgroup
    sudo python bench/ray_background.py --seconds 60

Each case runs in a fresh process with its own local Ray (as `psp invert` starts it:
`pipelines.dataflow.ensure_ray`), all its processes in one cgroup (bench/cpu_per_face.py's):

- idle: the cluster up, nothing running;
- pipeline: a Ray Data pipeline of one actor pool whose actor sleeps 1 s per block (Ray Data's
  executor loop, stats and autoscaling actors, the raylet and GCS busy with a pipeline that
  computes nothing).

Each case runs for SECONDS and for 3 x SECONDS: the rate is (cpu(3S) - cpu(S)) / (wall(3S) -
wall(S)), so everything a run pays once -- the cluster's start-up and shutdown, and the pipeline's
own start-up (its actors' processes and imports, a few CPU-s) -- cancels, as it cancels in
bench/cpu_per_face.py's N vs 3N. Printed: each case's CPU and wall seconds, the idle cluster's and
the running pipeline's rate (every process: the cores a run pays per second of its wall time), and
what the pipeline adds to the idle cluster. bench/cpu_per_face.py's marginal CPU per face includes
the pipeline's rate times the wall time a face adds to a run: large on a 2-core machine (one align
actor, ≈ 30 faces/s) and small on a GPU node moving a thousand faces a second.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = r"""
import sys, time
from pipelines.dataflow import ensure_ray
import ray, ray.data
mode, seconds = sys.argv[1], int(sys.argv[2])
ensure_ray()
ray.data.DataContext.get_current().enable_progress_bars = False
t0 = time.perf_counter()
if mode == "idle":
    time.sleep(seconds)
else:
    class Sleep:
        def __call__(self, batch):
            time.sleep(1.0)
            return batch
    ds = ray.data.range(seconds, override_num_blocks=seconds).map_batches(
        Sleep, batch_size=None, compute=ray.data.ActorPoolStrategy(size=1))
    for _ in ds.iter_batches(batch_size=None):
        pass
print(f"{time.perf_counter() - t0:.2f}")
"""


def run_case(mode: str, seconds: int) -> tuple[float, float]:
    """(CPU seconds of every process of the case, seconds of the case itself)."""
    from bench.cpu_per_face import child_env, run_counted

    cpu, _, stdout = run_counted([sys.executable, "-c", CHILD, mode, str(seconds)], child_env(),
                                 f"psp_ray_bg_{os.getpid()}_{mode}")
    return cpu, float(stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=30, help="the short case's length S (the long one: 3S)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    print(f"load: {os.getloadavg()[0]:.1f}")
    rates: dict[str, list[float]] = {"idle": [], "pipeline": []}
    for _ in range(args.repeats):
        for mode in rates:
            (cpu1, s1), (cpu3, s3) = run_case(mode, args.seconds), run_case(mode, 3 * args.seconds)
            rates[mode].append((cpu3 - cpu1) / (s3 - s1))  # start-up and shutdown cancel
            print(f"  {mode:<8} {s1:.0f} s: {cpu1:.1f} CPU-s, {s3:.0f} s: {cpu3:.1f} CPU-s -> "
                  f"{rates[mode][-1]:.3f} cores", flush=True)
    idle, pipe = statistics.median(rates["idle"]), statistics.median(rates["pipeline"])
    print(f"median: idle cluster {idle:.3f} cores, a running pipeline {pipe:.3f} cores in all "
          f"({pipe - idle:.3f} beyond the idle cluster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
