"""Model stage: uint8 model inputs -> W+ and uint8 reconstructions, with only tensor work per batch.

`InvertFaces` is the thin model actor (one per GPU, or a CPU actor). It loads
`psp_core.load_psp(checkpoint)` once; per batch it copies the ok rows' `model_input` (the uint8 output
of `Task.prepare`, made by the align actors) to the device in one copy (pinned host memory and a
non-blocking copy on CUDA), runs `Task.to_model_input`, `PSP.encode`, `PSP.decode` (and `PSP.mix`
with `--mix`), converts the images to uint8 on the device with `images_to_uint8` (the original
`tensor2im` rounding) and copies W+ and the uint8 images back in one copy each. No PIL, no codec,
no dlib and no per-row pixel loop here: PNG/JPEG, metrics and the output table are made by
`pipelines.outputs.EncodeOutputs` in a CPU pool after this stage.

Column contract (B rows; failed rows keep their status and get zeros in the array columns):
    in:  source_uri, source_sha256, source_width, source_height, status, error, face_score,
         landmarks, quad, [aligned], model_input uint8 [B, *Task.prepared_shape]
    out: every input column except model_input, plus
         w_plus float32 [B, n_styles, 512]
         iteration_w_plus float32 [B, n_iters, n_styles, 512]   (ReStyle with keep_iterations)
         model_family (one string per row), n_iters int32 [B]
         image uint8 [B, H, W, 3]              (images != 'none'; H = W = 256 or the full size;
                                                ReStyle cars: the car rows, H = 3/4 W, as ReStyle)
         image256 uint8 [B, 256, 256, 3]        (metrics on a photo task, when `image` is not 256)
         mix_w_plus float32 [B, N, n_styles, 512] and mix_images uint8 [B, N, H, W, 3] (--mix N)
         checkpoint_sha256 (one string per row)
A failing batch is retried row by row, so a bad row becomes 'invert_error' alone.

`ModelOptions` is the stage's slice of a run's options. `invert_resources` is the (pure) decision of what the model actors ask Ray for, memory included.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_GPU_BATCH = 32
DEFAULT_CPU_BATCH = 8
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
# On CPU: fp32, or bf16 autocast (runs everywhere, slow without AMX/AVX512-BF16). TF32 and fp16 are
# GPU arithmetic: asked for on a CPU actor they are a misconfiguration.
CPU_PRECISIONS = ("fp32", "bf16")
GIB = 1024**3


def check_precision(precision: str, device: str) -> None:
    """ValueError unless `precision` is one of PRECISIONS and runs on `device` ('cpu' or 'cuda')."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if device == "cpu" and precision not in CPU_PRECISIONS:
        raise ValueError(
            f"--precision {precision} needs a GPU but the model runs on CPU: use --precision fp32 "
            "(or bf16) on CPU, or run on a cluster with GPUs (--device cuda)"
        )


def model_actor_memory(
    checkpoint_bytes: int, output_size: int, batch_size: int, device: str, mix: int = 0
) -> int:
    """Bytes of host memory one model actor uses, as it asks Ray for them (rounded up to 1/4 GiB).

    Process (Python, torch, Ray worker; on CUDA the driver's host side) + the weights twice (the
    checkpoint as read and the model) + on CPU the activations of a batch (the generator's widest
    layers: about 512 bytes per output pixel per image; mixes are decoded as extra images) + the
    uint8 inputs and outputs of a batch.
    """
    images = batch_size * (1 + max(0, int(mix)))
    base = (2.5 if device == "cuda" else 1.25) * GIB
    activations = images * output_size * output_size * 512 if device == "cpu" else 0
    buffers = 2 * batch_size * 256 * 256 * 3 + 2 * images * output_size * output_size * 3
    total = base + 2 * checkpoint_bytes + activations + buffers
    quarter = GIB // 4
    return int(math.ceil(total / quarter) * quarter)


def invert_resources(
    cluster_resources: Mapping[str, float],
    device: str = "auto",
    gpus: int | None = None,
    cpu_actors: int = 1,
    precision: str = "fp32",
    memory: int | None = None,
) -> dict[str, Any]:
    """What each model actor requests, and how many there may be.

    cluster_resources: `ray.cluster_resources()` (e.g. {"CPU": 16.0, "GPU": 2.0}).
    device: 'auto' | 'cpu' | 'cuda'. gpus: at most this many GPU actors (None: every GPU).
    precision: checked against the chosen device (`check_precision`).
    memory: bytes each actor requests (`model_actor_memory`; None: no request).
    Returns {"device": 'cuda'|'cpu', "num_gpus": 1 or 0, "num_cpus": float, "actors": int,
    "memory": bytes or None}.
    GPU actors (one GPU each) when the cluster has GPUs and device is not 'cpu'; otherwise CPU
    actors with a fractional CPU request (the actor sets its own torch thread count), so read and
    align tasks are not starved on small machines. `--device cuda` with `--gpus N` asks for N GPUs
    even if none are up yet (an autoscaling cluster adds them); without GPUs and without --gpus it
    is a ValueError.
    """
    n_gpus = int(cluster_resources.get("GPU", 0) or 0)
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {device!r}: expected auto, cpu or cuda")
    if gpus is not None and gpus < 0:
        raise ValueError(f"gpus={gpus}: expected >= 0")
    if device == "cpu" or gpus == 0 or (device == "auto" and n_gpus == 0):
        check_precision(precision, "cpu")
        return {"device": "cpu", "num_gpus": 0, "num_cpus": 0.5, "actors": max(1, int(cpu_actors)), "memory": memory}
    if n_gpus == 0 and gpus is None:
        raise ValueError(
            "--device cuda but the Ray cluster has no GPUs: use --device auto/cpu, connect to a cluster "
            "with GPU nodes, or pass --gpus N to wait for an autoscaler to add them"
        )
    check_precision(precision, "cuda")
    actors = gpus if gpus is not None else n_gpus
    if n_gpus and gpus is not None:
        actors = min(gpus, n_gpus)
    return {"device": "cuda", "num_gpus": 1, "num_cpus": 1, "actors": max(1, actors), "memory": memory}


@dataclass(frozen=True)
class ModelOptions:
    """What the model stage takes of a run's options (`pipelines.dataflow.stage_options` builds it
    from the resolved config).

    task: dataset_type (its `to_model_input`). device: 'auto' (cuda if the actor's process sees
    one), 'cpu', 'cuda'. storage_options: fsspec options to read the checkpoint. images: 'png' |
    'jpeg' | 'none' (with 'none' no reconstruction is decoded unless metrics need it). image_size:
    '256' | 'full'. metrics: also hand on the 256x256 reconstruction for photo tasks.
    mix/latent_mask/mix_alpha/seed: style mixing, seeds per row from (seed, image_id). precision:
    'fp32' (TF32 off: equals the original within 1e-4), 'tf32', 'bf16' or 'fp16' (autocast).
    cpu_threads: torch threads on CPU (None: all cores of the node). n_iters: ReStyle's refinement
    steps (None: the checkpoint family's default; ValueError for pSp and e4e). keep_iterations:
    ReStyle, also hand on every iteration's W+ (`iteration_w_plus`). forward_rows: images per
    forward pass (the model's batch, what bounds its memory; None: the whole block). Ray's blocks
    may be larger (`pipelines.dataflow` gives the stage many rows per call where rows are cheap,
    so Ray's cost per call is spread over them); a block is run in forward passes of this size.
    """

    task: str
    device: str = "auto"
    storage_options: Mapping[str, Any] | None = None
    images: str = "png"
    image_size: str = "256"
    metrics: bool = False
    mix: int = 0
    latent_mask: Sequence[int] | None = None
    mix_alpha: float | None = None
    seed: int = 0
    precision: str = "fp32"
    cpu_threads: int | None = None
    n_iters: int | None = None
    keep_iterations: bool = False
    forward_rows: int | None = None


class InvertFaces:
    """Batch dict stage: the align stage's columns -> model outputs (see the module docstring).

    checkpoint: path or fsspec URI of the pSp checkpoint (loaded once, here), or an already loaded
    `PSP` (any object with its encode/decode/mix/face_pool, output_size, n_styles, checkpoint_sha256:
    bench/gpu_feed.py passes one whose outputs are precomputed). options: the stage's `ModelOptions`.
    stage_clock: records stage 'invert'.
    """

    def __init__(self, checkpoint: Any, options: ModelOptions, stage_clock: Any = None):
        import torch

        from psp_core import load_psp
        from psp_core.tasks import get_task

        o = options
        device, precision, n_iters = o.device, o.precision, o.n_iters
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        check_precision(precision, device)
        if device == "cpu":
            # Ray sets OMP_NUM_THREADS=1 for fractional-CPU actors; the model is the bottleneck here.
            torch.set_num_threads(o.cpu_threads or max(1, os.cpu_count() or 1))
        if device == "cuda":
            # fp32: convolutions and matmuls in full precision (TF32 would move outputs by ~1e-3,
            # past the 1e-4 promise of matching the original). tf32 opts in.
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
            torch.backends.cudnn.allow_tf32 = precision == "tf32"
        self.device = torch.device(device)
        self.precision = precision
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        if isinstance(checkpoint, (str, os.PathLike)):
            self.model = load_psp(checkpoint, device=device, storage_options=o.storage_options, n_iters=n_iters)
        else:
            self.model = checkpoint
            if n_iters is not None:
                self.model.n_iters = n_iters
        self.family = str(getattr(self.model, "family", "psp"))
        # ReStyle: `refine` gives every iteration's W+ and reconstruction (the last one is the
        # output image: no extra decode pass).
        self.restyle = self.family.startswith("restyle") and hasattr(self.model, "refine")
        self.n_iters = int(getattr(self.model, "n_iters", 1)) if self.restyle else 1
        if (n_iters is not None and n_iters != self.n_iters) or (o.keep_iterations and not self.restyle):
            raise ValueError(
                f"n_iters / keep_iterations only apply to ReStyle checkpoints; this is a {self.family} checkpoint"
            )
        self.keep_iterations = bool(o.keep_iterations)
        self.task = get_task(o.task)
        self.images = o.images
        self.full_size = str(o.image_size) == "full"
        self.metrics = bool(o.metrics) and self.task.label_nc == 0
        self.mix = int(o.mix or 0)
        self.latent_mask = list(o.latent_mask) if o.latent_mask is not None else None
        self.mix_alpha = o.mix_alpha
        self.seed = int(o.seed)
        self.forward_rows = int(o.forward_rows) if o.forward_rows else None
        self.stage_clock = stage_clock

    # -- host <-> device ------------------------------------------------------------------------
    def _to_device(self, model_input: np.ndarray, rows: np.ndarray):
        """uint8 rows of `model_input` -> a uint8 tensor on the device, in one host copy (into
        pinned memory on CUDA, then a non-blocking copy to the GPU)."""
        import torch

        shape = (len(rows), *model_input.shape[1:])
        if self.device.type == "cuda":
            host = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
            np.take(model_input, rows, axis=0, out=host.numpy(), mode="clip")  # "raise" would buffer
            return host.to(self.device, non_blocking=True)
        return torch.from_numpy(np.take(model_input, rows, axis=0))

    def _to_host(self, tensors: dict) -> dict[str, np.ndarray]:
        """Device tensors -> numpy arrays; on CUDA one non-blocking copy each into pinned memory,
        then one synchronisation."""
        import torch

        if self.device.type != "cuda":
            return {k: t.numpy() for k, t in tensors.items()}
        out = {}
        for k, t in tensors.items():
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            out[k] = host
        torch.cuda.current_stream(self.device).synchronize()
        return {k: t.numpy() for k, t in out.items()}

    # -- the model ------------------------------------------------------------------------------
    def _run_model(self, model_input: np.ndarray, rows: np.ndarray, n: int, seeds: list[int]) -> dict[str, np.ndarray]:
        """The rows `rows` of `model_input` -> numpy outputs for a batch of `n` rows (rows not in
        `rows` are zeros), scattered on the device so the host copies each output once; with
        n == len(rows), output row k is `rows[k]`."""
        import torch

        from psp_core.tasks import images_to_uint8

        model = self.model
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        )
        with torch.inference_mode(), autocast:
            x = self.task.to_model_input(self._to_device(model_input, rows))
            need_256 = self.metrics and (self.full_size or self.images == "none")
            if self.restyle:
                codes, recons = model.refine(x, self.n_iters, resize=not self.full_size)
                w_plus, images = codes[-1], recons[-1]
            else:
                w_plus, images = model.encode(x), None
            out = {"w_plus": w_plus.float()}
            if self.keep_iterations:
                out["iteration_w_plus"] = torch.stack(codes, dim=1).float()
            if self.images != "none" or need_256:
                if images is None:
                    images = model.decode(w_plus, resize=not self.full_size)
                if self.images != "none":
                    out["image"] = images_to_uint8(images)
                if need_256:
                    out["image256"] = images_to_uint8(model.face_pool(images) if self.full_size else images)
            if self.mix:
                mix_images, mix_w = model.mix(
                    None, self.mix, self.latent_mask, mix_alpha=self.mix_alpha, seed=seeds,
                    resize=not self.full_size, w_plus=w_plus,
                )
                out["mix_w_plus"] = mix_w.float()
                if self.images != "none":
                    flat = images_to_uint8(mix_images.reshape(-1, *mix_images.shape[2:]))
                    out["mix_images"] = flat.reshape(len(rows), self.mix, *flat.shape[1:])
            if len(rows) != n:  # scatter into the full batch on the device
                index = torch.as_tensor(rows, device=self.device)
                for k, t in out.items():
                    full = torch.zeros((n, *t.shape[1:]), dtype=t.dtype, device=self.device)
                    out[k] = full.index_copy_(0, index, t)
        return self._to_host(out)

    # -- the stage --------------------------------------------------------------------------------
    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipelines.read import object_column
        from schemas.ids import face_image_id, row_seed

        start = time.perf_counter()
        n = len(batch["source_uri"])
        status = [str(s) for s in batch["status"]]
        error = [str(e) if e else None for e in batch["error"]]
        model_input = np.asarray(batch["model_input"])
        rows = np.array([i for i in range(n) if status[i] == "ok"], dtype=np.int64)
        # Seeds per row key: with --faces all, face k > 0 of a photo has its own image_id and seed.
        faces = batch.get("face_index")  # -1: a row without a face
        keys = [face_image_id(str(batch["source_uri"][i]), None if faces is None or faces[i] < 0 else int(faces[i]))
                for i in rows]
        seeds = [row_seed(self.seed, key) for key in keys] if self.mix else []
        model_start = time.perf_counter()
        if not len(rows):
            results = self._zeros(n)
        else:
            results = self._run_block(model_input, rows, n, seeds, status, error, batch["source_uri"])
        model_s = time.perf_counter() - model_start
        out = {k: v for k, v in batch.items() if k != "model_input"}
        out.update(results)
        out["status"] = object_column(status)
        out["error"] = object_column(error)
        out["checkpoint_sha256"] = object_column([self.model.checkpoint_sha256] * n)
        out["model_family"] = object_column([self.family] * n)
        out["n_iters"] = np.full(n, self.n_iters, dtype=np.int32)
        if self.stage_clock is not None:
            # of which the device side (invert_device): copies in and out, the task's tensor
            # transform, the model (what a GPU runs); the rest is the actor's block handling
            self.stage_clock.record("invert", n, time.perf_counter() - start, parts={"invert_device": model_s})
        return out

    def _run_block(self, model_input, rows, n, seeds, status, error, uris) -> dict[str, np.ndarray]:
        """The ok `rows` of a block in forward passes of at most `forward_rows` images (each
        pass's outputs copied once into the block's columns); a failing pass is retried row by row."""
        step = self.forward_rows or len(rows)
        if len(rows) <= step:
            try:
                return self._run_model(model_input, rows, n, seeds)
            except Exception:
                return self._run_rows(model_input, rows, n, seeds, status, error, uris)
        results = self._zeros(n)
        for at in range(0, len(rows), step):
            part, part_seeds = rows[at : at + step], seeds[at : at + step]
            try:
                done = self._run_model(model_input, part, len(part), part_seeds)
            except Exception:
                done = self._run_rows(model_input, part, len(part), part_seeds, status, error, uris, compact=True)
            for name, value in done.items():
                results[name][part] = value
        return results

    def _run_rows(self, model_input, rows, n, seeds, status, error, uris, compact=False) -> dict[str, np.ndarray]:
        """The batch failed: run each row alone, so only the failing row(s) get 'invert_error'.
        compact: the outputs hold the `rows` in order (row k of the outputs is `rows[k]`)."""
        results = self._zeros(n)
        for k, i in enumerate(rows):
            try:
                one = self._run_model(model_input, np.array([i]), 1, seeds[k : k + 1])
            except Exception as e:
                status[i] = "invert_error"
                error[i] = f"{uris[i]}: inversion failed ({type(e).__name__}: {e})"
                continue
            for name, value in one.items():
                results[name][k if compact else i] = value[0]
        return results

    def image_hw(self) -> tuple[int, int]:
        """(H, W) of the `image` column: 256x256 or the generator's size; ReStyle's cars keep the
        rows H/8 .. 7H/8 (the car), as ReStyle's own outputs."""
        side = self.model.output_size if self.full_size else 256
        if self.restyle and getattr(self.model, "crops_cars", False):
            return side - 2 * (side // 8), side
        return side, side

    def _zeros(self, n: int) -> dict[str, np.ndarray]:
        """The output columns for `n` rows, all zeros: every batch has the same columns and shapes,
        whichever of its rows fail."""
        side = self.model.output_size if self.full_size else 256
        styles = (self.model.n_styles, 512)
        shapes = {"w_plus": (styles, np.float32)}
        if self.keep_iterations:
            shapes["iteration_w_plus"] = ((self.n_iters, *styles), np.float32)
        if self.images != "none":
            shapes["image"] = ((*self.image_hw(), 3), np.uint8)
        if self.metrics and (self.full_size or self.images == "none"):
            shapes["image256"] = ((256, 256, 3), np.uint8)
        if self.mix:
            shapes["mix_w_plus"] = ((self.mix, *styles), np.float32)
            if self.images != "none":
                shapes["mix_images"] = ((self.mix, side, side, 3), np.uint8)
        return {k: np.zeros((n, *shape), dtype=dtype) for k, (shape, dtype) in shapes.items()}
