"""Listing as data: the inputs of a run as a sharded Parquet listing, made in Ray tasks.

The driver never holds one object per input. `list_to_shards` splits each INPUT into prefix shards
(a delimiter listing: the entries directly below a folder; sub-folders become shards of their own,
one level deeper while there are few of them) and runs one Ray task per shard; each task walks its
shard with the rules of `pipelines.sources` (include/exclude relative to INPUT, hidden files,
containers, sniffing) and writes its rows as one Parquet file (`SHARD_SCHEMA`). The driver gets
back only file names and counts (`Listing`). `read_user_listing` does the same for a listing the
user already has (`--listing PATH`: Parquet or CSV with a URI column, or an S3 Inventory report's
bucket/key columns), one task per file. The pipeline then reads the shards lazily with
`ray.data.read_parquet` (`pipelines.dataflow.build_dataset`).

Shard rows carry what the read stage needs and the listing facts the output rows record:
uri (as `pipelines.items` escapes it), source_uri (the row's key), kind, column, offset and size
(-1: none), etag ('' : none), mtime (epoch seconds, NaN: none). No nulls, so every block has the
same types.
"""
from __future__ import annotations

import math
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

SHARD_SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("column", pa.string(), nullable=False),
    pa.field("offset", pa.int64(), nullable=False),
    pa.field("size", pa.int64(), nullable=False),
    pa.field("etag", pa.string(), nullable=False),
    pa.field("mtime", pa.float64(), nullable=False),
])
#: Columns a user listing may name its URIs with (first found wins), or S3 Inventory's bucket + key.
URI_COLUMNS = ("uri", "source_uri", "url", "path", "key_uri")
#: Folder under OUTPUT where a run keeps its listing shards while it runs.
LISTING_DIR = "_listing"
#: Split folders until there are at least this many shards (or nothing left to split).
MIN_SHARDS = 16
MAX_SPLIT_DEPTH = 3


def scratch_dir(output: str, run_id: str) -> str:
    """Where run `run_id` keeps its listing and plan shards under OUTPUT (removed when it ends)."""
    return f"{output.rstrip('/')}/{LISTING_DIR}/{run_id}"


@dataclass
class Listing:
    """A run's listing: Parquet shard paths (fsspec paths on `storage_options`' filesystem), rows per
    shard, and the files left out per reason (`pipelines.items` skip reasons)."""

    paths: list[str]
    rows: list[int]
    not_inputs: Counter = field(default_factory=Counter)
    storage_options: dict[str, Any] = field(default_factory=dict)
    root: str = ""  # the folder holding the shards (removed by `discard`)
    owned: bool = True  # shards this run wrote (a user's listing is never removed)
    extra: tuple[str, ...] = ()  # columns the shards carry for the pipeline (`pipelines.reuse.REUSE_FIELDS`)

    @property
    def total(self) -> int:
        return int(sum(self.rows))

    def read_table(self, columns: Sequence[str] | None = None, schema: pa.Schema = SHARD_SCHEMA) -> pa.Table:
        """The whole listing as one Arrow table on the caller (`columns` of shards of `schema`)."""
        import pyarrow.parquet as pq

        fs = _fs(self.root or (self.paths[0] if self.paths else "/"), self.storage_options)
        tables = []
        for p in self.paths:
            with fs.open(p, "rb") as f:
                tables.append(pq.read_table(f, columns=list(columns) if columns else None))
        schema = schema if columns is None else pa.schema([schema.field(c) for c in columns])
        return pa.concat_tables(tables) if tables else schema.empty_table()

    def discard(self) -> None:
        """Remove the shards this run wrote (never a user's listing)."""
        if not self.owned or not self.root:
            return
        fs = _fs(self.root, self.storage_options)
        try:
            fs.rm(self.root, recursive=True)
        except FileNotFoundError:
            pass
        parent = self.root.rstrip("/")
        for _ in range(2):  # the run's and the listing folder, when empty (local file systems)
            parent = parent.rsplit("/", 1)[0]
            try:
                fs.rmdir(parent)
            except Exception:  # noqa: BLE001, S110 - not empty, or no folders on this store
                break


def first_per_key(table: pa.Table, key: str, last: bool = False) -> pa.Table:
    """`table` with one row per `key` (the first, or the last, occurrence), in table order."""
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return table
    idx = pa.array(np.arange(table.num_rows, dtype=np.int64))
    agg = "max" if last else "min"
    keep = (
        pa.table({key: table[key], "_i": idx}).group_by(key, use_threads=False)
        .aggregate([("_i", agg)])[f"_i_{agg}"]
    )
    if len(keep) == table.num_rows:
        return table
    return table.take(pc.take(keep, pc.sort_indices(keep)))


def _fs(uri: str, storage_options: Mapping[str, Any] | None):
    from psp_core.uris import filesystem_for

    return filesystem_for(uri, storage_options)[0]


def items_table(items: Iterable[Any]) -> pa.Table:
    """Listed inputs as one table of `SHARD_SCHEMA` (columns built in one pass, no row dicts):
    `SourceItem`s, or anything with a `uri` or `source_uri` and optionally size / etag / mtime
    (`pipelines.plan.ListedInput`); a missing kind is a file."""
    cols: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
    for it in items:
        source_uri = getattr(it, "source_uri", None) or it.uri
        size, etag, offset = getattr(it, "size", None), getattr(it, "etag", None), getattr(it, "offset", None)
        cols["uri"].append(getattr(it, "uri", None) or source_uri)
        cols["source_uri"].append(source_uri)
        cols["kind"].append(getattr(it, "kind", None) or "file")
        cols["column"].append(getattr(it, "column", None) or "")
        cols["offset"].append(-1 if offset is None else int(offset))
        cols["size"].append(-1 if size is None or int(size) < 0 else int(size))
        cols["etag"].append("" if not etag else str(etag).strip('"'))
        mtime = _seconds(getattr(it, "mtime", None))
        cols["mtime"].append(math.nan if mtime is None else mtime)
    return pa.table(cols, schema=SHARD_SCHEMA)


def shard_facts(listed: pa.Table) -> dict[str, Any]:
    """Shard rows' size / etag / mtime with nulls for 'none' (-1, '', NaN); mtime in integer
    microseconds, rounded as `pipelines.items.mtime_us` rounds (as the output rows store it)."""
    import pyarrow.compute as pc

    def none_if(col, value):
        return pc.if_else(pc.equal(col, value), pa.scalar(None, col.type), col)

    us = pc.cast(pc.round(pc.multiply(listed["mtime"], 1e6)), pa.int64(), safe=False)
    return {"size": none_if(listed["size"], -1), "etag": none_if(listed["etag"], ""),
            "mtime": pc.if_else(pc.is_nan(listed["mtime"]), pa.scalar(None, pa.int64()), us)}


def _seconds(value: Any) -> float | None:
    from pipelines.items import mtime_us

    us = mtime_us(value)
    return None if us is None else us / 1e6


def write_shard(table: pa.Table, path: str, storage_options) -> None:
    import pyarrow.parquet as pq

    fs = _fs(path, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, compression="zstd")


# ------------------------------------------------------------------------------------------------
# Shards of a listing


@dataclass(frozen=True)
class Shard:
    """One listing task: `uri` (an INPUT, or a folder below one) walked recursively, or only the
    files directly in it (`files_only`); `base` is the INPUT folder the rules' paths are relative to."""

    uri: str
    base: str | None = None  # None: `uri` is an INPUT listed as `pipelines.sources.iter_inputs` does
    files_only: bool = False


def plan_shards(inputs: Sequence[str], storage_options: Mapping[str, Any] | None = None,
                min_shards: int = MIN_SHARDS) -> list[Shard]:
    """Split INPUTs into shards with delimiter listings (one `ls` per folder split; never a full
    walk on the driver). A file, manifest or container INPUT is one shard."""
    from pipelines.items import ListingRules
    from psp_core.uris import filesystem_for

    shards: list[Shard] = []
    for uri in inputs:
        try:
            fs, path = filesystem_for(uri, storage_options)
            is_dir = fs.isdir(path)
        except Exception:  # noqa: BLE001 - the shard task reports it as iter_inputs would
            is_dir = False
        if not is_dir:
            shards.append(Shard(uri))
            continue
        base = path.rstrip("/") or "/"
        folders, depth = [base], 0
        done: list[Shard] = []
        while folders and depth < MAX_SPLIT_DEPTH and len(done) + len(folders) < min_shards:
            nxt = []
            for folder in folders:
                done.append(Shard(_unstrip(fs, folder, uri), base=_unstrip(fs, base, uri), files_only=True))
                try:
                    entries = fs.ls(folder, detail=True)
                except Exception:  # noqa: BLE001 - walked by its task instead
                    done[-1] = Shard(_unstrip(fs, folder, uri), base=_unstrip(fs, base, uri))
                    continue
                for e in entries:
                    name = e["name"].rstrip("/")
                    if e.get("type") != "directory" or name == folder or e.get("islink"):
                        continue
                    rel = name[len(base):].lstrip("/")
                    if ListingRules().skip_reason(rel + "/x") is not None:  # hidden / bookkeeping
                        done.append(Shard(_unstrip(fs, name, uri), base=_unstrip(fs, base, uri)))
                        continue
                    nxt.append(name)
            folders, depth = nxt, depth + 1
        done += [Shard(_unstrip(fs, f, uri), base=_unstrip(fs, base, uri)) for f in folders]
        shards += done
    return shards


def _unstrip(fs, path: str, like: str) -> str:
    """A filesystem path back to a URI of the INPUT's form (local paths stay paths)."""
    from psp_core.uris import is_local_fs

    return path if is_local_fs(fs) and "://" not in like else fs.unstrip_protocol(path)


def list_shard(shard: Shard, storage_options, image_column, include, exclude, output) -> tuple[pa.Table, Counter]:
    """The rows of one shard (`SHARD_SCHEMA`) and its skip counts: what `iter_inputs` lists for it."""
    from pipelines.items import ListingRules
    from pipelines.sources import folder_items, iter_inputs
    from psp_core.uris import filesystem_for

    skipped: Counter = Counter()
    if shard.base is None:
        items = iter_inputs(shard.uri, storage_options, image_column, include=include, exclude=exclude,
                            output=output, skipped=skipped)
        return items_table(items), skipped
    fs, path = filesystem_for(shard.uri, storage_options)
    _, base = filesystem_for(shard.base, storage_options)
    rules = ListingRules(tuple(include or ()), tuple(exclude or ()), output)
    items = folder_items(fs, path, rules, image_column, skipped, storage_options, base=base,
                         files_only=shard.files_only)
    return items_table(items), skipped


def list_to_shards(
    inputs: str | Sequence[str],
    scratch: str,
    storage_options: Mapping[str, Any] | None = None,
    image_column: str | None = None,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    output: str | None = None,
) -> Listing:
    """List INPUTs in Ray tasks (one per shard, `plan_shards`) into Parquet files under `scratch`;
    the driver gets names and counts. Raises `pipelines.items.InputError` as `list_inputs` does
    (a missing INPUT, a non-image file named directly)."""
    import ray

    from pipelines.items import InputError

    uris = [inputs] if isinstance(inputs, str) else list(inputs)
    so = dict(storage_options or {})
    for uri in uris:  # fail fast, on the driver, with list_inputs' messages
        _check_input(uri, so)
    shards = plan_shards(uris, so)
    root = f"{scratch.rstrip('/')}/{uuid.uuid4().hex}"

    @ray.remote(num_cpus=0.25, max_retries=3)
    def one(i: int, shard: Shard) -> tuple[str, int, dict]:
        table, skipped = list_shard(shard, so, image_column, include, exclude, output)
        path = f"{root}/part-{i:06d}.parquet"
        write_shard(table, path, so)
        return path, table.num_rows, dict(skipped)

    results = ray.get([one.remote(i, s) for i, s in enumerate(shards)])
    listing = Listing([], [], Counter(), so, root)
    for path, n, skipped in results:
        listing.not_inputs.update(skipped)
        listing.paths.append(path)
        listing.rows.append(n)
    if not listing.total and not uris:
        raise InputError("no INPUT given")
    return listing


def check_inputs(inputs: str | Sequence[str], storage_options: Mapping[str, Any] | None = None,
                 listing: str | None = None) -> None:
    """InputError (on the driver, before Ray starts) when an INPUT, or the `--listing` file, is
    missing or cannot be listed."""
    for uri in [listing] if listing else ([inputs] if isinstance(inputs, str) else list(inputs)):
        _check_input(uri, dict(storage_options or {}))


def _check_input(uri: str, storage_options) -> None:
    from pipelines.items import InputError
    from psp_core.uris import filesystem_for

    try:
        fs, path = filesystem_for(uri, storage_options)
        fs.info(path)
    except FileNotFoundError:
        raise InputError(f"input {uri!r} does not exist: check the path or bucket/prefix") from None
    except Exception as e:
        raise InputError(
            f"input {uri!r} cannot be listed ({type(e).__name__}: {e}): check the URI, credentials "
            "and --storage-options"
        ) from None


def items_listing(items: Sequence[Any], scratch: str, storage_options: Mapping[str, Any] | None = None,
                  rows_per_shard: int = 100_000) -> Listing:
    """Explicit `SourceItem`s (a caller's list, e.g. the nightly plan's inputs) as a Listing."""
    so = dict(storage_options or {})
    root = f"{scratch.rstrip('/')}/{uuid.uuid4().hex}"
    listing = Listing([], [], Counter(), so, root)
    for i, start in enumerate(range(0, len(items), rows_per_shard)):
        table = items_table(items[start:start + rows_per_shard])
        path = f"{root}/part-{i:06d}.parquet"
        write_shard(table, path, so)
        listing.paths.append(path)
        listing.rows.append(table.num_rows)
    return listing


# ------------------------------------------------------------------------------------------------
# A listing the user has


def read_user_listing(path: str, scratch: str, storage_options: Mapping[str, Any] | None = None) -> Listing:
    """`--listing PATH`: a Parquet or CSV file (or a folder of them) with a URI column (`URI_COLUMNS`)
    or S3 Inventory's `bucket` + `key` columns, and optionally size, etag / e_tag, mtime /
    last_modified(_date). Converted to shards in Ray tasks, one per file."""
    import ray

    from pipelines.items import InputError
    from psp_core.uris import filesystem_for

    so = dict(storage_options or {})
    fs, root_path = filesystem_for(path, so)
    try:
        if fs.isdir(root_path):
            files = sorted(p for p in fs.find(root_path)
                           if p.lower().endswith((".parquet", ".csv", ".csv.gz", ".tsv")))
        else:
            fs.info(root_path)
            files = [root_path]
    except FileNotFoundError:
        raise InputError(f"--listing {path!r} does not exist") from None
    if not files:
        raise InputError(f"--listing {path!r} holds no .parquet or .csv files")
    files = [_unstrip(fs, f, path) for f in files]
    root = f"{scratch.rstrip('/')}/{uuid.uuid4().hex}"

    @ray.remote(num_cpus=0.25, max_retries=3)
    def one(i: int, uri: str) -> tuple[str, int]:
        table = user_listing_table(uri, so)
        out = f"{root}/part-{i:06d}.parquet"
        write_shard(table, out, so)
        return out, table.num_rows

    try:
        results = ray.get([one.remote(i, f) for i, f in enumerate(files)])
    except ray.exceptions.RayTaskError as e:
        cause = e.as_instanceof_cause()
        if isinstance(cause, InputError):
            raise InputError(str(cause).splitlines()[-1]) from None
        raise
    return Listing([p for p, _ in results], [n for _, n in results], Counter(), so, root)


def user_listing_table(uri: str, storage_options: Mapping[str, Any] | None = None) -> pa.Table:
    """One file of a user listing as `SHARD_SCHEMA` rows (InputError naming what is missing)."""
    import pyarrow.compute as pc

    from pipelines.items import InputError, escape_name
    from psp_core.uris import filesystem_for

    fs, path = filesystem_for(uri, storage_options)
    with fs.open(path, "rb") as f:
        if path.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            t = pq.read_table(f)
        else:
            import pyarrow.csv as pcsv

            opts = pcsv.ParseOptions(delimiter="\t") if path.lower().endswith(".tsv") else None
            t = pcsv.read_csv(f, parse_options=opts)
    names = {n.lower(): n for n in t.column_names}
    col = next((names[c] for c in URI_COLUMNS if c in names), None)
    if col is not None:
        uris = pc.cast(t[col], pa.string())
    elif "bucket" in names and "key" in names:  # S3 Inventory
        bucket, key = (pc.cast(t[names[c]], pa.string()) for c in ("bucket", "key"))
        uris = pc.binary_join_element_wise(pa.scalar("s3:/"), bucket, key, "/")  # s3://bucket/key
    else:
        raise InputError(
            f"--listing {uri!r}: no URI column (one of {', '.join(URI_COLUMNS)}) and no bucket + key "
            f"columns (its columns: {', '.join(t.column_names)})"
        )
    keep = pc.is_valid(uris)
    t, uris = t.filter(keep), uris.filter(keep)
    n = t.num_rows
    # URIs are recorded escaped (`pipelines.items.escape_name`); plain ASCII without % is as is.
    plain = pc.match_substring_regex(uris, r"^[\x20-\x24\x26-\x7e]*$")  # printable ASCII without %
    if n and not pc.all(plain).as_py():
        uris = pa.array([escape_name(v) for v in uris.to_pylist()], pa.string())

    def num(*cands, fill=-1):
        c = next((names[x] for x in cands if x in names), None)
        if c is None:
            return pa.array(np.full(n, fill), pa.int64())
        return pc.fill_null(pc.cast(t[c], pa.int64(), safe=False), fill)

    etag_col = next((names[x] for x in ("etag", "e_tag") if x in names), None)
    etag = (pc.replace_substring(pc.fill_null(pc.cast(t[etag_col], pa.string()), ""), '"', "")
            if etag_col else pa.array([""] * n, pa.string()))
    mcol = next((names[x] for x in ("mtime", "last_modified_date", "last_modified") if x in names), None)
    if mcol is None:
        mtime = pa.array(np.full(n, np.nan), pa.float64())
    elif pa.types.is_timestamp(t[mcol].type):
        us = pc.cast(pc.cast(t[mcol], pa.timestamp("us", tz="UTC")), pa.int64())
        mtime = pc.fill_null(pc.divide(pc.cast(us, pa.float64()), 1e6), math.nan)
    else:
        mtime = pc.fill_null(pc.cast(t[mcol], pa.float64(), safe=False), math.nan)
    return pa.table({
        "uri": uris, "source_uri": uris, "kind": pa.array(["file"] * n, pa.string()),
        "column": pa.array([""] * n, pa.string()), "offset": pa.array(np.full(n, -1), pa.int64()),
        "size": num("size"), "etag": etag, "mtime": mtime,
    }, schema=SHARD_SCHEMA)


# ------------------------------------------------------------------------------------------------
# Reading a listing in the pipeline


def done_keys(source_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Sorted keys (first 32 hex chars, 128 bits, of each source_id) of inputs a run skips: 32
    bytes per input in the object store, shared by the read tasks (never Python objects)."""
    if len(source_ids) == 0:
        return np.empty(0, dtype="S32")
    import pyarrow.compute as pc

    ids = pc.utf8_slice_codeunits(source_ids, 0, 32)
    return np.unique(np.asarray(ids.to_numpy(zero_copy_only=False), dtype="S32"))


def _keys_of(source_uris: Sequence[str]) -> np.ndarray:
    from schemas.ids import image_id_for

    return np.array([image_id_for(u)[:32] for u in source_uris], dtype="S32")


def shard_todo(path: str, storage_options, skip: np.ndarray | None,
               extra: Sequence[str] = ()) -> tuple[pa.Table, int]:
    """One shard's rows to process (SHARD_SCHEMA's columns and `extra`): repeats of a source_uri
    dropped (the first is kept) and the inputs whose key is in `skip` (`done_keys`); also how many
    were skipped as done."""
    import pyarrow.parquet as pq

    with _fs(path, storage_options).open(path, "rb") as f:
        # a plan's shards also carry its bucket
        table = pq.read_table(f, columns=[*SHARD_SCHEMA.names, *extra])
    table = first_per_key(table, "source_uri")
    if skip is None or not len(skip) or not table.num_rows:
        return table, 0
    mine = _keys_of(table["source_uri"].to_pylist())
    at = np.minimum(np.searchsorted(skip, mine), len(skip) - 1)
    keep = skip[at] != mine
    return table.filter(pa.array(keep)), int((~keep).sum())


def count_todo(listing: Listing, skip_ref=None) -> tuple[int, int]:
    """(inputs to process, inputs skipped as done) over the whole listing, in one Ray task per
    shard (the driver sees two numbers per shard)."""
    import ray

    so = listing.storage_options

    @ray.remote(num_cpus=0.25, max_retries=3)
    def one(path: str, skip) -> tuple[int, int]:
        table, skipped = shard_todo(path, so, skip)
        return table.num_rows, skipped

    got = ray.get([one.remote(p, skip_ref) for p, n in zip(listing.paths, listing.rows) if n])
    return sum(t for t, _ in got), sum(s for _, s in got)


def listing_datasource(listing: Listing, rows_per_block: int, skip_ref=None):
    """A Ray Data Datasource over `listing`: one read task per shard, handing on its `shard_todo`
    rows (`skip_ref`: an ObjectRef to `done_keys`) in blocks of `rows_per_block` rows."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    so = listing.storage_options

    extra = tuple(listing.extra)
    schema = SHARD_SCHEMA
    if extra:
        from pipelines.reuse import REUSE_FIELDS

        schema = pa.schema([*SHARD_SCHEMA, *[f for f in REUSE_FIELDS if f.name in extra]])

    def read(path: str):
        import ray

        table, _ = shard_todo(path, so, ray.get(skip_ref) if skip_ref is not None else None, extra)
        for start in range(0, table.num_rows, rows_per_block):
            yield table.slice(start, rows_per_block)

    class ListingDatasource(Datasource):
        def estimate_inmemory_data_size(self):
            return listing.total * 200

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return [
                ReadTask(lambda p=p: read(p), BlockMetadata(num_rows=None, size_bytes=n * 200, exec_stats=None,
                                                            input_files=None), schema=schema)
                for p, n in zip(listing.paths, listing.rows) if n
            ]

    return ListingDatasource()
