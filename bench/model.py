"""Throughput of PSP.forward, of each model family's encode + decode, and the batched vs grouped
modulated convolution, in one run.

    python bench/model.py --quick          # CPU: 256 (batch 1, 4) and 1024 (batch 1); families at 256, batch 1
    python bench/model.py                  # 256 and 1024 at batch 1, 4, 8 (+ CUDA autocast if present)

Families (pSp, e4e, ReStyle over pSp and over e4e): ``encode(x)`` then ``decode(w_plus)``, the
work the pipeline's model stage does per image; ReStyle runs its default 5 iterations (each an
encoder and a decoder pass), so its figure is expected near 1/5 of the one-pass families'.

Random weights (psp_core.testing.randomize_), randomize_noise=False, torch.inference_mode.
Numbers are medians of the repeats; compare ratios from the same run, not absolute times.
On CPU: threads = cores, channels_last for the encoder (the generator's 5-D modulated weights
have no channels_last form).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from psp_core.checkpoint import model_opts  # noqa: E402
from psp_core.e4e import E4E  # noqa: E402
from psp_core.psp import PSP  # noqa: E402
from psp_core.restyle import ReStyle  # noqa: E402
from psp_core.stylegan2 import Generator, set_modulated_conv_impl  # noqa: E402
from psp_core.testing import e4e_opts, psp_opts, random_latent_avg, randomize_, restyle_opts  # noqa: E402


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


def build_psp(output_size: int, device: torch.device, channels_last: bool) -> PSP:
    net = randomize_(PSP(psp_opts(output_size)), seed=0).eval()
    net.latent_avg = random_latent_avg(1, net.n_styles)
    net = net.to(device)
    if channels_last:
        net.encoder.to(memory_format=torch.channels_last)
    return net


def bench_forward(net: PSP, batches, repeats, warmup, device, autocast_dtype, channels_last) -> None:
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    label = f"{device.type}" + (f"+autocast({str(autocast_dtype).replace('torch.', '')})" if autocast_dtype else " fp32")
    for batch in batches:
        x = torch.randn(batch, 3, 256, 256, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        def run():
            with torch.inference_mode(), ctx:
                net(x, randomize_noise=False, resize=True)

        sec = _median_seconds(run, repeats, warmup, device)
        print(
            f"forward  {label:24s} output {net.output_size:4d}  batch {batch:2d}: "
            f"{batch / sec:8.2f} img/s  ({sec:.3f} s/batch, median of {repeats})",
            flush=True,
        )


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats and batches (CPU-friendly)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="output sizes (default 256 1024)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 4 8)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA runs even if a GPU is present")
    p.add_argument("--no-channels-last", action="store_true")
    args = p.parse_args(argv)

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    sizes = args.sizes or [256, 1024]
    cpu_batches = args.batches or ([1, 4] if args.quick else [1, 4, 8])
    repeats = args.repeats or (1 if args.quick else 3)
    warmup = 1
    channels_last = not args.no_channels_last
    print(f"torch {torch.__version__}, {cores} CPU threads, channels_last encoder: {channels_last}", flush=True)

    cpu = torch.device("cpu")
    for size in sizes:
        net = build_psp(size, cpu, channels_last)
        batches = [1] if (args.quick and size >= 1024 and not args.batches) else cpu_batches
        bench_forward(net, batches, repeats, warmup, cpu, None, channels_last)
        del net
    bench_families(256, [1] if args.quick else cpu_batches, repeats, warmup if not args.quick else 0, cpu)
    bench_modconv(128 if args.quick else 256, 4, max(repeats, 2), warmup, cpu)

    if torch.cuda.is_available() and not args.no_cuda:
        gpu = torch.device("cuda")
        print(f"GPU: {torch.cuda.get_device_name(gpu)}", flush=True)
        gpu_batches = args.batches or [1, 4, 8, 32]
        for size in sizes:
            net = build_psp(size, gpu, channels_last)
            for dtype in (None, torch.bfloat16, torch.float16):
                bench_forward(net, gpu_batches, max(repeats, 5), 2, gpu, dtype, channels_last)
            del net
            torch.cuda.empty_cache()
        for batch in (1, 8, 32):
            bench_modconv(1024, batch, 5, 2, gpu)


if __name__ == "__main__":
    main()
