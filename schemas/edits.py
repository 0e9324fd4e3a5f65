"""Edits schema v1: one row per (input latent x direction x strength) written by `psp edit`.

`w_plus` is a plain `list<float32>` of `n_styles * 512` values (Delta Lake has no fixed-size list
type, so the column is Delta-ready as it is); its shape is in the schema metadata
(`psp.tensor_shapes`) and `edits_w_plus_to_numpy` hands it back as `[N, n_styles, 512]`.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

EDITS_SCHEMA_VERSION = "1"
STYLE_DIM = 512
META_EDITS_VERSION = b"psp.edits_schema_version"
META_N_STYLES = b"psp.n_styles"
META_SHAPES = b"psp.tensor_shapes"
EDIT_STATUSES = ("ok", "edit_error")


def edits_schema(n_styles: int) -> pa.Schema:
    """The edits schema for latents with `n_styles` styles. Every column is always present."""
    if not isinstance(n_styles, (int, np.integer)) or isinstance(n_styles, bool) or n_styles < 1:
        raise ValueError(f"n_styles must be a positive int (18 for a 1024x1024 generator), got {n_styles!r}")
    s, f32 = pa.string(), pa.float32()
    fields = [
        pa.field("edit_id", s, nullable=False),
        pa.field("image_id", s, nullable=False),
        pa.field("source_uri", s, nullable=False),
        pa.field("direction", s, nullable=False),
        pa.field("direction_kind", s),
        pa.field("direction_sha256", s),
        pa.field("strength", f32, nullable=False),
        pa.field("status", s, nullable=False),
        pa.field("error", s),
        pa.field("w_plus", pa.list_(pa.field("element", f32))),
        pa.field("image", pa.binary()),
        pa.field("image_format", s),
        pa.field("generator_sha256", s),
        pa.field("code_version", s),
        pa.field("run_id", s, nullable=False),
        pa.field("processed_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
    metadata = {
        META_EDITS_VERSION: EDITS_SCHEMA_VERSION.encode(),
        META_N_STYLES: str(int(n_styles)).encode(),
        META_SHAPES: json.dumps({"w_plus": [int(n_styles), STYLE_DIM]}).encode(),
    }
    return pa.schema(fields, metadata=metadata)


EDIT_COLUMNS: tuple[str, ...] = tuple(edits_schema(1).names)


def edit_id_for(image_id: str, direction: str, strength: float) -> str:
    """Row key: the first 32 hex chars of sha256 of `image_id|direction|strength` (float32 repr)."""
    key = f"{image_id}|{direction}|{float(np.float32(strength))!r}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def edit_columns_to_table(columns: Mapping[str, Sequence[Any]], n_styles: int) -> pa.Table:
    """A batch of edit rows (column -> B values) as an edits-schema table.

    `w_plus`: a dense float32 array `[B, n_styles, 512]` or per row an array / None. `edit_id`
    defaults to `edit_id_for(...)`, `processed_at` to now. Unknown columns raise ValueError.
    """
    schema = edits_schema(n_styles)
    unknown = sorted(set(columns) - set(schema.names))
    if unknown:
        raise ValueError(f"unknown edit column(s) {unknown}; the edits schema has {list(schema.names)}")
    n = len(columns["image_id"])
    cols = dict(columns)
    if cols.get("edit_id") is None:
        cols["edit_id"] = [
            edit_id_for(i, d, s) for i, d, s in zip(cols["image_id"], cols["direction"], cols["strength"])
        ]
    if cols.get("processed_at") is None:
        cols["processed_at"] = [_dt.datetime.now(_dt.timezone.utc)] * n
    arrays = []
    for field in schema:
        values = cols.get(field.name)
        if values is None:
            if not field.nullable:
                raise ValueError(f"edit column {field.name!r} is required on every row")
            arrays.append(pa.nulls(n, field.type))
        elif field.name == "w_plus":
            arrays.append(_w_plus_array(values, n_styles, field.type))
        else:
            vals = values.tolist() if isinstance(values, np.ndarray) else list(values)
            arrays.append(pa.array(vals, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _w_plus_array(values: Any, n_styles: int, type_: pa.DataType) -> pa.Array:
    size = n_styles * STYLE_DIM
    if isinstance(values, np.ndarray) and values.dtype != object:
        flat = np.ascontiguousarray(values, dtype=np.float32).reshape(len(values), -1)
        if flat.shape[1] != size:
            raise ValueError(f"w_plus has shape {values.shape[1:]}, expected [{n_styles}, {STYLE_DIM}]")
        offsets = pa.array(np.arange(len(flat) + 1, dtype=np.int32) * size)
        return pa.ListArray.from_arrays(offsets, pa.array(flat.reshape(-1)), type=type_)
    rows = [None if v is None else np.asarray(v, dtype=np.float32).reshape(-1) for v in values]
    for r in rows:
        if r is not None and r.size != size:
            raise ValueError(f"w_plus row has {r.size} values, expected {n_styles} x {STYLE_DIM}")
    return pa.array([None if r is None else r for r in rows], type=type_)


def edits_w_plus_to_numpy(table: pa.Table) -> np.ndarray:
    """The `w_plus` column of an edits table as float32 `[N, n_styles, 512]` (no null rows)."""
    col = table["w_plus"].combine_chunks()
    if col.null_count:
        raise ValueError("w_plus has null rows (edit_error rows): filter status == 'ok' first")
    meta = table.schema.metadata or {}
    shape = json.loads(meta[META_SHAPES])["w_plus"] if META_SHAPES in meta else [-1, STYLE_DIM]
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), *shape).astype(np.float32, copy=False)


def read_edits(
    uri: str, storage_options: Mapping[str, Any] | None = None, columns: Sequence[str] | None = None
) -> pa.Table:
    """The edits Delta table at `uri` (what `psp edit` wrote), the latest row per `edit_id` (a
    rerun replaces, never duplicates); `columns` restricts what is read (e.g. leave out `image`).
    Raises FileNotFoundError when there is none."""
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    from schemas.table import arrow_filesystem, delta_storage_options, table_uri

    if columns is not None:
        unknown = sorted(set(columns) - set(EDIT_COLUMNS))
        if unknown:
            raise ValueError(f"unknown edit column(s) {unknown}; the edits schema has {list(EDIT_COLUMNS)}")
    path, opts = table_uri(uri), delta_storage_options(uri, storage_options)
    if not DeltaTable.is_deltatable(path, storage_options=opts):
        raise FileNotFoundError(f"no edits table at {uri!r} (no _delta_log): has `psp edit` written there?")
    read = None if columns is None else list(dict.fromkeys([*columns, "edit_id", "processed_at"]))
    table = DeltaTable(path, storage_options=opts).to_pyarrow_table(
        columns=read, filesystem=arrow_filesystem(uri, storage_options))
    if "w_plus" in table.column_names and table.num_rows:
        n_styles = len(table["w_plus"][0]) // STYLE_DIM if table["w_plus"][0].is_valid else 1
        table = table.replace_schema_metadata(edits_schema(max(n_styles, 1)).metadata)
    n = table.num_rows
    order = pc.sort_indices(
        pa.table({"edit_id": table["edit_id"], "processed_at": table["processed_at"],
                  "row": pa.array(np.arange(n, dtype=np.int64))}),
        sort_keys=[("edit_id", "ascending"), ("processed_at", "ascending"), ("row", "ascending")],
    ).to_numpy()
    ids = table["edit_id"].take(order).to_numpy(zero_copy_only=False)
    last = np.ones(n, dtype=bool)
    last[:-1] = ids[:-1] != ids[1:]
    keep = np.sort(order[last])
    table = table.take(pa.array(keep)) if len(keep) < n else table
    return table if columns is None else table.select(list(columns))


def export_json() -> dict:
    """The committed `schemas/edits_v1.json` (shown for n_styles=18)."""
    from schemas.outputs import schema_to_json

    return {
        "name": "psp edits",
        "schema_version": EDITS_SCHEMA_VERSION,
        "generated_by": "python -m schemas export",
        "note": (
            "one row per (input latent x direction x strength), written by `psp edit`; w_plus is a "
            "list of n_styles*512 float32 (reshape with metadata psp.tensor_shapes); read with "
            "schemas.read_edits"
        ),
        "statuses": list(EDIT_STATUSES),
        "schema": schema_to_json(edits_schema(18)),
    }


JSON_EXPORTS = {"edits_v1.json": export_json}
