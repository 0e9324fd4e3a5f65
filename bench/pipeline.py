"""Images/s through `run_invert` (Ray Data, local cluster) vs a bare in-process loop, same images,
same model, one run; plus peak RSS (bare: this process; pipeline: driver + Ray daemons + workers).

    python bench/pipeline.py [--images 32] [--output-size 64] [--batch-size 8] [--align-actors 2] [--repeats 1]

The bare loop does what one process would do without Ray: read -> decode -> align (dlib) ->
transform -> encode -> decode -> PNG, batching the model calls like the pipeline. On CPU the model
is the bottleneck, so the pipeline should reach >= 0.9 of the bare loop; it overlaps alignment with
inversion, which the bare loop cannot. Printed numbers are medians of one run on a noisy machine:
quote the ratio.
"""
from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _descendant_rss(root: int) -> int:
    """Summed RSS (bytes) of `root` and its descendants, from /proc (Linux; no psutil needed)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/statm") as f:
                resident = int(f.read().split()[1])
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry)] = int(fields[1])
        rss[int(entry)] = resident * page
    total, todo = 0, [root]
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


class RssSampler:
    """Peak summed RSS of this process and all its descendants, sampled every `interval` s."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        return _descendant_rss(os.getpid())

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def make_inputs(folder: Path, n: int) -> list[Path]:
    """`n` astronaut-derived face images (the demo's variants, cycled under distinct names)."""
    from jobs.demo import sample_files

    variants = [(name, blob) for name, blob, status in sample_files(24) if status == "ok"]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        name, blob = variants[i % len(variants)]
        p = folder / f"{i:04d}_{name}"
        p.write_bytes(blob)
        paths.append(p)
    return paths


def bare_loop(paths: list[Path], checkpoint: str, batch_size: int) -> int:
    """The same work in one process, no Ray; returns the number of images inverted."""
    import torch
    from PIL import Image

    from psp_core import load_psp
    from psp_core.align import FaceAligner, load_image
    from psp_core.tasks import get_task, tensor2im

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_psp(checkpoint)
    aligner = FaceAligner(output_size=256)
    task = get_task("ffhq_encode")
    done = 0

    def flush(batch):
        nonlocal done
        if not batch:
            return
        with torch.inference_mode():
            w = model.encode(torch.stack(batch))
            images = model.decode(w)
        for img in images:
            buf = io.BytesIO()
            Image.fromarray(tensor2im(img)).save(buf, format="PNG", compress_level=1)
        done += len(batch)

    pending = []
    for p in paths:
        result = aligner(load_image(p.read_bytes(), name=str(p)))
        if result.status != "ok":
            continue
        pending.append(task.transform(result.image))
        if len(pending) == batch_size:
            flush(pending)
            pending = []
    flush(pending)
    return done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--output-size", type=int, default=64, help="generator size of the random checkpoint")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--align-actors", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="alternating bare/pipeline rounds (medians)")
    args = ap.parse_args()

    from pipelines.config import InvertConfig
    from pipelines.dataflow import ensure_ray
    from pipelines.run import run_invert
    from psp_core.testing import random_checkpoint

    work = Path(tempfile.mkdtemp(prefix="psp_bench_"))
    try:
        paths = make_inputs(work / "in", args.images)
        ckpt = random_checkpoint(str(work / "bench.pt"), output_size=args.output_size, seed=0)
        print(f"bench/pipeline: {args.images} images, random pSp {args.output_size}px, batch {args.batch_size}, "
              f"{os.cpu_count()} cores")

        ensure_ray()  # started before timing: a cluster is up already in real use
        bare_ips, ray_ips, bare_peak, ray_peak = [], [], 0, 0
        for rep in range(args.repeats):  # alternate, so drifting machine load hits both alike
            # No sampler thread here: it would share this process (and its GIL) with the bare loop.
            t0 = time.perf_counter()
            n_bare = bare_loop(paths, ckpt, args.batch_size)
            bare_ips.append(n_bare / (time.perf_counter() - t0))
            bare_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
            with RssSampler(interval=1.0) as rss:
                t0 = time.perf_counter()
                summary = run_invert(InvertConfig(
                    input=str(work / "in"), output=str(work / f"out{rep}"), checkpoint=ckpt,
                    batch_size=args.batch_size, align_actors=args.align_actors, progress=False,
                ))
                ray_ips.append(summary.counts.get("ok", 0) / (time.perf_counter() - t0))
            ray_peak = max(ray_peak, rss.peak)
            print(f"  repeat {rep + 1}: bare {bare_ips[-1]:.3f} img/s, run_invert {ray_ips[-1]:.3f} img/s")

        print(summary.format())
        b, r = statistics.median(bare_ips), statistics.median(ray_ips)
        print(f"bare loop : {b:6.3f} img/s (median of {len(bare_ips)}), peak RSS {bare_peak / 2**20:6.0f} MiB "
              "(this process)")
        print(f"run_invert: {r:6.3f} img/s (median of {len(ray_ips)}), peak RSS {ray_peak / 2**20:6.0f} MiB "
              "(driver + Ray daemons + workers)")
        print(f"ratio pipeline/bare = {r / b:.2f} (target >= 0.9 on CPU)")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
