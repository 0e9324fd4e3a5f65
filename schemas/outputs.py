"""Output schema v1: one Parquet row per input image, and the helpers to build and read it.

Every written file carries the same Arrow schema (all columns always present, null when unused), so
pyarrow, pandas, DuckDB and Ray read any mix of files from any run without schema merging. Tensors are
stored as fixed-size lists of float32; their shapes live in the schema metadata (`psp.tensor_shapes`)
and `read_latents` uses them to hand back `w_plus` as `[N, n_styles, 512]`.

Writers build a batch with `rows_to_table` / `columns_to_table`; readers use `read_outputs`
(deduplicated to the latest row per `image_id`) and `read_latents`.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

# The status vocabulary (and which statuses a rerun skips) lives in schemas.status.
from schemas.status import OK as STATUS_OK
from schemas.status import STATUSES

SCHEMA_VERSION = "1"
STYLE_DIM = 512
N_LANDMARKS = 68

IMAGE_FORMATS = ("png", "jpeg", "none")

META_VERSION = b"psp.schema_version"
META_N_STYLES = b"psp.n_styles"
META_SHAPES = b"psp.tensor_shapes"

# Columns that must be set on every row (non-nullable in the schema).
READ_THREADS = 16  # files read concurrently by read_outputs (I/O bound: object stores)

REQUIRED_COLUMNS = ("image_id", "source_uri", "status", "run_id", "processed_at")


def _list(item: pa.DataType, size: int = -1) -> pa.DataType:
    # Child named "element" as Parquet's compliant nested type names it: what is written reads
    # back with an identical schema.
    return pa.list_(pa.field("element", item), size)


def output_schema(n_styles: int) -> pa.Schema:
    """The v1 output schema for a model with `n_styles` style vectors (18 for 1024², 8 for 32²).

    All columns are always present (null when a row or a run does not produce them: error rows,
    no `--mix`, no `--metrics`). Tensor columns are fixed-size float32 lists; their shapes are in the
    schema metadata `psp.tensor_shapes` (JSON): w_plus [n_styles, 512], landmarks [68, 2],
    quad [4, 2], mix_w_plus [-1, n_styles, 512] (per row, a list of w_plus).
    """
    if not isinstance(n_styles, (int, np.integer)) or isinstance(n_styles, bool) or n_styles < 1:
        raise ValueError(f"n_styles must be a positive int (18 for a 1024x1024 pSp), got {n_styles!r}")
    n_styles = int(n_styles)
    f32, s = pa.float32(), pa.string()
    w_plus_type = _list(f32, n_styles * STYLE_DIM)
    fields = [
        pa.field("image_id", s, nullable=False),
        pa.field("source_uri", s, nullable=False),
        pa.field("source_sha256", s),
        pa.field("source_width", pa.int32()),
        pa.field("source_height", pa.int32()),
        pa.field("status", s, nullable=False),
        pa.field("error", s),
        pa.field("face_score", f32),
        pa.field("landmarks", _list(f32, N_LANDMARKS * 2)),
        pa.field("quad", _list(f32, 8)),
        pa.field("task", s),
        pa.field("w_plus", w_plus_type),
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
        "mix_w_plus": [-1, n_styles, STYLE_DIM],
    }
    metadata = {
        META_VERSION: SCHEMA_VERSION.encode(),
        META_N_STYLES: str(n_styles).encode(),
        META_SHAPES: json.dumps(shapes, sort_keys=True).encode(),
    }
    return pa.schema(fields, metadata=metadata)


COLUMNS: tuple[str, ...] = tuple(output_schema(1).names)

# Column -> shape of one element, for the fixed-size tensor columns (w_plus depends on n_styles).
_FIXED_TENSORS = {"landmarks": (N_LANDMARKS, 2), "quad": (4, 2)}


def image_id_for(source_uri: str) -> str:
    """Stable row key for an input: the first 32 hex chars of sha256(source_uri as UTF-8)."""
    if not isinstance(source_uri, str) or not source_uri:
        raise ValueError(f"source_uri must be a non-empty string, got {source_uri!r}")
    return hashlib.sha256(source_uri.encode("utf-8")).hexdigest()[:32]


def schema_version(schema: pa.Schema) -> str | None:
    """The `psp.schema_version` of a schema (None when absent: not a psp output file)."""
    meta = schema.metadata or {}
    value = meta.get(META_VERSION)
    return value.decode() if value is not None else None


def schema_n_styles(schema: pa.Schema) -> int:
    """`n_styles` from a v1 schema's metadata (falls back to the w_plus list size / 512)."""
    meta = schema.metadata or {}
    if META_N_STYLES in meta:
        return int(meta[META_N_STYLES])
    w_type = schema.field("w_plus").type
    return int(w_type.list_size) // STYLE_DIM


def tensor_shapes(schema: pa.Schema) -> dict[str, list[int]]:
    """The per-element tensor shapes recorded in the schema metadata, e.g. {"w_plus": [18, 512]}."""
    meta = schema.metadata or {}
    if META_SHAPES not in meta:
        raise ValueError("schema has no psp.tensor_shapes metadata: is it a psp output schema?")
    return json.loads(meta[META_SHAPES])


# --------------------------------------------------------------------------------------------
# building tables


def _fixed_tensor_array(
    name: str, values: Sequence[Any], shape: tuple[int, ...], type_: pa.DataType, row_ids: Sequence[str]
) -> pa.Array:
    """Column of per-row arrays (or None) -> FixedSizeListArray<float32>[prod(shape)] with nulls."""
    size = int(np.prod(shape))
    if isinstance(values, np.ndarray) and values.dtype != object:
        # A dense batch [B, *shape]: no nulls, zero-copy when already float32 and contiguous.
        flat = np.ascontiguousarray(values, dtype=np.float32).reshape(len(values), -1)
        if flat.shape[1] != size:
            raise ValueError(f"column {name!r} has shape {values.shape[1:]}, expected {shape}")
        return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), type=type_)
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
    return pa.FixedSizeListArray.from_arrays(
        pa.array(flat.reshape(-1)), type=type_, mask=pa.array(mask) if mask.any() else None
    )


def _mix_w_plus_array(
    values: Sequence[Any], n_styles: int, list_type: pa.DataType, row_ids: Sequence[str]
) -> pa.Array:
    """Per-row [n_mix, n_styles, 512] arrays (or None) -> list<fixed_size_list<float32>>."""
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
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), type=list_type.value_type)
    return pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()), inner, type=list_type, mask=pa.array(mask, pa.bool_())
    )


def columns_to_table(columns: Mapping[str, Sequence[Any]], n_styles: int) -> pa.Table:
    """Build a v1 output table from a column dict (the batch-dict form Ray stages use).

    Each value is a sequence of length B (lists, numpy arrays). Tensor columns accept, per row, an
    array of the element shape (w_plus [n_styles,512], landmarks [68,2], quad [4,2], mix_w_plus
    [n_mix,n_styles,512]) or None; a dense ndarray [B, ...] is taken without a per-row loop.
    Missing columns are null; `image_id` defaults to `image_id_for(source_uri)` and
    `processed_at` to now (UTC). Unknown column names raise ValueError (they would change the
    schema of one file and not the others).
    """
    schema = output_schema(n_styles)
    unknown = sorted(set(columns) - set(schema.names))
    if unknown:
        raise ValueError(
            f"unknown output column(s) {unknown}; schema v1 columns are {list(schema.names)}"
        )
    if "source_uri" not in columns or "status" not in columns:
        raise ValueError("every output row needs 'source_uri' and 'status'")
    n = len(columns["source_uri"])
    for name, values in columns.items():
        if len(values) != n:
            raise ValueError(f"column {name!r} has {len(values)} values, source_uri has {n}")
    source_uris = list(columns["source_uri"])
    ids = columns.get("image_id")
    ids = [image_id_for(u) if i is None else i for i, u in zip(ids or [None] * n, source_uris)]

    arrays: list[pa.Array] = []
    for field in schema:
        name = field.name
        if name == "image_id":
            values: Any = ids
        elif name == "processed_at":
            now = _dt.datetime.now(_dt.timezone.utc)
            given = columns.get(name)
            values = [now if v is None else v for v in given] if given is not None else [now] * n
        else:
            values = columns.get(name)

        if values is None:
            if not field.nullable:
                raise ValueError(f"column {name!r} is required on every output row")
            arrays.append(pa.nulls(n, field.type))
        elif name == "w_plus":
            arrays.append(_fixed_tensor_array(name, values, (n_styles, STYLE_DIM), field.type, ids))
        elif name in _FIXED_TENSORS:
            arrays.append(_fixed_tensor_array(name, values, _FIXED_TENSORS[name], field.type, ids))
        elif name == "mix_w_plus":
            arrays.append(_mix_w_plus_array(values, n_styles, field.type, ids))
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


def rows_to_table(rows: Sequence[Mapping[str, Any]], n_styles: int) -> pa.Table:
    """Build a v1 output table from row dicts (see `columns_to_table` for the accepted values).

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
    """The committed `schemas/output_v1.json`: schema v1 shown for n_styles=18 (1024² models)."""
    return {
        "name": "psp output",
        "schema_version": SCHEMA_VERSION,
        "generated_by": "python -m schemas export",
        "note": (
            "shown for n_styles=18 (1024x1024 checkpoints); w_plus is a fixed-size list of "
            "n_styles*512 float32, reshape with metadata psp.tensor_shapes. One row per input; "
            "read with schemas.read_outputs (latest row per image_id) or schemas.read_latents."
        ),
        "statuses": list(STATUSES),
        "image_formats": list(IMAGE_FORMATS),
        "schema": schema_to_json(output_schema(EXPORT_N_STYLES)),
    }


# `python -m schemas export` writes each entry next to this module.
JSON_EXPORTS = {"output_v1.json": export_json}


# --------------------------------------------------------------------------------------------
# reading


def _filesystem(uri: str, storage_options: Mapping[str, Any] | None):
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
    return fs, path


def _committed(uri: str, storage_options: Mapping[str, Any] | None):
    """For a nightly output (one with a committed manifest): (files, {image_id: run_id}) of the
    current rows; None for a plain output folder. Uncommitted (crashed) runs are never listed."""
    try:
        from schemas import manifest as mf
    except ImportError:  # pragma: no cover - manifest support is optional
        return None
    manifest, pointer = mf.read_manifest(uri, dict(storage_options or {}))
    if pointer is None:
        return None
    live = mf.live_entries(manifest)
    _, root = _filesystem(uri, storage_options)
    root = root.rstrip("/")
    files = sorted({f"{root}/{f}" for f in live["output_file"].to_pylist()})
    current = dict(zip(live["image_id"].to_pylist(), live["run_id"].to_pylist()))
    return files, current


def list_output_files(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Parquet files under `uri` (a folder or one file), sorted; skips `_*`/`.*` names (markers).

    For a nightly output (`_manifests/_CURRENT.json` present) only the files the committed manifest
    lists. Returns paths on the fsspec filesystem of `uri` (without the scheme for object stores).
    Raises FileNotFoundError when `uri` does not exist.
    """
    committed = _committed(uri, storage_options)
    if committed is not None:
        return committed[0]
    fs, path = _filesystem(uri, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"output {uri!r} does not exist: check the path and storage_options")
    if fs.isfile(path):
        return [path]
    base = path.rstrip("/")
    found = []
    for p in fs.find(path):
        rel = p[len(base):].lstrip("/") if p.startswith(base) else p.rsplit("/", 1)[-1]
        parts = rel.split("/")
        if any(part.startswith(("_", ".")) for part in parts):
            continue
        if p.endswith(".parquet"):
            found.append(p)
    return sorted(found)


def _read_file(fs, path: str, uri: str, columns: Sequence[str] | None) -> pa.Table:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        version = schema_version(schema)
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"{path!r} under {uri!r} has psp.schema_version={version!r}; this reader knows "
                f"version {SCHEMA_VERSION!r}. Move files that are not psp outputs out of the "
                "output folder, or upgrade psp-pipeline to read newer outputs."
            )
        table = pf.read(columns=list(columns) if columns is not None else None)
    n_styles = schema_n_styles(schema)
    target = output_schema(n_styles)
    if columns is not None:
        target = pa.schema([target.field(c) for c in columns], metadata=target.metadata)
    return table.select(target.names).cast(target)


def _output_readers(uri: str, storage_options: Mapping[str, Any] | None, columns: Sequence[str] | None):
    """[(path, read() -> table)] for the output files of `uri` (manifest-aware), in file order."""
    fs, _ = _filesystem(uri, storage_options)
    committed = _committed(uri, storage_options)
    if committed is None:
        return [
            (path, lambda path=path: _read_file(fs, path, uri, columns))
            for path in list_output_files(uri, storage_options)
        ]
    # Nightly output: from each listed file only the rows the manifest names as current.
    files, current = committed
    want = None if columns is None else list(dict.fromkeys([*columns, "image_id", "run_id"]))

    def read(path: str) -> pa.Table:
        table = _read_file(fs, path, uri, want)
        keep = [
            i
            for i, (image_id, run_id) in enumerate(
                zip(table["image_id"].to_pylist(), table["run_id"].to_pylist())
            )
            if image_id in current and current[image_id] in (None, run_id)
        ]
        table = table.take(pa.array(keep, pa.int64()))
        return table if columns is None else table.select(list(columns))

    return [(path, lambda path=path: read(path)) for path in files]


def iter_output_tables(
    uri: str, storage_options: Mapping[str, Any] | None = None, columns: Sequence[str] | None = None
) -> Iterator[tuple[str, pa.Table]]:
    """Yield (path, table) per output Parquet file under `uri`, in file-name order, no dedup.

    Lazy: a file is read when its turn comes. Each table is cast to the exact v1 schema
    (restricted to `columns`); a Parquet file that is not a v1 psp output raises ValueError naming
    it. For a nightly output only the rows its committed manifest names as current are yielded.
    """
    for path, read in _output_readers(uri, storage_options, columns):
        yield path, read()


def _latest_per_image(table: pa.Table) -> pa.Table:
    """Keep the last row per image_id by processed_at (ties: later file/row wins), in read order."""
    n = table.num_rows
    if n == 0:
        return table
    import pyarrow.compute as pc

    order = pc.sort_indices(
        pa.table(
            {
                "image_id": table["image_id"],
                "processed_at": table["processed_at"],
                "row": pa.array(np.arange(n, dtype=np.int64)),
            }
        ),
        sort_keys=[("image_id", "ascending"), ("processed_at", "ascending"), ("row", "ascending")],
    ).to_numpy()
    ids = table["image_id"].take(order).to_numpy(zero_copy_only=False)
    last = np.ones(n, dtype=bool)
    last[:-1] = ids[:-1] != ids[1:]
    keep = np.sort(order[last])
    if len(keep) == n:
        return table
    return table.take(pa.array(keep))


def read_outputs(
    uri: str,
    storage_options: Mapping[str, Any] | None = None,
    columns: Sequence[str] | None = None,
    dedup: bool = True,
) -> pa.Table:
    """Read every psp output Parquet file under `uri` (local path or fsspec URI) into one table.

    A nightly output (with a committed `_manifests/` manifest) is read through the manifest: only
    committed current rows. Otherwise every Parquet file under `uri` is read.
    Non-Parquet files and `_*`/`.*` names (`_SUCCESS.json`, `_runs/`) are ignored; a Parquet file
    without `psp.schema_version` "1" raises ValueError naming it. With `dedup` (default) only the
    latest row per `image_id` (by `processed_at`) is kept, so a rerun never shows duplicates.
    Rows come in file-name order, then row order. `columns` selects columns (the schema metadata,
    with the tensor shapes, is kept). For s3:// pass e.g. `storage_options={"key": ..., "secret":
    ..., "client_kwargs": {"endpoint_url": ...}}`.
    """
    if columns is not None:
        unknown = sorted(set(columns) - set(COLUMNS))
        if unknown:
            raise ValueError(f"unknown column(s) {unknown}; schema v1 columns are {list(COLUMNS)}")
    read_cols = None
    if columns is not None:
        read_cols = list(dict.fromkeys([*columns, *(("image_id", "processed_at") if dedup else ())]))
    readers = _output_readers(uri, storage_options, read_cols)
    if len(readers) > 1:
        # Object stores answer many small reads in parallel far faster than one after another.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(readers))) as pool:
            tables = list(pool.map(lambda pr: pr[1](), readers))
    else:
        tables = [read() for _, read in readers]
    if not tables:
        raise FileNotFoundError(
            f"no Parquet files under {uri!r}: has a run written there (psp invert ... --output)?"
        )
    n_styles = {int(t.schema.metadata[META_N_STYLES]) for t in tables}
    if len(n_styles) > 1:
        raise ValueError(
            f"outputs under {uri!r} mix models with n_styles {sorted(n_styles)}: "
            "write each model's outputs to its own folder"
        )
    table = pa.concat_tables(tables)
    if dedup:
        table = _latest_per_image(table)
    if columns is not None:
        table = table.select(list(columns))
    return table


def w_plus_to_numpy(table: pa.Table) -> np.ndarray:
    """The `w_plus` column of a v1 table as float32 [N, n_styles, 512] (no null rows allowed)."""
    col = table["w_plus"].combine_chunks()
    if col.null_count:
        raise ValueError("w_plus has null rows (error rows): filter status == 'ok' first")
    shape = tensor_shapes(table.schema)["w_plus"]
    flat = col.values.to_numpy(zero_copy_only=False)
    if col.offset or len(flat) != len(col) * shape[0] * shape[1]:
        flat = col.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(col), *shape).astype(np.float32, copy=False)


def read_latents(
    uri: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[list[str], np.ndarray]:
    """(image_ids, w_plus float32 [N, n_styles, 512]) of the `status == "ok"` rows under `uri`.

    Latest row per image_id (as `read_outputs`); the shape comes from the schema metadata.
    """
    import pyarrow.compute as pc

    table = read_outputs(uri, storage_options, columns=["image_id", "status", "w_plus"])
    table = table.filter(pc.equal(table["status"], STATUS_OK))
    return table["image_id"].to_pylist(), w_plus_to_numpy(table)
