"""What a local Ray cluster and a running Ray Data pipeline cost the CPUs while they do no work:
the part of a run's CPU that grows with its wall time, not with its rows.

    sudo python bench/ray_background.py            # root: each case in its own cgroup
    sudo python bench/ray_background.py --seconds 60

Each case runs in a fresh process with its own local Ray (as `psp invert` starts it:
`pipelines.dataflow.ensure_ray`), all its processes in one cgroup (bench/cpu_per_face.py's):

- idle: the cluster up, nothing running, for SECONDS;
- pipeline: a Ray Data pipeline of one actor pool whose actor sleeps 1 s per block, SECONDS
  blocks (Ray Data's executor loop, stats and autoscaling actors, the raylet and GCS busy with a
  pipeline that computes nothing).

Printed: CPU seconds and wall seconds of each case, and the pipeline's CPU per wall second beyond
the idle cluster's (start-up and shutdown cancel: both cases pay them). bench/cpu_per_face.py's
marginal CPU per face includes this rate times the wall time a face adds to a run, which is large
on a 2-core machine (tens of ms per face) and small on a GPU node moving a thousand faces a second.
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
    ap.add_argument("--seconds", type=int, default=40, help="how long each case runs (default 40)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    print(f"load: {os.getloadavg()[0]:.1f}")
    rates = []
    for _ in range(args.repeats):
        idle_cpu, idle_s = run_case("idle", args.seconds)
        pipe_cpu, pipe_s = run_case("pipeline", args.seconds)
        rates.append((pipe_cpu - idle_cpu) / pipe_s)  # the same start-up and shutdown cancel
        print(f"  idle cluster {idle_s:.0f} s: {idle_cpu:.1f} CPU-s in all; pipeline {pipe_s:.0f} s: {pipe_cpu:.1f} CPU-s "
              f"-> {rates[-1]:.3f} CPU-s per wall second of a pipeline beyond the idle cluster", flush=True)
    print(f"median: {statistics.median(rates):.3f} cores while a pipeline runs (beyond the idle cluster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
