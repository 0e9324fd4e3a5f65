"""CPU per face of a whole `psp invert` run: every process (driver, Ray's GCS/raylet/daemons, read
tasks, align/model/outputs actors), the model replaced by a zero-time stand-in.

    python bench/cpu_per_face.py                        # photos, N=6 vs 3N=18, 2 repeats, all settings
    python bench/cpu_per_face.py --n 10 --repeats 3 --settings "256 png" "speed mode"
    python bench/cpu_per_face.py --overhead --n 100     # per-row overhead: tiny PNGs, --align none --images none

Method (DESIGN.md, Performance method): each run is the real `psp invert` CLI in a fresh process
placed in its own cgroup before it starts (cgroup v1 `cpuacct.usage`, or v2 `cpu.stat` usage_usec),
so every process it starts is counted; the cgroup's CPU time is read once all of them have exited.
Runs of N and 3N inputs: the marginal CPU per face is (cpu(3N) - cpu(N)) / 2N, so the run's fixed
cost (Ray start-up, imports, the model actor) cancels. Each (N, 3N) pair is repeated and the
median and spread (min..max) are printed; a wide gap between N and 3N keeps the noise of the fixed
cost (several CPU-s here) small per face. Cap the actor pools (`--extra --align-actors 1
--output-actors 1`): otherwise the 3N run may start more actors than the N run, and their start-up
(imports, dlib models: several CPU-s each) counts as per-face cost. Also printed: the per-stage table `psp invert` prints
(busy ms per row of read / decode / align / invert / outputs, from the 3N run: wall time inside
each stage's call), the marginal CPU per row of each kind of process (`ProcessSampler`: `/proc` read
every 0.5 s for every process in the cgroup -- the driver, each Ray worker by the name Ray gives it,
the raylet, GCS and Ray's other daemons; `missed` is what the samples did not see: processes shorter
than a sample and each one's last half second), and the cores that keep one GPU busy at 1,300
faces/s (= ms per face x 1.3).

The model: `psp_core.zero_time.write_zero_time_checkpoint` writes a checkpoint (pSp opts, output
1024, no weights) that every process loads as `ZeroTimeModel`: no model time, W+ constant, images
the inputs' own crops. The model actor still runs its tensor ops (uint8 -> float input, images ->
uint8) on this CPU; on a GPU node those run on the device: the 'invert' stage's ms/row shows them.

Photos: skimage's astronaut, upscaled to camera sizes (1.0-3.0 MP, square and 4:3, mirrored every
other one, JPEG q92), each with distinct bytes. Settings (extra `psp invert` flags):
256 png (the default), 1024 png, 1024 jpeg, reuse (`--alignment-from` a table made by a first
unmeasured run over the same photos; only where this `psp` has the flag), speed mode
(`--align-detect-size 512`: photos of one clear face larger than ~768 px take the window path). With --overhead: N tiny generated PNGs, `--align none --images none`
(issue 18's per-row overhead), printed as ms CPU per row and rows/s per core.
Needs root (cgroups). Timings are noisy on a shared machine: quote the medians and the spread.
"""
from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GPU_FACES_PER_S = 1300  # pSp on one H100/H200 (DESIGN.md)
PHOTO_MP = (1.0, 1.5, 2.0, 2.5, 3.0)
SETTINGS = {
    "256 png": [],
    "1024 png": ["--image-size", "full"],
    "1024 jpeg": ["--image-size", "full", "--images", "jpeg"],
    "reuse": ["--alignment-from", "{prime}"],
    "speed mode": ["--align-detect-size", "512"],
}


# ------------------------------------------------------------------------------------------------
# CPU time of a process tree: its own cgroup


class CpuCgroup:
    """A fresh cgroup that counts the CPU time of every process started inside it."""

    def __init__(self, name: str):
        v1 = Path("/sys/fs/cgroup/cpuacct")
        if (v1 / "cpuacct.usage").exists() or (v1 / "cgroup.procs").exists():
            self.path, self.v2 = v1 / name, False
        elif Path("/sys/fs/cgroup/cgroup.controllers").exists():
            self.path, self.v2 = Path("/sys/fs/cgroup") / name, True
        else:
            sys.exit("no cpuacct (v1) or unified (v2) cgroup hierarchy at /sys/fs/cgroup")
        self.path.mkdir()

    def enter(self) -> None:
        """Move the calling process (a child, before exec) into the cgroup."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def cpu_s(self) -> float:
        if self.v2:
            stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
            return int(stat["usage_usec"]) / 1e6
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def close(self, wait_s: float = 60.0) -> float:
        """Wait for the processes left (Ray's daemons shut down after the driver), end the ones that
        stay (all started by this bench's child), remove the cgroup; returns its CPU seconds."""
        deadline = time.time() + wait_s
        while self.pids() and time.time() < deadline:
            time.sleep(0.2)
        for pid in self.pids():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        while self.pids():
            time.sleep(0.1)
        cpu = self.cpu_s()
        self.path.rmdir()
        return cpu


def process_kind(cmdline: str) -> str:
    """What a process of a run is, from its /proc cmdline: `driver` (the `psp` command), a Ray
    worker's name as Ray sets it, less the method it runs (`MapWorker(MapBatches(AlignFaces))`,
    `StageClockActor`, `MapBatches(read_batch)`, `IDLE`, ...), `worker start-up` (a worker Ray has
    not named yet), or the program (`raylet`, `gcs_server`, `log_monitor.py`, ...)."""
    args = cmdline.split("\0")
    if "-m" in args and "jobs" in args:
        return "driver"
    if args[0].startswith("ray::"):
        name = args[0].split(" ")[0][len("ray::"):]
        head, dot, _ = name.rpartition(").")
        return head + ")" if dot else name.split(".")[0]
    script = next((a for a in args[1:] if a.endswith(".py")), None)
    if script and Path(script).name in ("setup_worker.py", "default_worker.py"):
        return "worker start-up"
    return Path(script or args[0]).name or "ended"


class ProcessSampler:
    """CPU seconds per process kind (`process_kind`) of a cgroup's processes, read from /proc every
    `every` s: the CPU a process used since the last sample goes to the kind it has now (a worker
    that is `IDLE` now: to the task it last ran). Processes shorter than a sample, and each
    process's last interval, are not seen (`run_counted` reports them as `missed`)."""

    def __init__(self, group: CpuCgroup, every: float = 0.5):
        self.group, self.every = group, every
        self.ticks: dict[int, int] = {}
        self.kinds: dict[int, str] = {}
        self.by_kind: Counter = Counter()
        self.hz = os.sysconf("SC_CLK_TCK")
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for pid in self.group.pids():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                kind = process_kind(Path(f"/proc/{pid}/cmdline").read_text())
            except OSError:  # ended meanwhile
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            ticks = int(fields[11]) + int(fields[12])  # utime + stime
            if kind != "IDLE" or pid not in self.kinds:
                self.kinds[pid] = kind
            self.by_kind[self.kinds[pid]] += (ticks - self.ticks.get(pid, 0)) / self.hz
            self.ticks[pid] = ticks

    def _run(self) -> None:
        while not self.done.wait(self.every):
            self._sample()

    def __enter__(self) -> "ProcessSampler":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


def run_counted(cmd: list[str], env: dict, name: str, per_kind: dict | None = None) -> tuple[float, float, str]:
    """Run `cmd` in its own cgroup; (CPU seconds of all its processes, wall seconds, stdout).
    `per_kind` is filled with CPU seconds per process kind (`ProcessSampler`), `missed` the rest."""
    group = CpuCgroup(name)
    try:
        t0 = time.perf_counter()
        with ProcessSampler(group) as sampler:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=group.enter,
                                  cwd=str(ROOT))
        wall = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        cpu = group.close()
        if per_kind is not None:
            per_kind.update(sampler.by_kind, missed=cpu - sum(sampler.by_kind.values()))
        return cpu, wall, proc.stdout
    finally:
        if group.path.exists():
            group.close(wait_s=0)


# ------------------------------------------------------------------------------------------------
# Inputs


def make_photos(folder: Path, n: int) -> None:
    """n JPEG photos of one face (skimage's astronaut) at 1-3 MP, each with its own bytes."""
    from PIL import Image, ImageOps
    from skimage import data

    folder.mkdir(parents=True)
    base = Image.fromarray(data.astronaut())
    for i in range(n):
        mp = PHOTO_MP[i % len(PHOTO_MP)]
        img = base.crop((0, 64, 512, 448)) if i % 3 == 2 else base  # 4:3 every third photo
        w, h = img.size
        scale = (mp * 1e6 / (w * h)) ** 0.5
        img = img.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
        if i % 2:
            img = ImageOps.mirror(img)
        img.putpixel((0, 0), (i % 256, i // 256 % 256, 7))  # distinct bytes (source_sha256)
        img.save(folder / f"photo_{i:05d}.jpg", quality=92)


def make_tiny_pngs(folder: Path, n: int, size: int = 64) -> None:
    """n small generated PNGs (issue 18's per-row overhead inputs), 64 px: above the decoder's smallest
    side (`psp_core.images.MIN_SIDE`), so every row goes through every stage as an ok row."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        (folder / f"img_{i:07d}.png").write_bytes(buf.getvalue())


def subset(src: Path, dst: Path, n: int) -> Path:
    """A folder of the first n inputs of `src` (hard links: the same bytes)."""
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir())[:n]:
        os.link(f, dst / f.name)
    return dst


# ------------------------------------------------------------------------------------------------
# Runs


STAGE_LINE = re.compile(r"^\s+(\w+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")
REUSED_LINE = re.compile(r"alignment reused \(no detection\) for (\d+) inputs")
DEVICE_LINE = re.compile(r"^\s+invert: ([\d.]+) ms/row in the model call")


def stage_table(stdout: str) -> dict[str, float]:
    """ms/row per stage from the run report `psp invert` prints."""
    out = {}
    for line in stdout.splitlines():
        m = STAGE_LINE.match(line)
        if m:
            out[m.group(1)] = float(m.group(5))
        m = REUSED_LINE.search(line)
        if m:  # the reuse setting: how many inputs took the stored alignment (not a time)
            out["inputs reused"] = float(m.group(1))
        m = DEVICE_LINE.match(line)
        if m:  # the model call's tensor work: on a GPU node the device does it
            out["invert_device"] = float(m.group(1))
    return out


def invert_cmd(inp: Path, out: Path, checkpoint: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "jobs", "invert", str(inp), str(out), "--checkpoint", checkpoint,
            "--device", "cpu", "--no-progress", *extra]


def psp_flags() -> str:
    return subprocess.run([sys.executable, "-m", "jobs", "invert", "--help"], capture_output=True, text=True,
                          cwd=str(ROOT), env=child_env()).stdout


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def measure(name: str, extra: list[str], inputs: dict[int, Path], tmp: Path, checkpoint: str,
            repeats: int) -> dict:
    """`repeats` pairs of (N, 3N) runs of one setting, alternating; per pair the marginal ms/row."""
    n, n3 = sorted(inputs)
    per_row, stages, walls = [], {}, {}
    slug = re.sub(r"\W", "_", name)
    for r in range(repeats):
        cpu, kinds = {}, {n: {}, n3: {}}
        for size in (n, n3):
            out = tmp / f"out-{slug}-{r}-{size}"
            cpu[size], walls[size], stdout = run_counted(
                invert_cmd(inputs[size], out, checkpoint, extra), child_env(), f"psp_cpf_{os.getpid()}_{size}",
                per_kind=kinds[size])
            if size == n3:
                stages = stage_table(stdout)
            shutil.rmtree(out, ignore_errors=True)
        per_row.append(1e3 * (cpu[n3] - cpu[n]) / (n3 - n))
        print(f"  {name}: N={n} {cpu[n]:.1f} CPU-s ({walls[n]:.0f} s wall), 3N={n3} {cpu[n3]:.1f} CPU-s "
              f"({walls[n3]:.0f} s wall) -> {per_row[-1]:.1f} ms CPU per row; stages (3N run, busy ms/row): "
              + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()), flush=True)
        marginal = {k: 1e3 * (kinds[n3].get(k, 0.0) - kinds[n].get(k, 0.0)) / (n3 - n) for k in {*kinds[n], *kinds[n3]}}
        print("    per process kind, ms CPU per row (3N - N, from /proc): "
              + ", ".join(f"{k} {v:.1f}" for v, k in sorted(((v, k) for k, v in marginal.items()), reverse=True)
                          if abs(v) >= 0.05), flush=True)
    return {"ms": statistics.median(per_row), "lo": min(per_row), "hi": max(per_row), "stages": stages,
            "rows_per_s": n3 / walls[n3]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=6, help="inputs of the small run (the large one has 3N)")
    ap.add_argument("--repeats", type=int, default=2, help="(N, 3N) pairs per setting")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--overhead", action="store_true",
                    help="per-row overhead instead: tiny PNGs, --align none --images none")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="more psp invert flags for every run (last on the line)")
    args = ap.parse_args(argv)
    from psp_core.zero_time import write_zero_time_checkpoint

    flags = psp_flags()
    results = {}
    with tempfile.TemporaryDirectory(prefix="psp-cpf-") as tmp_s:
        tmp = Path(tmp_s)
        checkpoint = write_zero_time_checkpoint(tmp / "zero_time_1024.pt", output_size=1024)
        n, n3 = args.n, 3 * args.n
        src = tmp / "all"
        if args.overhead:
            make_tiny_pngs(src, n3)
            settings = {"overhead (--align none --images none)": ["--align", "none", "--images", "none"]}
        else:
            make_photos(src, n3)
            settings = {k: SETTINGS[k] for k in args.settings}
        inputs = {n: subset(src, tmp / f"in{n}", n), n3: subset(src, tmp / f"in{n3}", n3)}
        for name, extra in settings.items():
            missing = [f for f in extra if f.startswith("--") and f not in flags]
            if missing:
                print(f"  {name}: skipped, this psp invert has no {' '.join(missing)}")
                continue
            if "{prime}" in extra:  # a first, unmeasured run stores the alignment of every photo
                prime = tmp / "prime"
                run_counted(invert_cmd(inputs[n3], prime, checkpoint, args.extra), child_env(), f"psp_cpf_{os.getpid()}_p")
                extra = [str(prime) if f == "{prime}" else f for f in extra]
            results[name] = measure(name, extra + args.extra, inputs, tmp, checkpoint, args.repeats)
    report(results, args)
    return 0


def report(results: dict, args) -> None:
    unit = "row" if args.overhead else "face"
    print(f"\nmarginal CPU per {unit} (cpu(3N) - cpu(N)) / 2N, N={args.n}, {args.repeats} pair(s) each, "
          f"zero-time model, all processes of the run; cores per GPU at {GPU_FACES_PER_S} faces/s:")
    print(f"  {'setting':<40} {'ms/' + unit:>9} {'spread':>15} {'cores/GPU':>10}  per-stage busy ms/row (3N run)")
    for name, r in results.items():
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
        print(f"  {name:<40} {r['ms']:>9.1f} {r['lo']:>7.1f}..{r['hi']:<7.1f} {r['ms'] * GPU_FACES_PER_S / 1e3:>10.0f}"
              f"  {stages}")
    if args.overhead:
        for name, r in results.items():
            device = r["stages"].get("invert_device", 0.0)
            print(f"  {name}: {1e3 / r['ms']:.0f} rows/s per core of CPU; 3N run end to end "
                  f"{r['rows_per_s']:.1f} rows/s wall (start-up included); of the {r['ms']:.1f} ms, the model "
                  f"call's tensor work (the uint8 -> float input: GPU work on a GPU node) is ~{device:.1f} ms "
                  f"(busy time, so inflated by the load) -> host work ~{max(r['ms'] - device, 0):.1f} ms per row")


if __name__ == "__main__":
    sys.exit(main())
