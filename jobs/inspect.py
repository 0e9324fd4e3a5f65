"""`psp inspect OUTPUT`: what is in an output folder, in words a user can act on."""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow.compute as pc

# Read everything except the large binary columns (images are only counted).
_SUMMARY_COLUMNS = [
    "image_id", "source_uri", "status", "error", "task", "image_format", "run_id", "processed_at",
]


def _w_plus_norms(uri, storage_options, head) -> dict:
    """{(image_id, processed_at): |w_plus|} for the rows of `head`, reading only as many files as
    needed (head rows come from the first files) instead of every latent in the folder."""
    from schemas.outputs import iter_output_tables

    wanted = set(zip(head["image_id"].to_pylist(), head["processed_at"].to_pylist()))
    found: dict = {}
    for _, t in iter_output_tables(uri, storage_options, ["image_id", "processed_at", "w_plus"]):
        keys = zip(t["image_id"].to_pylist(), t["processed_at"].to_pylist())
        for i, key in enumerate(keys):
            if key in wanted and key not in found:
                w = t["w_plus"][i].values
                found[key] = None if w is None else float(np.linalg.norm(w.to_numpy()))
        if len(found) == len(wanted):
            break
    return found


def inspect_output(
    uri: str, storage_options: Mapping[str, Any] | None = None, n_rows: int = 3
) -> str:
    """A text report on the psp outputs under `uri` (local path or fsspec URI).

    Covers: files and rows (with rows superseded by reruns), counts per status, schema version and
    n_styles, the schema, the first `n_rows` rows (image_id, source_uri, status, error, |w_plus|),
    how to get the images out of `output_image`, and the `_SUCCESS.json` summary if present.
    """
    from pipelines.sink import read_success
    from schemas.outputs import list_output_files, output_schema, read_outputs, schema_n_styles

    files = list_output_files(uri, storage_options)
    if not files:
        raise FileNotFoundError(f"no Parquet files under {uri!r}: has a run written there?")
    all_rows = read_outputs(uri, storage_options, columns=["image_id"], dedup=False).num_rows
    table = read_outputs(uri, storage_options, columns=_SUMMARY_COLUMNS)
    schema = table.schema
    n_styles = schema_n_styles(schema)
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}

    lines = [f"psp output: {uri}"]
    lines.append(
        f"  files: {len(files)} Parquet; rows: {table.num_rows} images"
        + (f" ({all_rows - table.num_rows} older rows superseded by reruns)" if all_rows > table.num_rows else "")
    )
    lines.append(f"  schema version: {meta.get('psp.schema_version')}   n_styles: {n_styles}"
                 f"   tensor shapes: {meta.get('psp.tensor_shapes')}")
    runs = Counter(table["run_id"].to_pylist())
    lines.append("  runs: " + ", ".join(f"{r} ({n} rows)" for r, n in sorted(runs.items())))
    lines.append("  status counts:")
    for status, n in sorted(Counter(table["status"].to_pylist()).items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"    {status:<14} {n}")
    tasks = Counter(t for t in table["task"].to_pylist() if t is not None)
    if tasks:
        lines.append("  tasks: " + ", ".join(f"{t} ({n})" for t, n in sorted(tasks.items())))

    lines.append("  schema:")
    for field in output_schema(n_styles):
        lines.append(f"    {field.name:<18} {field.type}{'' if field.nullable else ' not null'}")

    lines.append(f"  first {min(n_rows, table.num_rows)} rows:")
    head = table.slice(0, n_rows)
    norms = _w_plus_norms(uri, storage_options, head)
    for row in head.select(["image_id", "source_uri", "status", "error", "processed_at"]).to_pylist():
        w = norms.get((row["image_id"], row["processed_at"]))
        norm = f"{w:.3f}" if w is not None else "null"
        err = f"  error={row['error']!r}" if row["error"] else ""
        lines.append(
            f"    {row['image_id']}  {row['status']:<12} |w_plus|={norm}  {row['source_uri']}{err}"
        )

    # image_format says whether a row has bytes, without reading the (large) image column.
    formats = Counter(f for f in table["image_format"].to_pylist() if f not in (None, "none"))
    n_images = sum(formats.values())
    lines.append(
        f"  images: column `output_image` ({n_images} rows with bytes; formats "
        f"{dict(formats) or 'none'}). To extract them:"
    )
    lines.append("    from schemas import read_outputs")
    opts = ", storage_options=opts" if storage_options else ""
    lines.append(f"    t = read_outputs({uri!r}, columns=['image_id', 'output_image', 'image_format']{opts})")
    lines.append("    for r in t.to_pylist(): r['output_image'] and open(f\"{r['image_id']}.{r['image_format']}\", 'wb').write(r['output_image'])")
    lines.append("  latents: `ids, w = schemas.read_latents(uri)` -> w float32 [N, n_styles, 512] (status ok)")

    success = read_success(uri, storage_options)
    if success is None:
        lines.append("  _SUCCESS.json: absent (no run has finished writing here, or one is running)")
    else:
        lines.append("  _SUCCESS.json (latest finished run):")
        lines.extend("    " + line for line in json.dumps(success, indent=2, sort_keys=True).splitlines())
    ok = pc.sum(pc.equal(table["status"], "ok")).as_py() or 0
    lines.append(f"  ok: {ok}/{table.num_rows}")
    return "\n".join(lines) + "\n"
