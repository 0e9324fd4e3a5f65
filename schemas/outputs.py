"""Output schema v3: one row per input image (per face with `--faces all`) in the output Delta table,
and the helpers to build it.

v3 (from v2): `source_id` (the input's key, `image_id_for(source_uri)`, on every row), and per face
`face_index` (0 = best detector score), `face_count` (the input's face rows) and `face_box` [4].
With `--faces all` an input with several faces has one row per face; `image_id` is then
`schemas.ids.face_image_id(source_uri, face_index)` (face 0 keeps `image_id_for(source_uri)`).

Every run writes the same Arrow schema (all columns always present, null when unused). Delta Lake
has no fixed-size list type, so tensors are `list<float32>` (row-major, flattened); their shapes
live in the schema metadata (`psp.tensor_shapes`, and the table properties of the Delta table) and
`w_plus_to_numpy` / `schemas.read_latents` hand back `w_plus` as float32 `[N, n_styles, 512]`.

Writers build a batch with `rows_to_table` / `columns_to_table`; `schemas.table` reads the table.
Pure Arrow: no I/O here.
"""
from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

# The status vocabulary (and which statuses a rerun skips) lives in schemas.status.
from schemas.ids import face_image_id, image_id_for
from schemas.status import STATUSES

SCHEMA_VERSION = "3"
STYLE_DIM = 512
N_LANDMARKS = 68

IMAGE_FORMATS = ("png", "jpeg", "none")


META_VERSION = b"psp.schema_version"
META_N_STYLES = b"psp.n_styles"
META_SHAPES = b"psp.tensor_shapes"

# Columns that must be set on every row (non-nullable in the schema).
REQUIRED_COLUMNS = ("image_id", "source_id", "source_uri", "status", "run_id", "processed_at")
# The listing facts of the input a row was made from (what a nightly run compares).
SOURCE_FACTS = ("source_size", "source_mtime", "source_etag")
TENSOR_COLUMNS = ("landmarks", "quad", "face_box", "w_plus", "mix_w_plus", "iteration_w_plus")


def _list(item: pa.DataType) -> pa.DataType:
    # Child named "element", as Parquet's compliant nested type and Delta name it: what is written
    # reads back with an identical schema.
    return pa.list_(pa.field("element", item))


def output_schema(n_styles: int) -> pa.Schema:
    """The v3 output schema for a model with `n_styles` style vectors (18 for 1024², 8 for 32²).

    All columns are always present (null when a row or a run does not produce them: error rows,
    no `--mix`, no `--metrics`). Tensor columns are flattened float32 lists; their shapes are in the
    schema metadata `psp.tensor_shapes` (JSON): w_plus [n_styles, 512], landmarks [68, 2],
    quad [4, 2], face_box [4], mix_w_plus [-1, n_styles, 512] (per row, a list of flattened w_plus),
    iteration_w_plus [-1, n_styles, 512] (ReStyle with `--keep-iterations`: the W+ after each of the
    row's `n_iters` iterations, flattened into one list; the last equals w_plus).
    `model_family` is the checkpoint's family (psp, e4e, restyle_psp, restyle_e4e) and `n_iters` its
    refinement steps (1 for pSp and e4e).
    `image_id` keys the row, `source_id` the input (every row of an input has it; face 0's
    image_id equals it). `face_index`: 0 = the best detector score (the only face row with
    `--faces best|largest`), null on a row without a face; `face_count`: the input's face rows
    (null without a face); `face_box`: the dlib detection box (left, top, right, bottom; inclusive
    pixel coordinates in the upright source image).
    `source_size` / `source_mtime` / `source_etag` are the input's listing facts when the row was
    made (a nightly run compares them with the next listing).
    """
    if not isinstance(n_styles, (int, np.integer)) or isinstance(n_styles, bool) or n_styles < 1:
        raise ValueError(f"n_styles must be a positive int (18 for a 1024x1024 pSp), got {n_styles!r}")
    n_styles = int(n_styles)
    f32, s = pa.float32(), pa.string()
    w_plus_type = _list(f32)
    fields = [
        pa.field("image_id", s, nullable=False),
        pa.field("source_id", s, nullable=False),
        pa.field("source_uri", s, nullable=False),
        pa.field("source_size", pa.int64()),
        pa.field("source_mtime", pa.timestamp("us", tz="UTC")),
        pa.field("source_etag", s),
        pa.field("source_sha256", s),
        pa.field("source_width", pa.int32()),
        pa.field("source_height", pa.int32()),
        pa.field("status", s, nullable=False),
        pa.field("error", s),
        pa.field("face_score", f32),
        pa.field("face_index", pa.int32()),
        pa.field("face_count", pa.int32()),
        pa.field("face_box", _list(f32)),
        pa.field("landmarks", _list(f32)),
        pa.field("quad", _list(f32)),
        pa.field("task", s),
        pa.field("w_plus", w_plus_type),
        pa.field("model_family", s),
        pa.field("n_iters", pa.int32()),
        pa.field("iteration_w_plus", _list(f32)),
        pa.field("output_image", pa.binary()),
        pa.field("image_format", s),
        pa.field("aligned_image", pa.binary()),
        pa.field("mix_w_plus", _list(w_plus_type)),
        pa.field("mix_images", _list(pa.binary())),
        pa.field("mse", f32),
        pa.field("psnr", f32),
        pa.field("ssim", f32),
        pa.field("identity_distance", f32),
        pa.field("checkpoint_sha256", s),
        pa.field("code_version", s),
        pa.field("run_id", s, nullable=False),
        pa.field("processed_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
    shapes = {
        "w_plus": [n_styles, STYLE_DIM],
        "landmarks": [N_LANDMARKS, 2],
        "quad": [4, 2],
        "face_box": [4],
        "mix_w_plus": [-1, n_styles, STYLE_DIM],
        "iteration_w_plus": [-1, n_styles, STYLE_DIM],
    }
    metadata = {
        META_VERSION: SCHEMA_VERSION.encode(),
        META_N_STYLES: str(n_styles).encode(),
        META_SHAPES: json.dumps(shapes, sort_keys=True).encode(),
    }
    return pa.schema(fields, metadata=metadata)


COLUMNS: tuple[str, ...] = tuple(output_schema(1).names)

# Column -> shape of one element, for the tensor columns of fixed shape (w_plus depends on n_styles).
_FIXED_TENSORS = {"landmarks": (N_LANDMARKS, 2), "quad": (4, 2), "face_box": (4,)}


def schema_version(schema: pa.Schema) -> str | None:
    """The `psp.schema_version` of a schema (None when absent: not a psp output file)."""
    meta = schema.metadata or {}
    value = meta.get(META_VERSION)
    return value.decode() if value is not None else None


def schema_n_styles(schema: pa.Schema) -> int:
    """`n_styles` from a psp output schema's metadata."""
    meta = schema.metadata or {}
    if META_N_STYLES not in meta:
        raise ValueError("schema has no psp.n_styles metadata: is it a psp output schema?")
    return int(meta[META_N_STYLES])


def tensor_shapes(schema: pa.Schema) -> dict[str, list[int]]:
    """The per-element tensor shapes recorded in the schema metadata, e.g. {"w_plus": [18, 512]}."""
    meta = schema.metadata or {}
    if META_SHAPES not in meta:
        raise ValueError("schema has no psp.tensor_shapes metadata: is it a psp output schema?")
    return json.loads(meta[META_SHAPES])


# --------------------------------------------------------------------------------------------
# building tables


def _regular_list(flat: np.ndarray, size: int, mask: np.ndarray | None, type_: pa.DataType) -> pa.Array:
    """[n, size] float32 rows -> ListArray<float32> (every row `size` long), nulls where `mask`."""
    n = flat.shape[0]
    offsets = pa.array(np.arange(0, (n + 1) * size, size, dtype=np.int32))
    values = pa.array(flat.reshape(-1))
    if mask is None or not mask.any():
        return pa.ListArray.from_arrays(offsets, values, type=type_)
    return pa.ListArray.from_arrays(offsets, values, type=type_, mask=pa.array(mask))


def _tensor_array(
    name: str, values: Sequence[Any], shape: tuple[int, ...], type_: pa.DataType, row_ids: Sequence[str]
) -> pa.Array:
    """Column of per-row arrays of `shape` (or None) -> list<float32> (flattened) with nulls."""
    size = int(np.prod(shape))
    if isinstance(values, np.ndarray) and values.dtype != object:
        # A dense batch [B, *shape]: no nulls, no per-row loop.
        flat = np.ascontiguousarray(values, dtype=np.float32).reshape(len(values), -1)
        if flat.shape[1] != size:
            raise ValueError(f"column {name!r} has shape {values.shape[1:]}, expected {shape}")
        return _regular_list(flat, size, None, type_)
    n = len(values)
    flat = np.zeros((n, size), dtype=np.float32)
    mask = np.zeros(n, dtype=bool)
    for i, v in enumerate(values):
        if v is None:
            mask[i] = True
            continue
        a = np.asarray(v, dtype=np.float32)
        if a.size != size:
            raise ValueError(
                f"row {row_ids[i]!r}: column {name!r} has shape {a.shape}, expected {shape} "
                f"({size} values); pass None for a missing value"
            )
        flat[i] = a.reshape(-1)
    return _regular_list(flat, size, mask, type_)


def _mix_w_plus_array(
    values: Sequence[Any], n_styles: int, list_type: pa.DataType, row_ids: Sequence[str]
) -> pa.Array:
    """Per-row [n_mix, n_styles, 512] arrays (or None) -> list<list<float32>>."""
    size = n_styles * STYLE_DIM
    offsets = [0]
    chunks: list[np.ndarray] = []
    mask = []
    for i, v in enumerate(values):
        if v is None:
            mask.append(True)
            offsets.append(offsets[-1])
            continue
        a = np.asarray(v, dtype=np.float32)
        if a.size % size != 0 or (a.ndim == 3 and a.shape[1:] != (n_styles, STYLE_DIM)):
            raise ValueError(
                f"row {row_ids[i]!r}: mix_w_plus has shape {a.shape}, expected "
                f"[n_mix, {n_styles}, {STYLE_DIM}]; pass None when --mix is off"
            )
        chunks.append(a.reshape(-1, size))
        mask.append(False)
        offsets.append(offsets[-1] + chunks[-1].shape[0])
    flat = np.concatenate(chunks) if chunks else np.zeros((0, size), np.float32)
    inner = _regular_list(flat, size, None, list_type.value_type)
    return pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()), inner, type=list_type, mask=pa.array(mask, pa.bool_())
    )


def _iterations_array(
    values: Sequence[Any], n_styles: int, type_: pa.DataType, row_ids: Sequence[str]
) -> pa.Array:
    """Per-row [n_iters, n_styles, 512] arrays (or None) -> list<float32> (each row flattened)."""
    size = n_styles * STYLE_DIM
    if isinstance(values, np.ndarray) and values.dtype != object:
        # A dense batch [B, n_iters, n_styles, 512]: no nulls, no per-row loop.
        if values.ndim != 4 or values.shape[2:] != (n_styles, STYLE_DIM):
            raise ValueError(f"iteration_w_plus has shape {values.shape}, expected [B, n_iters, {n_styles}, {STYLE_DIM}]")
        flat = np.ascontiguousarray(values, dtype=np.float32).reshape(len(values), -1)
        return _regular_list(flat, flat.shape[1], None, type_)
    offsets = [0]
    chunks: list[np.ndarray] = []
    mask = []
    for i, v in enumerate(values):
        if v is None:
            mask.append(True)
            offsets.append(offsets[-1])
            continue
        a = np.asarray(v, dtype=np.float32)
        if a.size == 0 or a.size % size != 0 or (a.ndim == 3 and a.shape[1:] != (n_styles, STYLE_DIM)):
            raise ValueError(
                f"row {row_ids[i]!r}: iteration_w_plus has shape {a.shape}, expected "
                f"[n_iters, {n_styles}, {STYLE_DIM}]; pass None without --keep-iterations"
            )
        chunks.append(a.reshape(-1))
        mask.append(False)
        offsets.append(offsets[-1] + a.size)
    flat = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()), pa.array(flat), type=type_, mask=pa.array(mask, pa.bool_())
    )


def columns_to_table(columns: Mapping[str, Sequence[Any]], n_styles: int) -> pa.Table:
    """Build a v3 output table from a column dict (the batch-dict form Ray stages use).

    Each value is a sequence of length B (lists, numpy arrays). Tensor columns accept, per row, an
    array of the element shape (w_plus [n_styles,512], landmarks [68,2], quad [4,2], mix_w_plus
    [n_mix,n_styles,512], iteration_w_plus [n_iters,n_styles,512]) or None; a dense ndarray [B, ...] is taken without a per-row loop.
    Missing columns are null; `image_id` defaults to `face_image_id(source_uri, face_index)`
    (`image_id_for(source_uri)` without a face index), `source_id` to `image_id_for(source_uri)`
    and `processed_at` to now (UTC). Unknown column names raise ValueError (they would change the
    schema of one file and not the others).
    """
    schema = output_schema(n_styles)
    unknown = sorted(set(columns) - set(schema.names))
    if unknown:
        raise ValueError(
            f"unknown output column(s) {unknown}; schema v{SCHEMA_VERSION} columns are {list(schema.names)}"
        )
    if "source_uri" not in columns or "status" not in columns:
        raise ValueError("every output row needs 'source_uri' and 'status'")
    n = len(columns["source_uri"])
    for name, values in columns.items():
        if len(values) != n:
            raise ValueError(f"column {name!r} has {len(values)} values, source_uri has {n}")
    source_uris = list(columns["source_uri"])
    faces = columns.get("face_index")
    faces = [None] * n if faces is None else [None if f is None or f < 0 else int(f) for f in faces]
    ids = columns.get("image_id")
    ids = [face_image_id(u, f) if i is None else i for i, u, f in zip(ids or [None] * n, source_uris, faces)]
    sources = columns.get("source_id")
    sources = [image_id_for(u) if i is None else i for i, u in zip(sources or [None] * n, source_uris)]

    arrays: list[pa.Array] = []
    for field in schema:
        name = field.name
        if name == "image_id":
            values: Any = ids
        elif name == "source_id":
            values = sources
        elif name == "face_index":
            values = faces if "face_index" in columns else None
        elif name == "processed_at":
            now = _dt.datetime.now(_dt.UTC)
            given = columns.get(name)
            values = [now if v is None else v for v in given] if given is not None else [now] * n
        else:
            values = columns.get(name)

        if values is None:
            if not field.nullable:
                raise ValueError(f"column {name!r} is required on every output row")
            arrays.append(pa.nulls(n, field.type))
        elif name == "w_plus":
            arrays.append(_tensor_array(name, values, (n_styles, STYLE_DIM), field.type, ids))
        elif name in _FIXED_TENSORS:
            arrays.append(_tensor_array(name, values, _FIXED_TENSORS[name], field.type, ids))
        elif name == "mix_w_plus":
            arrays.append(_mix_w_plus_array(values, n_styles, field.type, ids))
        elif name == "iteration_w_plus":
            arrays.append(_iterations_array(values, n_styles, field.type, ids))
        else:
            if isinstance(values, np.ndarray) and values.dtype != object:
                arr = pa.array(values).cast(field.type)
            else:
                arr = pa.array(list(values), type=field.type, from_pandas=True)
            if not field.nullable and arr.null_count:
                first = arr.to_pylist().index(None)
                raise ValueError(f"row {ids[first]!r}: column {name!r} must not be null")
            arrays.append(arr)
    return pa.Table.from_arrays(arrays, schema=schema)


def validate_tensors(table: pa.Table, n_styles: int) -> None:
    """ValueError naming the row when a tensor column of an output table has a row of the wrong
    length (list columns do not carry their length in the type, so a cast cannot catch it)."""
    import pyarrow.compute as pc

    sizes = {"w_plus": n_styles * STYLE_DIM, "landmarks": N_LANDMARKS * 2, "quad": 8, "face_box": 4}
    for name, size in sizes.items():
        col = table[name]
        bad = pc.and_(pc.is_valid(col), pc.not_equal(pc.list_value_length(col), size))
        if pc.any(bad).as_py():
            i = pc.index(bad, True).as_py()
            raise ValueError(f"row {table['image_id'][i]}: {name} has {pc.list_value_length(col)[i]} "
                             f"values, expected {size} (n_styles={n_styles})")
    mix = pc.list_flatten(table["mix_w_plus"])
    bad = pc.and_(pc.is_valid(mix), pc.not_equal(pc.list_value_length(mix), n_styles * STYLE_DIM))
    if len(mix) and pc.any(bad).as_py():
        raise ValueError(f"mix_w_plus has an entry that is not {n_styles}x{STYLE_DIM} values")
    if "iteration_w_plus" in table.column_names:
        # each kept row holds n_iters x n_styles x 512 values (a null n_iters is wrong too)
        col = table["iteration_w_plus"]
        expected = pc.multiply(table["n_iters"].cast(pa.int64()), n_styles * STYLE_DIM)
        bad = pc.and_(pc.is_valid(col), pc.fill_null(
            pc.not_equal(expected, pc.list_value_length(col).cast(pa.int64())), True))
        if len(col) and pc.any(bad).as_py():
            i = pc.index(bad, True).as_py()
            raise ValueError(f"row {table['image_id'][i]}: iteration_w_plus has {pc.list_value_length(col)[i]} "
                             f"values, expected n_iters x {n_styles} x {STYLE_DIM} (n_iters={table['n_iters'][i]})")


def rows_to_table(rows: Sequence[Mapping[str, Any]], n_styles: int) -> pa.Table:
    """Build a v3 output table from row dicts (see `columns_to_table` for the accepted values).

    Example: `rows_to_table([{"source_uri": "s3://b/a.jpg", "status": "ok", "w_plus": w,
    "run_id": "r1"}], n_styles=18)` with `w` a float32 array [18, 512].
    """
    names = set()
    for r in rows:
        names.update(r)
    if not rows:
        return output_schema(n_styles).empty_table()
    columns = {name: [r.get(name) for r in rows] for name in names}
    return columns_to_table(columns, n_styles)


# --------------------------------------------------------------------------------------------
# JSON export


def schema_to_json(schema: pa.Schema) -> dict:
    """A JSON-able description of a schema: fields (name, Arrow type, nullable) and metadata."""
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    for key, value in list(meta.items()):
        if key == META_SHAPES.decode():
            meta[key] = json.loads(value)
    return {
        "fields": [
            {"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema
        ],
        "metadata": dict(sorted(meta.items())),
    }


EXPORT_N_STYLES = 18  # the released 1024x1024 checkpoints


def export_json() -> dict:
    """The committed `schemas/output_v3.json`: schema v3 shown for n_styles=18 (1024² models)."""
    return {
        "name": "psp output",
        "schema_version": SCHEMA_VERSION,
        "generated_by": "python -m schemas export",
        "note": (
            "shown for n_styles=18 (1024x1024 checkpoints). The output is a Delta Lake table whose "
            "current version holds one row per input (per face with --faces all: source_id keys the "
            "input, image_id the row); w_plus is a list of n_styles*512 float32 "
            "(row-major), reshape with psp.tensor_shapes (schema metadata and table properties). "
            "Read with schemas.read_outputs / schemas.read_latents, or any Delta reader."
        ),
        "statuses": list(STATUSES),
        "image_formats": list(IMAGE_FORMATS),
        "schema": schema_to_json(output_schema(EXPORT_N_STYLES)),
    }


# `python -m schemas export` writes each entry next to this module.
JSON_EXPORTS = {f"output_v{SCHEMA_VERSION}.json": export_json}


def w_plus_to_numpy(table: pa.Table) -> np.ndarray:
    """The `w_plus` column of an output table as float32 [N, n_styles, 512] (no null rows allowed).

    The shape comes from the schema metadata; a row of another length raises ValueError."""
    col = table["w_plus"]
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if col.null_count:
        raise ValueError("w_plus has null rows (error rows): filter status == 'ok' first")
    shape = tensor_shapes(table.schema)["w_plus"]
    size = int(np.prod(shape))
    import pyarrow.compute as pc

    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if len(col) and (lengths != size).any():
        bad = int(np.flatnonzero(lengths != size)[0])
        raise ValueError(f"w_plus row {bad} has {lengths[bad]} values, expected {shape} = {size}")
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(col), *shape).astype(np.float32, copy=False)
