"""pSp throughput and reduced-precision deviation: the model actor's device work, in one run.

    python bench/model.py --quick                     # CPU: forward at 256 / 1024 (batch 1, 4), and each
                                                      # family's encode + decode (pSp, e4e, ReStyle x2)
    python bench/model.py                             # CPU as above, then the CUDA grid if a GPU is present
    python bench/model.py --cuda-only --json out.json # the CUDA grid only (what to run on a GPU machine)
    python bench/model.py --grid-device cpu --sizes 32 --batches 2 --modes eager   # smoke test of the grid

Needs only torch and numpy (plus this repository): no Ray, no pillow, no pyarrow.

The CUDA grid times what one model actor does per batch on its device (`pipelines.model`):
uint8 crops [B,256,256,3] -> `Task.to_model_input` -> `PSP.encode` -> `PSP.decode` at the full output
size -> `images_to_uint8` (the original tensor2im rounding), for
  output size 1024 and 256 (n_styles 18 / 14) x batch 8, 32, 64
  x precision fp32 (TF32 off: the pipeline's default), tf32, bf16 and fp16 (autocast)
  x memory format contiguous / channels_last
  x mode eager, CUDA graph (captured once per shape; batches 32 and 64) and torch.compile (bf16 and
    fp16, channels_last, batch 64: each compile costs minutes; failures are reported, not fatal).
Every configuration reports img/s (median of repeats) and its deviation from fp32 eager on the same
inputs: max |dW+| and the PSNR of the uint8 images (inf = identical). The fastest configuration
whose images stay >= 40 dB from fp32 is printed at the end against the 1,300 img/s target at 1024.

Random weights (psp_core.testing.randomize_) unless --checkpoint gives a real pSp file: deviations
measured on random weights are indicative (a trained generator's activations differ in range).
Numbers are medians; compare ratios from the same run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from psp_core.checkpoint import load_psp, model_opts  # noqa: E402
from psp_core.e4e import E4E  # noqa: E402
from psp_core.psp import PSP  # noqa: E402
from psp_core.restyle import ReStyle  # noqa: E402
from psp_core.stylegan2 import Generator, set_modulated_conv_impl  # noqa: E402
from psp_core.tasks import get_task, images_to_uint8  # noqa: E402
from psp_core.testing import e4e_opts, psp_opts, random_latent_avg, randomize_, restyle_opts  # noqa: E402

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
TARGET_IMG_S = 1300
MIN_PSNR_DB = 40.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, repeats: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def build_psp(output_size: int, device: torch.device, checkpoint: str | None = None) -> PSP:
    if checkpoint:
        return load_psp(checkpoint, device=device)
    net = randomize_(PSP(psp_opts(output_size)), seed=0).eval()
    net.latent_avg = random_latent_avg(1, net.n_styles)
    return net.to(device)


def set_precision(precision: str) -> None:
    """fp32: TF32 off (the pipeline default); tf32: TF32 on; bf16/fp16 use autocast (TF32 off)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"


# ----------------------------------------------------------------------------------------------
# CPU: plain forward (kept from before: the CPU actor's speed) and modulated-conv implementations


def bench_forward_cpu(net: PSP, batches, repeats, warmup, channels_last) -> None:
    device = torch.device("cpu")
    for batch in batches:
        x = torch.randn(batch, 3, 256, 256)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        def run():
            with torch.inference_mode():
                net(x, randomize_noise=False, resize=True)

        sec = _median_seconds(run, repeats, warmup, device)
        print(f"forward  cpu fp32  output {net.output_size:4d}  batch {batch:2d}: {batch / sec:8.2f} img/s "
              f"({sec:.3f} s/batch, median of {repeats})", flush=True)


FAMILY_MODELS = {
    "psp": lambda size: PSP(model_opts(psp_opts(size))),
    "e4e": lambda size: E4E(model_opts(e4e_opts(size))),
    "restyle_psp": lambda size: ReStyle(model_opts(restyle_opts(size, "BackboneEncoder"))),
    "restyle_e4e": lambda size: ReStyle(model_opts(restyle_opts(size, "ResNetProgressiveBackboneEncoder"))),
}


def bench_families(size: int, batches, repeats: int, warmup: int, device: torch.device) -> None:
    """encode + decode per family (random weights), images/s; ReStyle at its default n_iters."""
    for family, build in FAMILY_MODELS.items():
        net = randomize_(build(size), seed=0).eval()
        net.latent_avg = random_latent_avg(1, net.n_styles)
        net = net.to(device)
        if isinstance(net, ReStyle):
            net.set_avg_image()  # done once at load time
        for batch in batches:
            x = torch.rand(batch, 3, *net.input_size, device=device) * 2 - 1

            def run():
                with torch.inference_mode():
                    net.decode(net.encode(x), resize=True)

            sec = _median_seconds(run, repeats, warmup, device)
            print(
                f"family   {family:12s} {net.encoder_type:34s} output {size:4d}  batch {batch:2d}  n_iters "
                f"{net.n_iters}: {batch / sec:8.2f} img/s  ({sec:.3f} s/batch, median of {repeats})",
                flush=True,
            )


def bench_modconv(size: int, batch: int, repeats: int, warmup: int, device: torch.device) -> None:
    gen = randomize_(Generator(size), seed=0).eval().to(device)
    w = torch.randn(batch, gen.n_latent, 512, device=device)
    results = {}
    for impl in ("grouped", "batched"):
        set_modulated_conv_impl(gen, impl)

        def run():
            with torch.inference_mode():
                gen([w], input_is_latent=True, randomize_noise=False)

        results[impl] = _median_seconds(run, repeats, warmup, device)
    with torch.inference_mode():
        set_modulated_conv_impl(gen, "grouped")
        a, _ = gen([w], input_is_latent=True, randomize_noise=False)
        set_modulated_conv_impl(gen, "batched")
        b, _ = gen([w], input_is_latent=True, randomize_noise=False)
    print(
        f"generator {size}px batch {batch} on {device.type}: grouped {results['grouped']:.3f} s, "
        f"batched {results['batched']:.3f} s -> batched is {results['grouped'] / results['batched']:.2f}x "
        f"the grouped speed (max |diff| {float((a - b).abs().max()):.1e})",
        flush=True,
    )


# ----------------------------------------------------------------------------------------------
# The model actor's device step, per configuration


def make_step(net: PSP, precision: str, channels_last: bool, graph_safe: bool):
    """uint8 [B,256,256,3] on the device -> (W+ float32, uint8 images [B,H,W,3]) as the actor does."""
    task = get_task("ffhq_encode")
    device_type = net.device.type
    dtype = AUTOCAST.get(precision)

    def step(crops: torch.Tensor):
        ctx = torch.autocast(device_type, dtype=dtype, cache_enabled=not graph_safe) if dtype else nullcontext()
        with ctx:
            x = task.to_model_input(crops)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            w_plus = net.encode(x)
            images = net.decode(w_plus, resize=False)
            return w_plus.float(), images_to_uint8(images)

    return step


def psnr_uint8(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def run_config(net, crops, precision, channels_last, mode, repeats, warmup, reference):
    """-> dict with img/s and the deviation from `reference` (fp32 eager outputs), or an error."""
    device = crops.device
    set_precision(precision)
    if channels_last:
        net.encoder.to(memory_format=torch.channels_last)
    else:
        net.encoder.to(memory_format=torch.contiguous_format)
    step = make_step(net, precision, channels_last, graph_safe=mode == "graph")
    result = {"precision": precision, "channels_last": channels_last, "mode": mode, "batch": len(crops),
              "output_size": net.output_size}
    try:
        if mode == "compile":
            compiled = torch.compile(step)
            t = time.perf_counter()
            with torch.inference_mode():
                compiled(crops)
            _sync(device)
            result["compile_s"] = round(time.perf_counter() - t, 1)

            def run():
                with torch.inference_mode():
                    return compiled(crops)
        elif mode == "graph":
            static_in = crops.clone()
            with torch.inference_mode():
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(2):
                        step(static_in)
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = step(static_in)

            def run():
                static_in.copy_(crops, non_blocking=True)
                graph.replay()
                return static_out
        else:
            def run():
                with torch.inference_mode():
                    return step(crops)

        sec = _median_seconds(run, repeats, warmup, device)
        w_plus, images = run()
        _sync(device)
        result["img_s"] = round(len(crops) / sec, 3)
        if reference is not None:
            result["max_abs_dw"] = float((w_plus - reference[0]).abs().max())
            result["psnr_db"] = round(psnr_uint8(images, reference[1]), 2)
            result["finite"] = bool(torch.isfinite(w_plus).all())
        result["outputs"] = (w_plus.clone(), images.clone())
    except Exception as e:  # a mode that does not work here is reported, not fatal
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        set_precision("fp32")
    return result


def cuda_grid(args, device: torch.device) -> list[dict]:
    results = []
    rng = np.random.default_rng(0)
    for size in args.sizes:
        net = build_psp(size, device, args.checkpoint if size == args.checkpoint_size else None)
        for batch in args.batches:
            crops = torch.from_numpy(rng.integers(0, 256, size=(batch, 256, 256, 3), dtype=np.uint8)).to(device)
            reference = None
            for precision in args.precisions:
                for channels_last in args.channels_last:
                    for mode in args.modes:
                        if mode == "graph" and device.type != "cuda":
                            continue
                        if mode != "eager" and batch not in args.fast_mode_batches:
                            continue
                        if mode == "compile" and (precision not in args.compile_precisions or not channels_last
                                                  or batch != max(args.fast_mode_batches)):
                            continue  # each compile costs minutes: only where it may win
                        r = run_config(net, crops, precision, channels_last, mode, args.repeats, args.warmup, reference)
                        outs = r.pop("outputs", None)
                        if reference is None and precision == "fp32" and mode == "eager" and not channels_last:
                            reference = outs  # every other configuration is compared with this
                            r.update(max_abs_dw=0.0, psnr_db=math.inf, finite=True)
                        results.append(r)
                        _print_result(r)
            del crops, reference
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del net
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _print_result(r: dict) -> None:
    name = (f"out {r['output_size']:4d} batch {r['batch']:2d} {r['precision']:4s} "
            f"{'channels_last' if r['channels_last'] else 'contiguous   '} {r['mode']:7s}")
    if "error" in r:
        print(f"{name}: FAILED {r['error']}", flush=True)
        return
    dev = ""
    if "psnr_db" in r:
        dev = f"  max|dW+| {r['max_abs_dw']:.2e}  PSNR {r['psnr_db']:6.2f} dB" + ("" if r.get("finite", True) else "  NON-FINITE")
    extra = f"  (compile {r['compile_s']} s)" if "compile_s" in r else ""
    print(f"{name}: {r['img_s']:9.1f} img/s{dev}{extra}", flush=True)


def summarize(results: list[dict]) -> None:
    for size in sorted({r["output_size"] for r in results}):
        ok = [r for r in results if r["output_size"] == size and "img_s" in r and r.get("finite", True)
              and r.get("psnr_db", 0) >= MIN_PSNR_DB]
        if not ok:
            continue
        best = max(ok, key=lambda r: r["img_s"])
        fp32 = max((r["img_s"] for r in ok if r["precision"] == "fp32" and r["mode"] == "eager"), default=0.0)
        target = f" (target at 1024: {TARGET_IMG_S} img/s -> {'met' if best['img_s'] >= TARGET_IMG_S else 'NOT met'})" if size == 1024 else ""
        print(f"fastest at {size} with PSNR >= {MIN_PSNR_DB:.0f} dB vs fp32: {best['img_s']:.1f} img/s "
              f"({best['precision']}, {'channels_last' if best['channels_last'] else 'contiguous'}, {best['mode']}, "
              f"batch {best['batch']}); {best['img_s'] / fp32 if fp32 else float('nan'):.2f}x fp32 eager{target}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU part: fewer repeats and batches")
    p.add_argument("--cuda-only", action="store_true", help="skip the CPU part")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA grid even if a GPU is present")
    p.add_argument("--grid-device", default=None, help="run the grid on this device (default cuda when present)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="output sizes (default 1024 256)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="grid batches (default 8 32 64)")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--modes", nargs="+", default=["eager", "graph", "compile"], choices=("eager", "graph", "compile"))
    p.add_argument("--fast-mode-batches", type=int, nargs="+", default=[32, 64],
                   help="batches at which graph/compile run (each compile costs time)")
    p.add_argument("--compile-precisions", nargs="+", default=["bf16", "fp16"], choices=PRECISIONS,
                   help="torch.compile runs only for these, channels_last, at the largest fast-mode batch")
    p.add_argument("--channels-last", type=int, nargs="+", default=[0, 1], choices=(0, 1))
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--checkpoint", default=None, help="a real pSp checkpoint for the grid at --checkpoint-size")
    p.add_argument("--checkpoint-size", type=int, default=1024)
    p.add_argument("--json", default=None, help="also write the grid results here")
    args = p.parse_args(argv)
    args.channels_last = [bool(c) for c in args.channels_last]

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    print(f"torch {torch.__version__}, {cores} CPU threads, CUDA: "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}", flush=True)
    if not args.cuda_only and args.grid_device is None:
        cpu = torch.device("cpu")
        sizes = args.sizes or [256, 1024]
        for size in sizes:
            net = build_psp(size, cpu)
            batches = [1] if (args.quick and size >= 1024) else ([1, 4] if args.quick else [1, 4, 8])
            bench_forward_cpu(net, batches, args.repeats or (1 if args.quick else 3), 1, channels_last=True)
            del net
        bench_families(256, [1] if args.quick else [1, 4], args.repeats or (1 if args.quick else 3),
                       0 if args.quick else 1, cpu)
        bench_modconv(128 if args.quick else 256, 4, 2, 1, cpu)

    grid_device = args.grid_device or ("cuda" if torch.cuda.is_available() and not args.no_cuda else None)
    if grid_device is None:
        print("no GPU: the CUDA grid did not run (run this script on a GPU machine: --cuda-only --json out.json)")
        return 0
    device = torch.device(grid_device)
    args.sizes = args.sizes or [1024, 256]
    args.batches = args.batches or [8, 32, 64]
    args.repeats = args.repeats or 5
    results = cuda_grid(args, device)
    summarize(results)
    if device.type == "cuda":
        bench_modconv(1024, 32, 5, 2, device)
    if args.json:
        env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
               "checkpoint": args.checkpoint or "random weights"}
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": results}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
