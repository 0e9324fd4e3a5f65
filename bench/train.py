"""Training throughput of `psp train` on Ray Train: steps/s and samples/s, per worker, for 1 and 2
workers (CPU, small resolution) or on GPUs at 256 and 1024 outputs.

    python bench/train.py                                   # CPU: 1 and 2 workers, output 32
    python bench/train.py --device cuda --sizes 256 1024 --workers 1 --batch-size 8 --steps 20

Each configuration is one real `run_train` on a private local Ray cluster (random weights in the
official formats, synthetic 256x256 images, the losses L2 + LPIPS, the GradualStyleEncoder unless
--encoder says otherwise). Times come from the run's own metrics (`time_s` of each step's record):
the first steps (start-up, warm-up, the step-0 validation and checkpoint) are left out, so what is
printed is the steady training rate. samples/s = steps/s x global batch; per worker = / workers.
The 2-worker / 1-worker ratio is printed for the same per-worker batch (weak scaling: ideal 2.0
samples/s, 1.0 steps/s). On a 2-core machine the 2 workers share the cores: expect no speed-up
there; the number that matters is on a machine with a core (or a GPU) per worker.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _images(folder: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")


def one_run(work: Path, size: int, workers: int, batch: int, steps: int, device: str, encoder: str,
            cpus_per_worker: float) -> dict:
    from pipelines.train import TrainConfig, run_train
    from psp_core.training.testing import random_training_weights

    weights = random_training_weights(work / f"weights{size}", output_size=size,
                                      which=("stylegan", "alexnet", "lpips", "ir_se50"))
    run_dir = work / f"run-{size}-{workers}"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = TrainConfig(
        data=str(work / "images"), run_dir=str(run_dir), output_size=size, encoder_type=encoder,
        start_from_latent_avg=True, batch_size=batch, workers=workers, max_steps=steps, board_interval=1,
        image_interval=10**9, val_interval=10**9, save_interval=10**9, val_samples=1, device=device,
        cpus_per_worker=cpus_per_worker, max_failures=0, stylegan_weights=weights.stylegan,
        alexnet_weights=weights.alexnet, lpips_weights=weights.lpips, ir_se50_weights=weights.ir_se50,
    )
    started = time.perf_counter()
    run_train(config)
    wall = time.perf_counter() - started
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    train = {r["step"]: r["time_s"] for r in records if r["split"] == "train"}
    first = min(2, steps - 1)  # steps 0..1: warm-up, step-0 validation and checkpoint
    timed = steps - first
    seconds = train[steps] - train[first]
    shutil.rmtree(run_dir, ignore_errors=True)
    steps_s = timed / seconds
    return {"size": size, "workers": workers, "batch_per_worker": batch, "steps_timed": timed,
            "steps_per_s": steps_s, "samples_per_s": steps_s * batch * workers,
            "samples_per_s_per_worker": steps_s * batch, "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="output sizes (default: 32 CPU, 256 1024 GPU)")
    p.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts (default 1 2 CPU, 1 GPU)")
    p.add_argument("--batch-size", type=int, default=None, help="per worker (default 1 CPU, 8 GPU)")
    p.add_argument("--steps", type=int, default=None, help="last step (default 4 CPU, 20 GPU)")
    p.add_argument("--encoder", default="GradualStyleEncoder")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    args = p.parse_args()
    gpu = args.device == "cuda"
    sizes = args.sizes or ([256, 1024] if gpu else [32])
    workers = args.workers or ([1] if gpu else [1, 2])
    batch = args.batch_size or (8 if gpu else 1)
    steps = args.steps or (20 if gpu else 4)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(address="local", num_cpus=max(4, int(max(workers) * (args.cpus_per_worker + 1))), include_dashboard=False,
             log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="psp-bench-train-"))
    try:
        _images(work / "images", 32)
        results = []
        for size in sizes:
            for n in workers:
                r = one_run(work, size, n, batch, steps, args.device, args.encoder, args.cpus_per_worker)
                results.append(r)
                print(f"output {size:>4}  workers {n}  batch/worker {batch}:  {r['steps_per_s']:.3f} steps/s  "
                      f"{r['samples_per_s']:.3f} samples/s  ({r['samples_per_s_per_worker']:.3f} per worker; "
                      f"{r['steps_timed']} steps timed, run {r['wall_s']:.0f} s)", flush=True)
        for size in sizes:
            by = {r["workers"]: r for r in results if r["size"] == size}
            if 1 in by and 2 in by:
                print(f"output {size}: 2 workers / 1 worker = {by[2]['samples_per_s'] / by[1]['samples_per_s']:.2f}x "
                      f"samples/s, {by[2]['steps_per_s'] / by[1]['steps_per_s']:.2f}x steps/s")
        print(json.dumps(results))
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
