"""`psp report OUTPUT`: one self-contained HTML page about an output table.

Everything is inlined (images as data URIs, plots as PNG data URIs, CSS in the page) and a Content
Security Policy forbids any other load, so the file opens offline in any browser, without a server.
Sections: status counts, run history, a contact sheet of a sample (input | aligned crop |
reconstruction | mixes or edits), worst and best rows by MSE / identity distance, histograms of
the per-row numbers, a 2-D PCA of W+ (mean over styles), errors grouped by message. A section the
table cannot fill (no metrics, no ok rows, an empty table) says so instead of failing.

The table is read as a stream of column batches folded into one mergeable `ReportStats`
(`pipelines.scan.scan_table`: in Ray tasks for large tables), so the page's memory does not grow with
the table: counts, run history and error groups are exact aggregates; the PCA axes come from the
exact mean and covariance of every ok row's W+ (mean over styles), its scatter from a deterministic
sample; histograms from a sample of each number (exact below `HIST_SAMPLE` values); the contact sheet
and worst/best lists keep only their rows. Images are then read only for the rows shown, from the
files that hold them.
"""
from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import heapq
import io
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa

THUMB = 128  # px, longest side of the thumbnails in the page
HIST_COLUMNS = ("face_score", "mse", "psnr", "ssim", "identity_distance")
# Metric -> True when lower is better.
RANK_METRICS = {"mse": True, "identity_distance": True}
_LIGHT = ("image_id", "source_uri", "status", "error", "face_score", "task", "mse", "psnr", "ssim",
          "identity_distance", "checkpoint_sha256", "run_id", "processed_at", "w_plus")
_SHOWN = ("image_id", "source_uri", "face_score", "mse", "psnr", "ssim", "identity_distance")
_IMAGES = ("image_id", "output_image", "aligned_image", "mix_images")
HIST_SAMPLE = 50_000  # values per histogram (a deterministic sample above that)
PCA_SAMPLE = 2_000  # points in the PCA scatter
MAX_ERROR_GROUPS = 500  # distinct (status, message) groups listed; the rest counted together


@dataclass
class Cell:
    """One image (or a note where there is none) in a contact-sheet row."""

    label: str
    src: str | None = None
    note: str = ""


@dataclass
class SheetRow:
    image_id: str
    source_uri: str
    caption: str
    cells: list[Cell] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# reading


def _col(table, name: str) -> list:
    return table[name].to_pylist() if name in table.column_names else [None] * table.num_rows


def sample_key(seed: int, image_id: str) -> int:
    """The row's place in the seeded sample order (the sample is the rows with the smallest keys,
    whichever process reads which file)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{image_id}".encode(), digest_size=8).digest(), "big")


class BottomK:
    """The `k` offered items with the smallest keys (ties broken by `tie`): mergeable, so shards
    give the same result as one pass."""

    def __init__(self, k: int):
        self.k, self._heap = k, []  # max-heap by (key, tie) through negation

    def offer(self, key: float, tie: str, item: Any) -> None:
        entry = (-key, _Neg(tie), item)
        if len(self._heap) < self.k:
            heapq.heappush(self._heap, entry)
        elif self.k and entry[:2] > self._heap[0][:2]:
            heapq.heapreplace(self._heap, entry)

    def merge(self, other: BottomK) -> None:
        for key, tie, item in other._heap:
            self.offer(-key, tie.value, item)

    def items(self) -> list:
        return [item for _, _, item in sorted(self._heap, key=lambda e: (-e[0], e[1].value))]

    def __len__(self) -> int:
        return len(self._heap)


class _Neg:
    """A string that sorts in reverse (the max-heap's tie-break)."""

    __slots__ = ("value",)

    def __init__(self, value: str):
        self.value = value

    def __lt__(self, other: _Neg) -> bool:
        return self.value > other.value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Neg) and self.value == other.value

    def __reduce__(self):
        return (_Neg, (self.value,))


class ReportStats:
    """Everything the page shows of a table, folded from column batches (`add`) and mergeable
    across shards (`merge`), in memory bounded by the page's size, not the table's."""

    def __init__(self, sample: int = 12, n_extreme: int = 6, seed: int = 0):
        self.seed, self.n = seed, 0
        self.counts: Counter = Counter()
        self.runs: dict[str, dict] = {}
        self.sample = BottomK(sample)
        self.extremes = {m: (BottomK(n_extreme), BottomK(n_extreme)) for m in RANK_METRICS}  # worst, best
        self.hist_n: Counter = Counter()
        self.hist = {c: BottomK(HIST_SAMPLE) for c in HIST_COLUMNS}
        self.errors: dict[tuple[str, str], list] = {}
        self.other_errors = 0
        self.w_n, self.w_sum, self.w_outer = 0, None, None
        self.w_points = BottomK(PCA_SAMPLE)
        self.ok_tasks: Counter = Counter()
        self.ok_runs: Counter = Counter()
        self.w_error: str | None = None

    def add(self, batch, file: str = "") -> None:
        cols = {c: _col(batch, c) for c in _LIGHT if c != "w_plus"}
        n = batch.num_rows
        self.n += n
        keys = [sample_key(self.seed, i) for i in cols["image_id"]]
        ok_rows = []
        for i in range(n):
            status = cols["status"][i] or "(null)"
            self.counts[status] += 1
            self._run(cols, i, status)
            if status == "ok":
                ok_rows.append(i)
            else:
                self._error(status, cols["error"][i], cols["source_uri"][i])
        for i in ok_rows:
            shown = {c: cols[c][i] for c in _SHOWN}
            shown["file"] = file
            self.sample.offer(keys[i], cols["image_id"][i], shown)
            self.ok_tasks[cols["task"][i] or "(none)"] += 1
            self.ok_runs[cols["run_id"][i] or "(none)"] += 1
            for metric, lower_better in RANK_METRICS.items():
                v = cols[metric][i]
                if v is not None and np.isfinite(v):
                    worst, best = self.extremes[metric]
                    worst.offer(-v if lower_better else v, cols["image_id"][i], shown)
                    best.offer(v if lower_better else -v, cols["image_id"][i], shown)
        for c in HIST_COLUMNS:
            for i, v in enumerate(cols[c]):
                if v is not None and np.isfinite(v):
                    self.hist_n[c] += 1
                    self.hist[c].offer(keys[i], cols["image_id"][i], float(v))
        if ok_rows and "w_plus" in batch.schema.names:
            self._latents(batch, ok_rows, keys, cols)

    def _run(self, cols: dict, i: int, status: str) -> None:
        r = cols["run_id"][i] or "(none)"
        d = self.runs.setdefault(r, {"run_id": r, "rows": 0, "ok": 0, "first": None, "last": None,
                                     "checkpoints": set(), "tasks": set()})
        d["rows"] += 1
        d["ok"] += status == "ok"
        t = cols["processed_at"][i]
        if t is not None:
            d["first"] = t if d["first"] is None else min(d["first"], t)
            d["last"] = t if d["last"] is None else max(d["last"], t)
        if cols["checkpoint_sha256"][i]:
            d["checkpoints"].add(cols["checkpoint_sha256"][i][:12])
        if cols["task"][i]:
            d["tasks"].add(cols["task"][i])

    def _error(self, status: str, message: str | None, uri: str | None) -> None:
        group = self.errors.get((status, error_key(message, uri)))
        if group is None:
            if len(self.errors) >= MAX_ERROR_GROUPS:
                self.other_errors += 1
                return
            group = self.errors[(status, error_key(message, uri))] = [0, []]
        group[0] += 1
        if len(group[1]) < 3:
            group[1].append(uri)

    def _latents(self, batch, ok_rows: list[int], keys: list[int], cols: dict) -> None:
        from schemas import w_plus_to_numpy

        try:
            w = w_plus_to_numpy(batch.take(pa.array(ok_rows))).mean(axis=1, dtype=np.float64)
        except (ValueError, KeyError) as e:
            self.w_error = self.w_error or str(e)
            return
        self.w_n += len(w)
        self.w_sum = w.sum(axis=0) if self.w_sum is None else self.w_sum + w.sum(axis=0)
        outer = w.T @ w
        self.w_outer = outer if self.w_outer is None else self.w_outer + outer
        for row, i in zip(w.astype(np.float32), ok_rows):
            self.w_points.offer(keys[i], cols["image_id"][i],
                                (row, cols["task"][i] or "(none)", cols["run_id"][i] or "(none)"))

    def merge(self, other: ReportStats) -> None:
        self.n += other.n
        self.counts.update(other.counts)
        for r, o in other.runs.items():
            d = self.runs.setdefault(r, {**o, "rows": 0, "ok": 0, "first": None, "last": None,
                                         "checkpoints": set(), "tasks": set()})
            d["rows"] += o["rows"]
            d["ok"] += o["ok"]
            d["first"] = min((t for t in (d["first"], o["first"]) if t is not None), default=None)
            d["last"] = max((t for t in (d["last"], o["last"]) if t is not None), default=None)
            d["checkpoints"] |= o["checkpoints"]
            d["tasks"] |= o["tasks"]
        self.sample.merge(other.sample)
        for m, (worst, best) in other.extremes.items():
            self.extremes[m][0].merge(worst)
            self.extremes[m][1].merge(best)
        self.hist_n.update(other.hist_n)
        for c, h in other.hist.items():
            self.hist[c].merge(h)
        for key, (count, examples) in other.errors.items():
            if key not in self.errors and len(self.errors) >= MAX_ERROR_GROUPS:
                self.other_errors += count
                continue
            group = self.errors.setdefault(key, [0, []])
            group[0] += count
            group[1] = (group[1] + examples)[:3]
        self.other_errors += other.other_errors
        self.ok_tasks.update(other.ok_tasks)
        self.ok_runs.update(other.ok_runs)
        self.w_error = self.w_error or other.w_error
        if other.w_n:
            self.w_n += other.w_n
            self.w_sum = other.w_sum if self.w_sum is None else self.w_sum + other.w_sum
            self.w_outer = other.w_outer if self.w_outer is None else self.w_outer + other.w_outer
        self.w_points.merge(other.w_points)

    # -- what the page shows
    def run_history(self) -> list[dict]:
        """Per run_id: rows, ok, failed, first/last processed_at, checkpoints, tasks; oldest first."""
        out = []
        for d in self.runs.values():
            out.append({**d, "failed": d["rows"] - d["ok"], "checkpoints": ", ".join(sorted(d["checkpoints"])) or "-",
                        "tasks": ", ".join(sorted(d["tasks"])) or "-"})
        far = _dt.datetime.max.replace(tzinfo=_dt.timezone.utc)
        return sorted(out, key=lambda d: (d["first"] or far, d["run_id"]))

    def error_groups(self) -> list[dict]:
        """[{status, message, count, examples}] of the non-ok rows, most frequent first."""
        out = [{"status": s, "message": m, "count": c, "examples": ex} for (s, m), (c, ex) in self.errors.items()]
        out.sort(key=lambda g: (-g["count"], g["status"], g["message"]))
        if self.other_errors:
            out.append({"status": "(other)", "message": f"more than {MAX_ERROR_GROUPS} distinct messages",
                        "count": self.other_errors, "examples": []})
        return out

    def pca(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(mean [512], the first two principal axes [2, 512] (signs fixed: largest |loading| > 0),
        their explained variance ratios [2]) of every ok row's W+ (mean over styles), from the
        exact sums; None with fewer than 2 rows."""
        if self.w_n < 2:
            return None
        mean = self.w_sum / self.w_n
        cov = self.w_outer / self.w_n - np.outer(mean, mean)
        values, vectors = np.linalg.eigh((cov + cov.T) / 2)
        order = np.argsort(values)[::-1]
        values, axes = np.clip(values[order], 0, None), vectors[:, order[:2]].T
        axes = axes * np.sign(axes[np.arange(2), np.abs(axes).argmax(axis=1)])[:, None]
        total = values.sum()
        return mean, axes, (values[:2] / total if total > 0 else np.zeros(2))


# ----------------------------------------------------------------------------------------------
# images


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _thumb(data: bytes | None) -> tuple[str | None, str]:
    """Encoded image bytes -> (a JPEG thumbnail data URI, note); (None, why) when unreadable."""
    if not data:
        return None, "no image"

    from psp_core.images import open_untrusted

    try:
        with open_untrusted(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
    except Exception as e:
        return None, f"unreadable ({type(e).__name__})"
    return _data_uri(buf.getvalue(), "image/jpeg"), ""


def _read_source(uri: str, storage_options, limit: int = 64 << 20) -> bytes | None:
    from psp_core.uris import open_uri

    try:
        with open_uri(uri, "rb", storage_options) as f:
            data = f.read(limit + 1)
        return data if len(data) <= limit else None
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------
# plots


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _fig_uri(fig) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return _data_uri(buf.getvalue(), "image/png")


def histogram(values: Sequence[float], name: str, total: int | None = None) -> str | None:
    """A PNG data URI of the histogram of the finite `values` (None when there are none); `total`:
    how many values the table has when `values` is a sample of them."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.6, 2.4))
    ax.hist(v, bins=min(40, max(5, int(np.sqrt(len(v))))), color="#4c72b0")
    sampled = total is not None and total > len(v)
    ax.set_title(f"{name} (n={total if sampled else len(v)}, median {'~' if sampled else ''}{np.median(v):.4g})",
                 fontsize=9)
    ax.tick_params(labelsize=8)
    return _fig_uri(fig)


def pca_plot(stats: ReportStats) -> tuple[str | None, str]:
    """(PNG data URI of the 2-D PCA of the ok rows' W+ (mean over styles), note when there is none):
    axes from every row, points from the deterministic sample, grouped by task when the table holds
    several tasks, else by run."""
    found = stats.pca()
    if found is None:
        return None, f"W+ unavailable ({stats.w_error})" if stats.w_error else "needs at least 2 ok rows"
    mean, axes, ratio = found
    points = stats.w_points.items()
    by = "task" if len(stats.ok_tasks) > 1 else "run"
    totals = stats.ok_tasks if by == "task" else stats.ok_runs
    coords = (np.stack([p[0] for p in points]).astype(np.float64) - mean) @ axes.T
    groups = [p[1] if by == "task" else p[2] for p in points]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    for g in sorted(set(groups)):
        m = np.array([x == g for x in groups])
        ax.scatter(coords[m, 0], coords[m, 1], s=10, alpha=0.75, label=f"{g} ({totals[g]})")
    ax.set_xlabel(f"PC1 ({ratio[0]:.0%})", fontsize=8)
    ax.set_ylabel(f"PC2 ({ratio[1]:.0%})", fontsize=8)
    shown = f", {len(points)} shown" if len(points) < stats.w_n else ""
    ax.set_title(f"W+ (mean over styles) of {stats.w_n} ok rows{shown}, by {by}", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, loc="best")
    return _fig_uri(fig), ""


# ----------------------------------------------------------------------------------------------
# grouping


_ADDR = re.compile(r"\b0x[0-9a-fA-F]+\b")
_HEX = re.compile(r"\b[0-9a-f]{16,}\b")
_NUM = re.compile(r"\d+")


def error_key(message: str | None, source_uri: str | None) -> str:
    """An error message without its input's URI, hashes and numbers, so alike errors group."""
    text = (message or "").strip()
    if source_uri and text.startswith(source_uri):
        text = text[len(source_uri):].lstrip(": ")
    if source_uri:
        text = text.replace(source_uri, "<input>")
    text = _HEX.sub("<hash>", _ADDR.sub("<addr>", text))
    return _NUM.sub("N", text) or "(no message)"


# ----------------------------------------------------------------------------------------------
# the page


def build_report(
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
    sample: int = 12,
    n_extreme: int = 6,
    edits: str | None = None,
    seed: int = 0,
    read_inputs: bool = True,
) -> str:
    """The report on the output table at `uri` as one HTML string (see the module doc).

    sample: rows in the contact sheet (a seeded random sample of ok rows). n_extreme: rows in
    each worst/best list. edits: an edits table (`psp edit` OUTPUT) whose images join the
    contact sheet. read_inputs: thumbnail the original inputs (read from `source_uri`).
    """
    from pipelines.scan import read_rows, scan_table, table_files

    files = table_files(uri, storage_options)
    columns = [c for c in _LIGHT if c in files.schema.names]
    stats = scan_table(files, columns, partial(ReportStats, sample=sample, n_extreme=n_extreme, seed=seed))
    contact_rows = stats.sample.items()
    extremes = []
    for metric in RANK_METRICS:
        worst, best = stats.extremes[metric]
        extremes.append({"metric": metric, "missing": not len(worst), "worst": worst.items(), "best": best.items()})
    shown = contact_rows + [r for e in extremes for r in e["worst"] + e["best"]]

    images: dict[str, dict] = {}
    if shown:
        wanted: dict[str, set] = defaultdict(set)
        for r in shown:
            wanted[r["file"]].add(r["image_id"])
        img_table = read_rows(files, wanted, [c for c in _IMAGES if c in files.schema.names])
        for row_id, out_img, aligned, mixes in zip(_col(img_table, "image_id"), _col(img_table, "output_image"),
                                                   _col(img_table, "aligned_image"), _col(img_table, "mix_images")):
            images[row_id] = {"output": out_img, "aligned": aligned, "mixes": mixes or []}
    edit_cells = _edit_cells(edits, storage_options, {r["image_id"] for r in shown}) if edits else {}

    def sheet_row(r: dict) -> SheetRow:
        im = images.get(r["image_id"], {})
        cells = []
        if read_inputs:
            data = _read_source(r["source_uri"], storage_options)
            src, note = _thumb(data)
            cells.append(Cell("input", src, "not readable" if data is None else note))
        src, note = _thumb(im.get("aligned"))
        cells.append(Cell("aligned crop", src, "not stored (--save-aligned)" if im.get("aligned") is None else note))
        src, note = _thumb(im.get("output"))
        cells.append(Cell("reconstruction", src, note))
        for k, m in enumerate(im.get("mixes", [])[:4]):
            src, note = _thumb(m)
            cells.append(Cell(f"mix {k}", src, note))
        cells.extend(edit_cells.get(r["image_id"], []))
        caption = " · ".join(f"{name} {r[name]:.4g}" for name in _SHOWN[2:] if r.get(name) is not None)
        return SheetRow(r["image_id"], r["source_uri"], caption, cells)

    contact = [sheet_row(r) for r in contact_rows]
    for e in extremes:
        e["worst_rows"] = [sheet_row(r) for r in e["worst"]]
        e["best_rows"] = [sheet_row(r) for r in e["best"]]
    hists = [{"name": c, "src": histogram(stats.hist[c].items(), c, stats.hist_n[c])} for c in HIST_COLUMNS]
    pca_src, pca_note = pca_plot(stats)
    counts = sorted(stats.counts.items(), key=lambda kv: (-kv[1], kv[0]))
    from jinja2 import Environment, select_autoescape

    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
    return env.from_string(_TEMPLATE).render(
        uri=uri, generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        n=stats.n, n_ok=stats.counts.get("ok", 0), counts=counts, runs=stats.run_history(), contact=contact,
        extremes=extremes, hists=hists, pca_src=pca_src, pca_note=pca_note, errors=stats.error_groups(),
        edits=edits,
    )


def _edit_cells(edits_uri: str, storage_options, wanted: set[str]) -> dict[str, list[Cell]]:
    """{image_id: [Cell per edit, by direction then strength]} from an edits table."""
    from schemas import read_edits

    try:
        t = read_edits(edits_uri, storage_options, columns=["image_id", "direction", "strength", "status", "image"])
    except FileNotFoundError:
        return {}
    rows = [r for r in t.to_pylist() if r["image_id"] in wanted]
    out: dict[str, list[Cell]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: (r["image_id"], r["direction"], r["strength"])):
        src, note = _thumb(r["image"]) if r["status"] == "ok" else (None, r["status"])
        out[r["image_id"]].append(Cell(f"{r['direction']} {r['strength']:+g}", src, note))
    return out


def write_report(
    uri: str, html_path: str = "report.html", storage_options: Mapping[str, Any] | None = None, **kwargs: Any
) -> str:
    """Build the report on `uri` and write it to `html_path` (a path or fsspec URI); returns the path."""
    from psp_core.uris import is_local, open_uri

    page = build_report(uri, storage_options, **kwargs)
    with open_uri(html_path, "w", None if is_local(html_path) else storage_options, encoding="utf-8") as f:
        f.write(page)
    return html_path


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>psp report: {{ uri }}</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: .2em; } h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table.data { border-collapse: collapse; } table.data td, table.data th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; }
table.data td.num { text-align: right; font-variant-numeric: tabular-nums; }
.bar { display: inline-block; height: 10px; background: #4c72b0; vertical-align: middle; }
.bar.err { background: #c44e52; }
.sheet { display: flex; flex-direction: column; gap: 8px; }
.cells { display: flex; flex-wrap: wrap; gap: 6px; flex: 1; }
.srow { display: flex; gap: 6px; align-items: flex-start; border-bottom: 1px solid #eee; padding-bottom: 6px; }
.meta { flex: 0 0 220px; font-size: 11px; word-break: break-all; color: #555; }
figure { margin: 0; text-align: center; font-size: 11px; color: #555; }
figure img { display: block; width: 128px; height: auto; border: 1px solid #ccc; }
.missing { width: 128px; height: 128px; display: flex; align-items: center; justify-content: center;
           background: #f3f3f3; border: 1px dashed #bbb; font-size: 11px; color: #888; text-align: center; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; } .plots img { border: 1px solid #eee; }
.note { color: #888; font-style: italic; }
code { font-size: 12px; }
</style>
</head>
<body>
<h1>psp report</h1>
<p><code>{{ uri }}</code> · {{ n }} rows, {{ n_ok }} ok · generated {{ generated }}{% if edits %} · edits from <code>{{ edits }}</code>{% endif %}</p>

<h2 id="status">Status counts</h2>
{% if counts %}
<table class="data"><tr><th>status</th><th>rows</th><th></th></tr>
{% for s, c in counts %}<tr><td>{{ s }}</td><td class="num">{{ c }}</td>
<td><span class="bar{% if s != 'ok' %} err{% endif %}" style="width: {{ (300 * c / n) | round(0, 'ceil') | int }}px"></span> {{ '%.1f' % (100 * c / n) }}%</td></tr>
{% endfor %}</table>
{% else %}<p class="note">The table has no rows.</p>{% endif %}

<h2 id="runs">Run history</h2>
{% if runs %}
<table class="data"><tr><th>run_id</th><th>rows</th><th>ok</th><th>failed</th><th>first row</th><th>last row</th><th>checkpoint</th><th>task</th></tr>
{% for r in runs %}<tr><td><code>{{ r.run_id }}</code></td><td class="num">{{ r.rows }}</td><td class="num">{{ r.ok }}</td>
<td class="num">{{ r.failed }}</td><td>{{ r.first or '-' }}</td><td>{{ r.last or '-' }}</td><td><code>{{ r.checkpoints }}</code></td><td>{{ r.tasks }}</td></tr>
{% endfor %}</table>
{% else %}<p class="note">No runs.</p>{% endif %}

{% macro sheet(rows) %}<div class="sheet">
{% for row in rows %}<div class="srow"><div class="meta"><code>{{ row.image_id }}</code><br>{{ row.source_uri }}<br>{{ row.caption }}</div>
<div class="cells">{% for c in row.cells %}<figure>{% if c.src %}<img src="{{ c.src }}" alt="{{ c.label }}">{% else %}<div class="missing">{{ c.note }}</div>{% endif %}<figcaption>{{ c.label }}</figcaption></figure>
{% endfor %}</div></div>
{% endfor %}</div>{% endmacro %}

<h2 id="contact-sheet">Contact sheet ({{ contact | length }} random ok rows)</h2>
{% if contact %}{{ sheet(contact) }}{% else %}<p class="note">No ok rows to show.</p>{% endif %}

<h2 id="extremes">Worst and best rows</h2>
{% for e in extremes %}
<h3>by {{ e.metric }}</h3>
{% if e.missing %}<p class="note">No {{ e.metric }} values (run psp invert with --metrics).</p>
{% else %}<h4>worst {{ e.worst_rows | length }}</h4>{{ sheet(e.worst_rows) }}<h4>best {{ e.best_rows | length }}</h4>{{ sheet(e.best_rows) }}{% endif %}
{% endfor %}

<h2 id="histograms">Distributions</h2>
<div class="plots">
{% for h in hists %}{% if h.src %}<img src="{{ h.src }}" alt="histogram of {{ h.name }}">{% else %}<p class="note">{{ h.name }}: no values</p>{% endif %}
{% endfor %}</div>

<h2 id="pca">W+ (2-D PCA)</h2>
{% if pca_src %}<img src="{{ pca_src }}" alt="PCA of W+">{% else %}<p class="note">{{ pca_note }}</p>{% endif %}

<h2 id="errors">Errors by message</h2>
{% if errors %}
<table class="data"><tr><th>status</th><th>message</th><th>rows</th><th>examples</th></tr>
{% for g in errors %}<tr><td>{{ g.status }}</td><td>{{ g.message }}</td><td class="num">{{ g.count }}</td><td>{% for u in g.examples %}<code>{{ u }}</code><br>{% endfor %}</td></tr>
{% endfor %}</table>
{% else %}<p class="note">No errors.</p>{% endif %}
</body>
</html>
"""
