"""Can one model actor feed a GPU? Host work per image in the model actor, and the CPU-pool cost of
the stages moved out of it, per output setting -- no GPU needed.

    python bench/gpu_feed.py            # batch 32, 5 timed batches per setting
    python bench/gpu_feed.py --quick    # 2 timed batches, skips nothing

Method (DESIGN.md, Performance): the model's outputs are precomputed tensors of the right shapes
(W+ [B,n_styles,512], images [B,3,H,W] in about [-1,1]), so what is timed is everything the actor
does around the model. `time.process_time` over one thread (torch and BLAS limited to 1) counts the
process's CPU time per image. Reported per setting:

  model actor, host   the new `pipelines.model.InvertFaces` per batch, minus the tensor ops below
                      (target <= 0.5 ms/img: a ceiling >= 2,000 img/s per GPU)
  tensor ops          uint8 -> float model input, images -> uint8 (tensor2im) and the failed-row
                      scatter: on a GPU these run on the device; here they run on this CPU
  ray block           turning the actor's output dict into a Ray block (in the actor process,
                      outside the stage callable; zero-copy for tensor columns)
  prepare (align)     `Task.prepare` per image, now in the align actors (a 256 crop: a copy)
  outputs pool        `pipelines.outputs.EncodeOutputs` per image (PNG/JPEG, metrics, identity, table)
  identity            of which the `--metrics` identity distance (two dlib face descriptors) alone
  old actor           the same batch through the pre-split invert actor's per-row host path
                      (PIL transform, numpy tensor2im, codec, metrics, table): today's ceiling

Then the PNG encoders of `pipelines.outputs.encode_png` (fpng, Pillow zlib level 1) and Pillow's
default level, per image at 256² and 1024², on random content and on a photo (scikit-image's
astronaut, resized), each checked to decode to exactly its pixels.

Random-content images (compress worse than faces); ratios from one run are what to compare.

    python bench/gpu_feed.py --pipeline 512   # the model actor inside a real `psp invert` run

With --pipeline N: N generated 256 px PNGs through the real `psp invert` (its own local Ray, the
zero-time model of `psp_core.zero_time`, `--align none --device cpu`, 256² PNG outputs). The model
actor reports, per batch, its whole call (stage `invert`) and the part inside the model call
(`invert_device`: copies to and from the device, the task's tensor transform, the model: what a
GPU runs); the difference is the actor's host-side block handling per image, measured inside a
pipeline run (target <= 0.5 ms/img).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from pipelines.model import InvertFaces, ModelOptions  # noqa: E402
from pipelines.outputs import EncodeOutputs, encode_image, encode_png  # noqa: E402
from pipelines.read import object_column  # noqa: E402
from psp_core.tasks import get_task, tensor2im  # noqa: E402

SETTINGS = {  # name -> (output size, images, image_size, metrics, mix)
    "256 png (default)": (1024, "png", "256", False, 0),
    "1024 png (--image-size full)": (1024, "png", "full", False, 0),
    "1024 jpeg": (1024, "jpeg", "full", False, 0),
    "256 png --metrics": (1024, "png", "256", True, 0),
    "--images none": (1024, "none", "256", False, 0),
    "256 png --mix 2": (1024, "png", "256", False, 2),
}


class PrecomputedPSP:
    """Stands in for a loaded PSP: encode/decode/face_pool/mix return precomputed tensors of the
    right shapes. `mix` keeps the real host-side part (per-row seeded z on the CPU)."""

    def __init__(self, output_size: int, batch: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.output_size = output_size
        self.n_styles = int(np.log2(output_size)) * 2 - 2
        self.checkpoint_sha256 = "0" * 64
        self.device = torch.device("cpu")
        self.w_plus = torch.randn(batch, self.n_styles, 512, generator=gen)
        self.full = torch.rand(batch, 3, output_size, output_size, generator=gen) * 2.2 - 1.1
        self.small = torch.rand(batch, 3, 256, 256, generator=gen) * 2.2 - 1.1
        self._mixes: dict = {}

    def encode(self, x):
        return self.w_plus[: len(x)]

    def decode(self, w_plus, resize=True, randomize_noise=False):
        b = len(w_plus)
        src = self.small if resize else self.full
        if b > len(src):  # mixes: B*N images, made once (on the first, untimed call)
            key = (b, resize)
            if key not in self._mixes:
                self._mixes[key] = src.repeat(-(-b // len(src)), 1, 1, 1)[:b].clone()
            return self._mixes[key]
        return src[:b]

    def face_pool(self, images):
        return self.small[: len(images)]

    def mix(self, x, n_outputs, latent_mask, mix_alpha=None, seed=0, resize=True, randomize_noise=False, *, w_plus=None):
        batch = len(w_plus)
        z = torch.stack(
            [torch.randn(n_outputs, 512, generator=torch.Generator().manual_seed(s)) for s in seed]
        )  # the host work the real mix does
        del z
        images = self.decode(self.w_plus.new_empty(batch * n_outputs, 0), resize=resize)
        mixed = w_plus.unsqueeze(1).expand(-1, n_outputs, -1, -1)  # the real one is device work
        return images.reshape(batch, n_outputs, *images.shape[1:]), mixed


def model_batch(batch: int, metrics: bool, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """What the align actors hand the model actor: B ok rows with random crops."""
    crops = rng.integers(0, 256, size=(batch, 256, 256, 3), dtype=np.uint8)
    out = {
        "source_uri": object_column([f"s3://bench/raw/{i:06d}.jpg" for i in range(batch)]),
        "source_sha256": object_column(["ab" * 32] * batch),
        "source_width": np.full(batch, 1024, np.int64),
        "source_height": np.full(batch, 1024, np.int64),
        "status": object_column(["ok"] * batch),
        "error": object_column([None] * batch),
        "face_score": np.ones(batch, np.float32),
        "landmarks": rng.random((batch, 68, 2), dtype=np.float32) * 1024,
        "quad": rng.random((batch, 4, 2), dtype=np.float32) * 1024,
        "model_input": crops,
    }
    if metrics:
        out["aligned"] = crops.copy()
    return out


def cpu_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median process CPU seconds of fn() over `repeats` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return statistics.median(times)


def old_style(actor: InvertFaces, outputs: EncodeOutputs, batch: dict, task) -> object:
    """The pre-split invert actor's host path for one batch, the model's outputs precomputed:
    per-row PIL transform and stack, float outputs to numpy, per-row numpy tensor2im + codec +
    metrics, the table."""
    from PIL import Image

    from schemas.ids import image_id_for, row_seed

    crops = batch["model_input"]
    x = torch.stack([task.transform(Image.fromarray(c, "RGB")) for c in crops])
    model = actor.model
    with torch.inference_mode():
        w = model.encode(x)
        images = model.decode(w, resize=not actor.full_size)
        r = {"w_plus": w.float().cpu().numpy(), "images": images.float().cpu().numpy()}
        if actor.metrics:
            r["images256"] = (model.face_pool(images) if actor.full_size else images).float().cpu().numpy()
        if actor.mix:
            seeds = [row_seed(0, image_id_for(str(u))) for u in batch["source_uri"]]
            mi, mw = model.mix(None, actor.mix, [8], seed=seeds, resize=not actor.full_size, w_plus=w)
            r["mix_images"], r["mix_w_plus"] = mi.float().cpu().numpy(), mw.float().cpu().numpy()
    fmt = actor.images
    rows = []
    for i in range(len(crops)):
        row = {"w_plus": r["w_plus"][i]}
        if fmt != "none":
            row["output_image"] = encode_image(tensor2im(r["images"][i]), fmt)
        if actor.mix:
            row["mix_images"] = None if fmt == "none" else [encode_image(tensor2im(m), fmt) for m in r["mix_images"][i]]
        if actor.metrics:
            from psp_core import metrics

            recon = tensor2im(r["images256"][i])
            row["mse"] = metrics.mse(crops[i], recon)
            row["psnr"] = metrics.psnr(crops[i], recon)
            row["ssim"] = metrics.ssim(crops[i], recon)
            row["identity_distance"] = outputs._identity_distance(crops[i], recon)
        rows.append(row)
    # the table, as the outputs stage builds it today (same columns)
    fake = dict(batch, w_plus=r["w_plus"], checkpoint_sha256=object_column(["0" * 64] * len(crops)))
    fake.pop("model_input")
    keep_metrics, keep_images = outputs.metrics, outputs.images
    outputs.metrics, outputs.images = False, "none"
    try:
        outputs(fake)
    finally:
        outputs.metrics, outputs.images = keep_metrics, keep_images
    return rows


class TensorClock:
    """Counts the process CPU time spent inside the device-side tensor functions the model actor
    calls (`Task.to_model_input`, `images_to_uint8`), measured in the same call as the total."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            t = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.process_time() - t

        return timed


class _TimedTask:
    """A Task whose to_model_input is timed (Task itself is frozen)."""

    def __init__(self, task, clock: TensorClock):
        self._task = task
        self.to_model_input = clock.wrap(task.to_model_input)

    def __getattr__(self, name):
        return getattr(self._task, name)


def actor_seconds(actor: InvertFaces, batch: dict, repeats: int) -> tuple[float, float]:
    """Median (host seconds, tensor-op seconds) of one actor call on `batch`."""
    import psp_core.tasks as tasks

    clock = TensorClock()
    original_task, original_fn = actor.task, tasks.images_to_uint8
    actor.task, tasks.images_to_uint8 = _TimedTask(original_task, clock), clock.wrap(original_fn)
    try:
        actor(batch)
        hosts, tensors = [], []
        for _ in range(repeats):
            clock.seconds = 0.0
            t = time.process_time()
            out = actor(batch)
            total = time.process_time() - t
            del out  # freed outside the timing: on a GPU the outputs are cached pinned buffers
            hosts.append(total - clock.seconds)
            tensors.append(clock.seconds)
    finally:
        actor.task, tasks.images_to_uint8 = original_task, original_fn
    return statistics.median(hosts), statistics.median(tensors)


def ray_block_seconds(out: dict, repeats: int) -> float | None:
    try:
        from ray.data.block import BlockAccessor
    except ImportError:
        return None
    return cpu_seconds(lambda: BlockAccessor.batch_to_block(out), repeats)


def identity_seconds(outputs: EncodeOutputs, out: dict, repeats: int) -> float:
    """Median CPU seconds of the identity distances of one batch (crop vs 256 reconstruction)."""
    recon = out["image256"] if "image256" in out else out["image"]
    return cpu_seconds(lambda: [outputs._identity_distance(a, b) for a, b in zip(out["aligned"], recon)], repeats)


def png_codecs(repeats: int) -> None:
    """ms per image of each PNG encoder at 256² and 1024² (random content and a photo); every
    encoding is decoded and compared with its pixels."""
    import io

    from PIL import Image
    from skimage.data import astronaut

    rng = np.random.default_rng(1)
    photo = Image.fromarray(astronaut())
    encoders = {
        "fpng": lambda a: encode_png(a, "fpng"),
        "pillow level 1": lambda a: encode_png(a, "pillow"),
        "pillow default": lambda a: _pillow_png(a),
    }
    print(f"\nPNG encoders, ms per image (median of {repeats}; KiB per image); every one round-trips exactly")
    print(f"{'image':18s} " + " ".join(f"{n:>22s}" for n in encoders) + f" {'level 1 / fpng':>15s}")
    for size in (256, 1024):
        for content, pixels in (("random", rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
                                ("photo", np.asarray(photo.resize((size, size), Image.Resampling.LANCZOS)))):
            cells, times = [], {}
            for name, enc in encoders.items():
                data = enc(pixels)
                if not np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), pixels):
                    raise SystemExit(f"{name} does not round-trip at {size} {content}")
                times[name] = cpu_seconds(lambda enc=enc: enc(pixels), repeats)
                cells.append(f"{times[name] * 1e3:9.2f} ms {len(data) / 1024:7.0f} KiB")
            ratio = times["pillow level 1"] / times["fpng"] if times["fpng"] > 0 else float("inf")
            print(f"{f'{size}² {content}':18s} " + " ".join(f"{c:>22s}" for c in cells) + f" {ratio:14.1f}x")


def _pillow_png(a: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a, "RGB").save(buf, format="PNG")  # Pillow's default level (6)
    return buf.getvalue()


def pipeline_run(n: int, extra: list[str]) -> int:
    """The model actor inside a real `psp invert` run of `n` 256 px PNGs (see the module doc)."""
    import io
    import json
    import subprocess
    import tempfile
    from pathlib import Path

    from PIL import Image

    from psp_core.zero_time import write_zero_time_checkpoint

    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="psp-gpufeed-") as tmp_s:
        tmp = Path(tmp_s)
        ckpt = write_zero_time_checkpoint(tmp / "zero_time.pt", output_size=1024)
        inp = tmp / "in"
        inp.mkdir()
        rng = np.random.default_rng(0)
        base = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
        for i in range(n):
            px = base.copy()
            px[0, 0] = (i % 256, i // 256 % 256, 3)
            buf = io.BytesIO()
            Image.fromarray(px).save(buf, format="PNG", compress_level=1)
            (inp / f"img_{i:06d}.png").write_bytes(buf.getvalue())
        env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.setdefault("RAY_AUTH_MODE", "disabled")
        env.pop("OMP_NUM_THREADS", None)
        cmd = [sys.executable, "-m", "jobs", "invert", str(inp), str(tmp / "out"), "--checkpoint", ckpt,
               "--align", "none", "--device", "cpu", "--no-progress", *extra]
        proc = subprocess.run(cmd, env=env, cwd=str(root), capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"psp invert failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        doc = json.loads(next((tmp / "out" / "_runs").glob("*.json")).read_text())
    stages = doc["stages"]
    inv, dev = stages["invert"], stages.get("invert_device")
    if not dev:
        sys.exit("this psp invert does not report invert_device")
    rows = inv["rows"]
    host = 1e3 * (inv["busy_s"] - dev["busy_s"]) / rows
    print(f"psp invert, {rows} 256 px PNGs, zero-time model, --align none, 256 png outputs "
          f"(extra flags: {' '.join(extra) or 'none'}):")
    print(f"  model actor call {1e3 * inv['busy_s'] / rows:.3f} ms/img = model call (device side: copies, tensor "
          f"transform, model) {1e3 * dev['busy_s'] / rows:.3f} + host block handling {host:.3f} ms/img")
    print(f"  host block handling: {host:.3f} ms/img ({'meets' if host <= 0.5 else 'MISSES'} the 0.5 ms/img target; "
          f"a ceiling of {1e3 / host if host > 0 else float('inf'):,.0f} img/s per GPU)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", type=int, default=0, metavar="N",
                   help="measure the model actor inside a real psp invert run of N images instead")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more psp invert flags (--pipeline)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="2 timed batches per setting")
    p.add_argument("--settings", nargs="*", default=None, help="substrings of setting names to run")
    args = p.parse_args(argv)
    if args.pipeline:
        return pipeline_run(args.pipeline, args.extra)
    repeats = 2 if args.quick else args.repeats
    torch.set_num_threads(1)
    task = get_task("ffhq_encode")
    rng = np.random.default_rng(0)
    B = args.batch
    print(f"torch {torch.__version__}, 1 thread, batch {B}, median of {repeats} batches; ms per image")
    header = (f"{'setting':30s} {'actor host':>10s} {'tensor ops':>10s} {'ray block':>9s} {'ceiling/GPU':>11s} "
              f"{'prepare':>8s} {'outputs':>8s} {'identity':>8s} {'old actor':>9s} {'old/new':>8s}")
    print(header)
    worst = 0.0
    for name, (size, images, image_size, metrics, mix) in SETTINGS.items():
        if args.settings and not any(s in name for s in args.settings):
            continue
        model = PrecomputedPSP(size, B)
        actor = InvertFaces(model, ModelOptions("ffhq_encode", device="cpu", images=images, image_size=image_size,
                                                  metrics=metrics, mix=mix, latent_mask=[8] if mix else None,
                                                  cpu_threads=1))
        outputs = EncodeOutputs("ffhq_encode", run_id="bench", n_styles=model.n_styles, images=images,
                                metrics=metrics, code_version="bench")
        batch = model_batch(B, metrics, rng)
        out = actor(batch)
        host, tensor = actor_seconds(actor, batch, repeats)
        block = ray_block_seconds(out, repeats)
        prepare = cpu_seconds(lambda: [task.prepare(c) for c in batch["model_input"]], repeats)
        pool = cpu_seconds(lambda: outputs(out), max(1, repeats // 2) if metrics else repeats)
        ident = identity_seconds(outputs, out, max(1, repeats // 2)) if metrics else None
        old = cpu_seconds(lambda: old_style(actor, outputs, batch, task), max(1, repeats // 2) if metrics else repeats)
        worst = max(worst, host / B * 1e3)
        ms = lambda s: s / B * 1e3  # noqa: E731
        print(
            f"{name:30s} {ms(host):10.3f} {ms(tensor):10.3f} "
            f"{('%9.3f' % ms(block)) if block is not None else '        -'} "
            f"{(B / host if host > 0 else float('inf')):9.0f}/s "
            f"{ms(prepare):8.3f} {ms(pool):8.2f} {('%8.2f' % ms(ident)) if ident is not None else '       -'} "
            f"{ms(old):9.2f} {old / host if host > 0 else float('inf'):7.0f}x",
            flush=True,
        )
    verdict = "meets" if worst <= 0.5 else "MISSES"
    print(f"worst model-actor host work: {worst:.3f} ms/img ({verdict} the 0.5 ms/img target)")
    png_codecs(max(repeats, 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
