"""`psp report OUTPUT`: one self-contained HTML page about an output table.

Everything is inlined (images as data URIs, plots as PNG data URIs, CSS in the page) and a Content
Security Policy forbids any other load, so the file opens offline in any browser, without a server.
Sections: status counts, run history, a contact sheet of a sample (input | aligned crop |
reconstruction | mixes or edits), worst and best rows by MSE / identity distance, histograms of
the per-row numbers, a 2-D PCA of W+ (mean over styles), errors grouped by message. A section the
table cannot fill (no metrics, no ok rows, an empty table) says so instead of failing.

Reads only through `schemas.read_outputs` (and `schemas.read_edits` for `--edits`).
"""
from __future__ import annotations

import base64
import datetime as _dt
import io
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

THUMB = 128  # px, longest side of the thumbnails in the page
HIST_COLUMNS = ("face_score", "mse", "psnr", "ssim", "identity_distance")
# Metric -> True when lower is better.
RANK_METRICS = {"mse": True, "identity_distance": True}
_LIGHT = ("image_id", "source_uri", "status", "error", "face_score", "task", "mse", "psnr", "ssim",
          "identity_distance", "checkpoint_sha256", "run_id", "processed_at", "image_format")
_IMAGES = ("image_id", "output_image", "aligned_image", "mix_images")


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


def _read(uri: str, storage_options, columns: Sequence[str]):
    """read_outputs restricted to the columns this table has (a table from another schema
    version may lack some); the whole table when the reader refuses the list."""
    from schemas import read_outputs

    try:
        return read_outputs(uri, storage_options, columns=list(columns))
    except ValueError:
        table = read_outputs(uri, storage_options)
        return table.select([c for c in columns if c in table.column_names])


def _col(table, name: str) -> list:
    return table[name].to_pylist() if name in table.column_names else [None] * table.num_rows


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
    import fsspec

    try:
        with fsspec.open(uri, "rb", **dict(storage_options or {})) as f:
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


def histogram(values: Sequence[float], name: str) -> str | None:
    """A PNG data URI of the histogram of the finite `values` (None when there are none)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.6, 2.4))
    ax.hist(v, bins=min(40, max(5, int(np.sqrt(len(v))))), color="#4c72b0")
    ax.set_title(f"{name} (n={len(v)}, median {np.median(v):.4g})", fontsize=9)
    ax.tick_params(labelsize=8)
    return _fig_uri(fig)


def pca_2d(w_mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[N, 512]`` -> (coordinates ``[N, 2]`` on the first two principal axes, explained
    variance ratios ``[2]``), by numpy SVD of the centred rows (signs fixed: largest |loading| > 0)."""
    x = np.asarray(w_mean, np.float64)
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    k = min(2, vt.shape[0])
    axes = vt[:k]
    signs = np.sign(axes[np.arange(k), np.abs(axes).argmax(axis=1)])
    axes = axes * signs[:, None]
    coords = x @ axes.T
    total = (s ** 2).sum()
    ratio = (s[:k] ** 2) / total if total > 0 else np.zeros(k)
    if k < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - k)))
        ratio = np.pad(ratio, (0, 2 - k))
    return coords, ratio


def pca_plot(w_mean: np.ndarray, groups: Sequence[str], title: str) -> str | None:
    if len(w_mean) < 2:
        return None
    coords, ratio = pca_2d(w_mean)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.0))
    for g in sorted(set(groups)):
        m = np.array([x == g for x in groups])
        ax.scatter(coords[m, 0], coords[m, 1], s=10, alpha=0.75, label=f"{g} ({int(m.sum())})")
    ax.set_xlabel(f"PC1 ({ratio[0]:.0%})", fontsize=8)
    ax.set_ylabel(f"PC2 ({ratio[1]:.0%})", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=7, loc="best")
    return _fig_uri(fig)


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


def group_errors(statuses, errors, uris, examples: int = 3) -> list[dict]:
    """[{status, message, count, examples}] of the non-ok rows, most frequent first."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for s, e, u in zip(statuses, errors, uris):
        if s != "ok":
            groups[(s, error_key(e, u))].append(u)
    out = [{"status": s, "message": m, "count": len(us), "examples": us[:examples]} for (s, m), us in groups.items()]
    return sorted(out, key=lambda g: (-g["count"], g["status"], g["message"]))


def run_history(table) -> list[dict]:
    """Per run_id: rows, ok, failed, first/last processed_at, checkpoints, tasks; oldest first."""
    runs: dict[str, dict] = {}
    for r, s, t, ck, task in zip(_col(table, "run_id"), _col(table, "status"), _col(table, "processed_at"),
                                 _col(table, "checkpoint_sha256"), _col(table, "task")):
        d = runs.setdefault(r or "(none)", {"run_id": r or "(none)", "rows": 0, "ok": 0, "first": None, "last": None,
                                           "checkpoints": set(), "tasks": set()})
        d["rows"] += 1
        d["ok"] += s == "ok"
        if t is not None:
            d["first"] = t if d["first"] is None else min(d["first"], t)
            d["last"] = t if d["last"] is None else max(d["last"], t)
        if ck:
            d["checkpoints"].add(ck[:12])
        if task:
            d["tasks"].add(task)
    out = []
    for d in runs.values():
        d["failed"] = d["rows"] - d["ok"]
        d["checkpoints"] = ", ".join(sorted(d["checkpoints"])) or "-"
        d["tasks"] = ", ".join(sorted(d["tasks"])) or "-"
        out.append(d)
    far = _dt.datetime.max.replace(tzinfo=_dt.timezone.utc)
    return sorted(out, key=lambda d: (d["first"] or far, d["run_id"]))


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
    table = _read(uri, storage_options, _LIGHT)
    n = table.num_rows
    status = [s or "(null)" for s in _col(table, "status")]
    ids = _col(table, "image_id")
    uris = _col(table, "source_uri")
    ok_idx = [i for i in range(n) if status[i] == "ok"]

    counts = sorted(Counter(status).items(), key=lambda kv: (-kv[1], kv[0]))

    # -- which rows get images: a sample plus the extremes
    rng = np.random.default_rng(seed)
    sample_idx = sorted(rng.choice(ok_idx, size=min(sample, len(ok_idx)), replace=False).tolist()) if ok_idx else []
    extremes = []
    for metric, lower_better in RANK_METRICS.items():
        vals = _col(table, metric)
        scored = [(vals[i], i) for i in ok_idx if vals[i] is not None and np.isfinite(vals[i])]
        if not scored:
            extremes.append({"metric": metric, "worst": [], "best": [], "missing": True})
            continue
        scored.sort(reverse=lower_better)  # worst first
        k = min(n_extreme, len(scored))
        extremes.append({"metric": metric, "missing": False,
                         "worst": [i for _, i in scored[:k]], "best": [i for _, i in scored[::-1][:k]]})
    shown = set(sample_idx) | {i for e in extremes for i in e["worst"] + e["best"]}

    images: dict[str, dict] = {}
    if shown:
        wanted = {ids[i] for i in shown}
        img_table = _read(uri, storage_options, _IMAGES)
        for row_id, out_img, aligned, mixes in zip(_col(img_table, "image_id"), _col(img_table, "output_image"),
                                                   _col(img_table, "aligned_image"), _col(img_table, "mix_images")):
            if row_id in wanted:
                images[row_id] = {"output": out_img, "aligned": aligned, "mixes": mixes or []}
    edit_cells = _edit_cells(edits, storage_options, {ids[i] for i in shown}) if edits else {}

    def sheet_row(i: int, caption: str) -> SheetRow:
        im = images.get(ids[i], {})
        cells = []
        if read_inputs:
            data = _read_source(uris[i], storage_options)
            src, note = _thumb(data)
            cells.append(Cell("input", src, "not readable" if data is None else note))
        src, note = _thumb(im.get("aligned"))
        cells.append(Cell("aligned crop", src, "not stored (--save-aligned)" if im.get("aligned") is None else note))
        src, note = _thumb(im.get("output"))
        cells.append(Cell("reconstruction", src, note))
        for k, m in enumerate(im.get("mixes", [])[:4]):
            src, note = _thumb(m)
            cells.append(Cell(f"mix {k}", src, note))
        cells.extend(edit_cells.get(ids[i], []))
        return SheetRow(ids[i], uris[i], caption, cells)

    def caption(i: int) -> str:
        parts = []
        for name in ("face_score", "mse", "psnr", "ssim", "identity_distance"):
            v = _col(table, name)[i]
            if v is not None:
                parts.append(f"{name} {v:.4g}")
        return " · ".join(parts)

    contact = [sheet_row(i, caption(i)) for i in sample_idx]
    for e in extremes:
        e["worst_rows"] = [sheet_row(i, caption(i)) for i in e["worst"]]
        e["best_rows"] = [sheet_row(i, caption(i)) for i in e["best"]]

    hists = [{"name": c, "src": histogram(_col(table, c), c)} for c in HIST_COLUMNS]

    pca_src, pca_note = None, ""
    if len(ok_idx) >= 2:
        from schemas import w_plus_to_numpy

        lat = _read(uri, storage_options, ["image_id", "status", "task", "run_id", "w_plus"])
        keep = [i for i, s in enumerate(_col(lat, "status")) if s == "ok"]
        lat = lat.take(keep)
        try:
            w_mean = w_plus_to_numpy(lat).mean(axis=1)
            tasks = [t or "(none)" for t in _col(lat, "task")]
            by = "task" if len(set(tasks)) > 1 else "run"
            groups = tasks if by == "task" else [r or "(none)" for r in _col(lat, "run_id")]
            pca_src = pca_plot(w_mean, groups, f"W+ (mean over styles) of {len(w_mean)} ok rows, by {by}")
        except (ValueError, KeyError) as e:
            pca_note = f"W+ unavailable ({e})"
    else:
        pca_note = "needs at least 2 ok rows"

    errors = group_errors(status, _col(table, "error"), uris)
    from jinja2 import Environment, select_autoescape

    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
    return env.from_string(_TEMPLATE).render(
        uri=uri, generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        n=n, n_ok=len(ok_idx), counts=counts, runs=run_history(table), contact=contact, extremes=extremes,
        hists=hists, pca_src=pca_src, pca_note=pca_note, errors=errors, edits=edits,
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
    import fsspec

    page = build_report(uri, storage_options, **kwargs)
    with fsspec.open(html_path, "w", encoding="utf-8", **(dict(storage_options or {}) if "://" in html_path else {})) as f:
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
