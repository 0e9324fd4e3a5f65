"""`psp nightly INPUT OUTPUT --checkpoint CKPT`: process only new or changed inputs, exactly once.

One run:

1. list INPUT (key, ETag, size, mtime) and read the committed manifest under OUTPUT;
2. plan: new (not in the manifest), changed (ETag -- or size/mtime where there is no ETag --
   differs), deleted (gone from the listing: tombstoned), and, on request, rows made by another
   checkpoint (``--reprocess-on-model-change``) or with a transient failure (``--retry-failed``);
3. adopt rows an earlier crashed run already wrote for exactly these inputs (its ``_plan.parquet``
   says which ETag/size/checkpoint each row was made from), so a rerun does not redo finished work;
4. run the pipeline on the rest, writing only under ``OUTPUT/runs/<run_id>/``;
5. commit: a new manifest object, then the pointer (``schemas.manifest.commit_manifest``).

Nothing is visible to readers before step 5, so a crash anywhere leaves the previous state intact,
and the rerun neither loses nor duplicates a row.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.config import InvertConfig
from pipelines.options import add_arguments, from_args
from schemas import manifest as mf
from schemas.status import FINAL_STATUSES

log = logging.getLogger(__name__)

OUTPUT_SCHEMA_VERSION = 1
# schemas.status.FINAL_STATUSES are properties of the input: retried only when the input changes.
# Every other failure (read_error, decode_timeout, align_error, ...) is retried by --retry-failed.
PERMANENT_STATUSES = frozenset(FINAL_STATUSES)  # the statuses `psp invert` reruns skip, too


def is_transient(status: Optional[str]) -> bool:
    """True for a failed row worth retrying (not ok, not a property of the input)."""
    return status not in PERMANENT_STATUSES and status != mf.DELETED


PLAN_FILE = "_plan.parquet"


class NightlyError(RuntimeError):
    """A nightly run could not complete; nothing was committed, rerun after fixing the cause."""


@dataclass
class ListedInput:
    """One listed input: what the diff compares. `mtime` is seconds since the epoch or None."""

    uri: str
    size: Optional[int] = None
    etag: Optional[str] = None
    mtime: Optional[float] = None


@dataclass
class NightlyPlan:
    """What a run will do. Lists hold source URIs; `to_process` is what the pipeline gets."""

    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    model_changed: list[str] = field(default_factory=list)
    retry: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: int = 0

    @property
    def to_process(self) -> list[str]:
        return self.new + self.changed + self.model_changed + self.retry

    def counts(self) -> dict[str, int]:
        return {
            "new": len(self.new),
            "changed": len(self.changed),
            "model_changed": len(self.model_changed),
            "retry": len(self.retry),
            "deleted": len(self.deleted),
            "unchanged": self.unchanged,
            "to_process": len(self.to_process),
        }


@dataclass
class NightlyResult:
    """The outcome of `run_nightly`. `committed` is False for a dry run or when nothing changed."""

    run_id: str
    plan: NightlyPlan
    processed: int = 0  # rows written by this run's pipeline
    adopted: int = 0  # rows adopted from an earlier crashed run
    lost: int = 0  # planned inputs with no output row (left for the next run)
    duplicates: int = 0  # extra copies of a row found in the run's files (ignored by readers)
    status_counts: dict[str, int] = field(default_factory=dict)
    committed: bool = False
    manifest: Optional[str] = None
    live: int = 0  # live images after this run
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "plan": self.plan.counts(),
            "processed": self.processed,
            "adopted": self.adopted,
            "lost": self.lost,
            "duplicates": self.duplicates,
            "status_counts": self.status_counts,
            "committed": self.committed,
            "manifest": self.manifest,
            "live": self.live,
            "timings": self.timings,
        }


# -- pure planning ----------------------------------------------------------------------------

def mtime_seconds(value: Any) -> Optional[float]:
    """A listing's mtime (datetime, epoch number, ISO string or None) as epoch seconds."""
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.timezone.utc)
        return value.timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return mtime_seconds(_dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
    raise TypeError(f"unsupported mtime {value!r}")


def as_listed(item: Any) -> ListedInput:
    """A `pipelines.sources.SourceItem` (or anything with uri/size/etag/mtime) as a ListedInput."""
    size = getattr(item, "size", None)
    etag = getattr(item, "etag", None)
    return ListedInput(
        uri=getattr(item, "source_uri", None) or item.uri,  # the key output rows carry
        size=None if size is None else int(size),
        etag=None if etag is None else str(etag).strip('"'),
        mtime=mtime_seconds(getattr(item, "mtime", None)),
    )


def input_changed(listed: ListedInput, etag: Optional[str], size: Optional[int],
                  mtime: Optional[float]) -> bool:
    """True if the listed input differs from what the manifest recorded.

    Where both sides have an ETag it decides (with the size): a re-upload of identical bytes is not
    a change. Without ETags (local files) size and mtime decide.
    """
    if listed.size is not None and size is not None and listed.size != size:
        return True
    if listed.etag is not None and etag is not None:
        return listed.etag != etag
    if listed.mtime is not None and mtime is not None:
        return abs(listed.mtime - mtime) > 1e-6
    # Nothing comparable recorded: treat as changed (safe: reprocess rather than miss an update).
    return listed.etag != etag or listed.mtime != mtime


LISTING_SCHEMA = pa.schema(
    [
        pa.field("source_uri", pa.string(), nullable=False),  # the key output rows carry
        pa.field("size", pa.int64()),
        pa.field("etag", pa.string()),  # quotes stripped
        pa.field("mtime", pa.float64()),  # seconds since the epoch
        # what `pipelines.sources.SourceItem` needs besides the above (null where it equals the
        # default or, for `uri`, the source_uri), so only the inputs to process become objects
        pa.field("uri", pa.string()),
        pa.field("kind", pa.dictionary(pa.int8(), pa.string())),
        pa.field("url", pa.string()),
        pa.field("column", pa.string()),
        pa.field("offset", pa.int64()),
    ]
)
_LISTING_BATCH = 8192


def listing_table(items: Iterable[Any]) -> pa.Table:
    """A listing (`SourceItem`s, `ListedInput`s, or anything with uri/size/etag/mtime) as one Arrow
    table with `LISTING_SCHEMA`, one row per distinct source URI (the first listed wins), in listing
    order. Built in record batches of 8192, so no per-input Python object outlives its batch."""
    batches: list[pa.RecordBatch] = []
    cols: dict[str, list] = {name: [] for name in LISTING_SCHEMA.names}

    def flush() -> None:
        if cols["source_uri"]:
            batches.append(pa.RecordBatch.from_pydict(cols, schema=LISTING_SCHEMA))
            for v in cols.values():
                v.clear()

    for item in items:
        listed = as_listed(item)
        uri = getattr(item, "uri", listed.uri)
        cols["source_uri"].append(listed.uri)
        cols["size"].append(listed.size)
        cols["etag"].append(listed.etag)
        cols["mtime"].append(listed.mtime)
        cols["uri"].append(None if uri == listed.uri else uri)
        cols["kind"].append(getattr(item, "kind", None))
        cols["url"].append(getattr(item, "url", None))
        cols["column"].append(getattr(item, "column", None))
        offset = getattr(item, "offset", None)
        cols["offset"].append(None if offset is None else int(offset))
        if len(cols["source_uri"]) >= _LISTING_BATCH:
            flush()
    flush()
    table = pa.Table.from_batches(batches, schema=LISTING_SCHEMA).combine_chunks()
    return _first_per_key(table, "source_uri")


def _first_per_key(table: pa.Table, key: str, last: bool = False) -> pa.Table:
    """`table` with one row per `key` (the first, or the last, occurrence), in table order."""
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


def source_items(listing: pa.Table, uris: Sequence[str]) -> list[Any]:
    """`pipelines.sources.SourceItem`s for the listed inputs `uris` (source URIs), in that order."""
    from pipelines.sources import KIND_FILE, SourceItem

    if not uris:
        return []
    wanted = pa.array(list(uris), pa.string())
    rows = listing.filter(pc.is_in(listing["source_uri"], value_set=wanted))
    by_uri = {}
    for r in rows.to_pylist():
        by_uri[r["source_uri"]] = SourceItem(
            uri=r["uri"] or r["source_uri"], size=r["size"], etag=r["etag"], mtime=r["mtime"],
            kind=r["kind"] or KIND_FILE, url=r["url"], column=r["column"], offset=r["offset"],
        )
    return [by_uri[u] for u in uris]


def _ne(a: pa.ChunkedArray, b: Any) -> pa.ChunkedArray:
    """Python's ``a != b`` per row with None semantics (None != None is False, None != x True)."""
    a_valid = pc.is_valid(a)
    b_valid = pc.is_valid(b) if isinstance(b, (pa.Array, pa.ChunkedArray)) else pa.scalar(b is not None)
    return pc.if_else(
        pc.and_(a_valid, b_valid), pc.fill_null(pc.not_equal(a, b), True), pc.xor(a_valid, b_valid)
    )


def _changed_mask(l_size, l_etag, l_mtime, m_size, m_etag, m_mtime) -> pa.ChunkedArray:
    """`input_changed` for every row at once (the same rules, in the same order)."""
    both = lambda x, y: pc.and_(pc.is_valid(x), pc.is_valid(y))  # noqa: E731
    size_diff = pc.and_(both(l_size, m_size), pc.fill_null(pc.not_equal(l_size, m_size), False))
    etag_diff = pc.fill_null(pc.not_equal(l_etag, m_etag), False)
    mtime_diff = pc.fill_null(
        pc.greater(pc.abs(pc.subtract(l_mtime, m_mtime)), pa.scalar(1e-6)), False
    )
    fallback = pc.or_(pc.xor(pc.is_valid(l_etag), pc.is_valid(m_etag)),
                      pc.xor(pc.is_valid(l_mtime), pc.is_valid(m_mtime)))
    return pc.if_else(
        size_diff, True,
        pc.if_else(both(l_etag, m_etag), etag_diff,
                   pc.if_else(both(l_mtime, m_mtime), mtime_diff, fallback)),
    )


def plan_nightly(
    listing: Union[Sequence[ListedInput], pa.Table],
    manifest: pa.Table,
    checkpoint_sha256: str,
    reprocess_on_model_change: bool = False,
    retry_failed: bool = False,
    schema_version: int = OUTPUT_SCHEMA_VERSION,
) -> NightlyPlan:
    """Diff a listing against the committed manifest. Pure: no I/O.

    `listing` is a sequence of `ListedInput`s or a `listing_table`. The diff is an Arrow join (no
    Python object per input); only the URIs to process, and the deleted ones, become Python strings.

    Each input lands in exactly one bucket: new, changed, model_changed, retry, or unchanged.
    ``model_changed`` (only with `reprocess_on_model_change`) holds rows made by another checkpoint
    or with another output schema version; ``retry`` (only with `retry_failed`) rows whose status
    is transient (`is_transient`). Inputs in the manifest but not in the listing are
    ``deleted`` (already-tombstoned ones are not repeated).
    """
    if not isinstance(listing, pa.Table):
        listing = listing_table(listing)
    plan = NightlyPlan()
    man = _first_per_key(  # one entry per input; the last one wins, as a dict built from rows would
        manifest.select(["source_uri", "etag", "size", "mtime", "checkpoint_sha256",
                         "schema_version", "status"]),
        "source_uri", last=True,
    )
    man = pa.table(
        {"source_uri": man["source_uri"], "m_etag": man["etag"], "m_size": man["size"],
         "m_mtime": man["mtime"], "m_sha": man["checkpoint_sha256"],
         "m_sv": man["schema_version"], "m_status": man["status"]}
    )
    n = listing.num_rows
    left = pa.table(
        {"source_uri": listing["source_uri"], "size": listing["size"], "etag": listing["etag"],
         "mtime": listing["mtime"], "_i": pa.array(np.arange(n, dtype=np.int64))}
    )
    joined = left.join(man, keys="source_uri", join_type="left outer", use_threads=False)
    joined = joined.take(pc.sort_indices(joined["_i"]))  # back to listing order
    del left
    status = joined["m_status"]
    is_new = pc.fill_null(pc.or_kleene(pc.is_null(status), pc.equal(status, mf.DELETED)), True)
    changed = _changed_mask(joined["size"], joined["etag"], joined["mtime"],
                            joined["m_size"], joined["m_etag"], joined["m_mtime"])
    bucket = pc.if_else(is_new, 0, pc.if_else(changed, 1, 4))  # 0 new 1 changed 2 model 3 retry
    if reprocess_on_model_change:
        model = pc.or_(_ne(joined["m_sha"], checkpoint_sha256),
                       _ne(joined["m_sv"], pa.scalar(schema_version, pa.int32())))
        bucket = pc.if_else(pc.and_(pc.equal(bucket, 4), model), 2, bucket)
    if retry_failed:
        permanent = pa.array(sorted(PERMANENT_STATUSES | {mf.DELETED}), pa.string())
        transient = pc.invert(pc.fill_null(pc.is_in(status, value_set=permanent), False))
        bucket = pc.if_else(pc.and_(pc.equal(bucket, 4), transient), 3, bucket)
    uris = joined["source_uri"]
    for code, name in ((0, "new"), (1, "changed"), (2, "model_changed"), (3, "retry")):
        setattr(plan, name, uris.filter(pc.equal(bucket, code)).to_pylist())
    plan.unchanged = int(pc.sum(pc.equal(bucket, 4)).as_py() or 0)
    del joined, bucket
    listed = listing["source_uri"].combine_chunks()
    gone = pc.and_(
        pc.invert(pc.is_in(man["source_uri"], value_set=listed)),
        pc.not_equal(man["m_status"], mf.DELETED),
    )
    plan.deleted = sorted(man["source_uri"].filter(gone).to_pylist())
    return plan


def next_manifest(
    previous: pa.Table,
    plan: NightlyPlan,
    listing: dict[str, ListedInput],
    results: dict[str, dict[str, Any]],
    run_id: str,
    checkpoint_sha256: str,
    schema_version: int = OUTPUT_SCHEMA_VERSION,
    now: Optional[_dt.datetime] = None,
) -> pa.Table:
    """The manifest after a run. Pure.

    `results` maps source URI -> {image_id, status, run_id, output_file, checkpoint_sha256?} for
    every input that got a row this run (processed or adopted). Planned inputs without a result
    keep their previous entry (so the next run plans them again); deleted inputs become tombstones.
    """
    now = now or _dt.datetime.now(_dt.timezone.utc)
    prev = previous.select(mf.MANIFEST_SCHEMA.names).cast(mf.MANIFEST_SCHEMA)
    done = pa.array(list(results), pa.string())
    kept = prev.filter(pc.invert(pc.is_in(prev["source_uri"], value_set=done)))
    gone = pc.is_in(kept["source_uri"], value_set=pa.array(plan.deleted, pa.string()))
    for name, value in (("status", pa.scalar(mf.DELETED, pa.string())),
                        ("output_file", pa.scalar(None, pa.string())),
                        ("run_id", pa.scalar(run_id, pa.string())),
                        ("updated_at", pa.scalar(now, mf.MANIFEST_SCHEMA.field("updated_at").type))):
        i = kept.schema.get_field_index(name)
        kept = kept.set_column(i, mf.MANIFEST_SCHEMA.field(name), pc.if_else(gone, value, kept[name]))
    fresh = []
    for uri, res in results.items():
        item = listing[uri]
        fresh.append(
            {
                "image_id": res.get("image_id") or mf.image_id_for(uri),
                "source_uri": uri,
                "etag": item.etag,
                "size": item.size,
                "mtime": item.mtime,
                "checkpoint_sha256": res.get("checkpoint_sha256") or checkpoint_sha256,
                "schema_version": schema_version,
                "run_id": res.get("run_id") or run_id,
                "status": res["status"],
                "output_file": res["output_file"],
                "updated_at": now,
            }
        )
    return pa.concat_tables([kept, mf.make_entries(fresh)]).combine_chunks()


# -- I/O around the plan ----------------------------------------------------------------------

def checkpoint_sha256(uri: str, storage_options: Optional[dict] = None) -> str:
    """sha256 hex of the checkpoint file's bytes (the same value as `PSP.checkpoint_sha256`)."""
    import fsspec

    h = hashlib.sha256()
    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except FileNotFoundError as exc:
        raise NightlyError(
            f"checkpoint {uri!r} not found: pass --checkpoint with a path or URI every node can read"
        ) from exc
    return h.hexdigest()


def _write_plan(prefix: str, items: list[ListedInput], sha: str, storage_options) -> None:
    """Record what this run was asked to make, so a rerun can adopt its rows after a crash."""
    fs, root = mf._fs_and_root(prefix, storage_options)
    table = pa.table(
        {
            "source_uri": [i.uri for i in items],
            "etag": pa.array([i.etag for i in items], pa.string()),
            "size": pa.array([i.size for i in items], pa.int64()),
            "mtime": pa.array([i.mtime for i in items], pa.float64()),
            "checkpoint_sha256": [sha] * len(items),
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    mf._put_bytes_atomic(fs, mf._join(root, PLAN_FILE), sink.getvalue().to_pybytes())


def _parquet_files(fs, root: str) -> list[str]:
    try:
        paths = fs.find(root)
    except FileNotFoundError:
        return []
    return sorted(
        p for p in paths
        if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith(("_", "."))
    )


def collect_rows(
    output: str, run_id: str, storage_options: Optional[dict] = None
) -> tuple[dict[str, dict[str, Any]], int]:
    """Rows a run wrote under ``OUTPUT/runs/<run_id>/``: source URI -> row facts, and the count of
    duplicate copies seen (the first copy, in file-name order, is the one the manifest points at).

    Files that cannot be read (a local file cut short by a crash) are skipped.
    """
    fs, root = mf._fs_and_root(output, storage_options)
    run_root = mf._join(root, mf.RUNS_DIR, run_id)
    fs.invalidate_cache(run_root)  # written by Ray workers, not through this (cached) instance
    rows: dict[str, dict[str, Any]] = {}
    duplicates = 0
    for path in _parquet_files(fs, run_root):
        try:
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                names = set(pf.schema_arrow.names)
                cols = [c for c in ("image_id", "source_uri", "status", "run_id",
                                    "checkpoint_sha256") if c in names]
                table = pf.read(columns=cols)
        except Exception as exc:  # noqa: BLE001 - a torn file is expected after a crash
            log.warning("skipping unreadable output file %s: %s", path, exc)
            continue
        rel = path[len(root) + 1:]
        for r in table.to_pylist():
            uri = r["source_uri"]
            if uri in rows:
                duplicates += 1
                continue
            r["output_file"] = rel
            r.setdefault("run_id", run_id)
            rows[uri] = r
    return rows, duplicates


def adoptable_rows(
    output: str,
    manifest: pa.Table,
    wanted: dict[str, ListedInput],
    sha: str,
    retry_failed: bool,
    storage_options: Optional[dict] = None,
) -> dict[str, dict[str, Any]]:
    """Rows that uncommitted (crashed) runs already wrote for inputs in `wanted`, made from the same
    bytes (ETag/size/mtime per their ``_plan.parquet``) and the same checkpoint."""
    fs, root = mf._fs_and_root(output, storage_options)
    fs.invalidate_cache(mf._join(root, mf.RUNS_DIR))
    committed = set(pc.unique(manifest["run_id"].drop_null()).to_pylist())
    try:
        committed |= {
            p.rsplit("/", 1)[-1][len("manifest-") + 9:-len(".parquet")]
            for p in fs.ls(mf._join(root, mf.MANIFEST_DIR), detail=False)
            if p.rsplit("/", 1)[-1].startswith("manifest-")
        }
    except FileNotFoundError:  # nothing committed yet
        pass
    try:
        run_dirs = sorted(fs.ls(mf._join(root, mf.RUNS_DIR), detail=False))
    except FileNotFoundError:
        return {}
    adopted: dict[str, dict[str, Any]] = {}
    for run_dir in run_dirs:
        run_id = run_dir.rstrip("/").rsplit("/", 1)[-1]
        if run_id in committed:
            continue
        try:
            with fs.open(mf._join(run_dir, PLAN_FILE), "rb") as f:
                planned = {r["source_uri"]: r for r in pq.read_table(f).to_pylist()}
        except Exception:  # noqa: BLE001 - no plan: cannot prove what the rows were made from
            continue
        rows, _ = collect_rows(output, run_id, storage_options)
        for uri, row in rows.items():
            item, made_from = wanted.get(uri), planned.get(uri)
            if item is None or made_from is None or uri in adopted:
                continue
            if made_from["checkpoint_sha256"] != sha:
                continue
            if input_changed(item, made_from["etag"], made_from["size"], made_from["mtime"]):
                continue
            if retry_failed and is_transient(row.get("status")):
                continue
            row["checkpoint_sha256"] = sha
            adopted[uri] = row
    return adopted


def read_listing(input_uri: Any, storage_options: Optional[dict] = None, **rules: Any) -> pa.Table:
    """The input listing as a `listing_table`, streamed: no `SourceItem` per input is kept.
    `rules`: `pipelines.sources.iter_inputs` keywords (image_column, include, exclude, output).

    Raises `NightlyError` (with what to do) when the listing fails.
    """
    from pipelines.sources import iter_inputs

    try:
        table = listing_table(iter_inputs(input_uri, storage_options=storage_options, **rules))
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - surface the storage error with what to do
        raise NightlyError(
            f"listing {input_uri!r} failed: {type(exc).__name__}: {exc}. Nothing was committed; "
            "check the URI and credentials, then rerun"
        ) from exc
    _release_freed_memory()
    return table


def _release_freed_memory() -> None:
    """Hand memory Arrow's pool holds but no longer uses back to the OS (scratch space of the
    listing, the manifest read and the join). Best effort: Python's and libc's freed memory stays
    with the allocator and is reused by what the driver does next."""
    pa.default_memory_pool().release_unused()


def run_nightly(
    config: Any,
    reprocess_on_model_change: bool = False,
    retry_failed: bool = False,
    dry_run: bool = False,
    resume: bool = True,
) -> NightlyResult:
    """One nightly run. `config` is a `pipelines.config.InvertConfig` whose `output` is the nightly
    OUTPUT root (the run writes under ``OUTPUT/runs/<run_id>/``); its `run_id` is used if set.

    Raises `NightlyError` (nothing committed) when listing, the pipeline, or the commit fails.
    """
    from dataclasses import replace

    clock = _Clock()
    so = config.storage_options
    output = str(config.output).rstrip("/")
    run_id = getattr(config, "run_id", None) or mf.new_run_id()
    sha = checkpoint_sha256(config.checkpoint, so)
    # The listing lives as one Arrow table (no Python object per input); only the inputs this run
    # processes become `SourceItem`s again.
    listing = read_listing(config.input, so, image_column=config.image_column, include=config.include or (),
                           exclude=config.exclude or (), output=output)
    clock.lap("list_s")
    previous, pointer = mf.read_manifest(output, so)
    plan = plan_nightly(listing, previous, sha, reprocess_on_model_change, retry_failed)
    _release_freed_memory()  # the join's scratch space, before Ray starts
    clock.lap("plan_s")
    result = NightlyResult(run_id=run_id, plan=plan, timings=clock.laps)
    log.info("nightly %s plan: %s", run_id, plan.counts())
    if dry_run or (not plan.to_process and not plan.deleted):
        result.live = len(mf.live_entries(previous))
        return result

    by_uri = dict(zip(plan.to_process, source_items(listing, plan.to_process)))
    del listing
    wanted = {uri: as_listed(it) for uri, it in by_uri.items()}
    results: dict[str, dict[str, Any]] = {}
    if resume and wanted:
        results.update(adoptable_rows(output, previous, wanted, sha, retry_failed, so))
        result.adopted = len(results)
    clock.lap("adopt_s")
    todo = [uri for uri in plan.to_process if uri not in results]
    if todo:
        prefix = mf.run_prefix(output, run_id)
        from pipelines.graph import run_invert

        run_config = replace(config, output=prefix, run_id=run_id, input=config.input)
        try:
            _write_plan(prefix, [wanted[u] for u in todo], sha, so)
            run_invert(run_config, items=[by_uri[u] for u in todo])
        except Exception as exc:  # noqa: BLE001 - report with what to do; nothing is committed
            raise NightlyError(
                f"nightly run {run_id} failed while processing {len(todo)} inputs into {prefix}: "
                f"{type(exc).__name__}: {exc}. Nothing was committed; rerun the same command "
                "(finished rows are adopted, not redone)"
            ) from exc
        clock.lap("process_s")
        rows, result.duplicates = collect_rows(output, run_id, so)
        todo_set = set(todo)
        for uri, row in rows.items():
            if uri in todo_set:
                row["checkpoint_sha256"] = sha
                results[uri] = row
        result.processed = len(rows.keys() & todo_set)
        result.lost = len(todo_set - rows.keys())
        clock.lap("collect_s")
    new = next_manifest(previous, plan, wanted, results, run_id, sha)
    try:
        committed = mf.commit_manifest(output, new, run_id, pointer, so)
    except mf.ManifestError as exc:
        raise NightlyError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001
        raise NightlyError(
            f"committing run {run_id} to {output} failed: {type(exc).__name__}: {exc}. The previous "
            "state is intact; rerun the same command"
        ) from exc
    clock.lap("commit_s")
    result.committed = True
    result.manifest = committed.manifest
    counts: dict[str, int] = {}
    for r in results.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    result.status_counts = counts
    result.live = len(mf.live_entries(new))
    return result


class _Clock:
    """Wall-clock laps of a run's phases (seconds), reported in `NightlyResult.timings`."""

    def __init__(self) -> None:
        import time

        self._now = time.perf_counter
        self._last = self._now()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = self._now()
        self.laps[name] = round(now - self._last, 4)
        self._last = now


# -- CLI --------------------------------------------------------------------------------------

def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``psp nightly`` to the `psp` CLI's subparsers."""
    p = subparsers.add_parser(
        "nightly",
        help="process only new or changed inputs into OUTPUT, committed atomically",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("input", help="input URI (dir, prefix, tar or parquet; s3://, gs://, file://)")
    p.add_argument("output", help="nightly output root: runs/ and _manifests/ live under it")
    p.add_argument("--reprocess-on-model-change", action="store_true",
                   help="reprocess rows made by another checkpoint or output schema version")
    p.add_argument("--retry-failed", action="store_true",
                   help="reprocess failed rows whose cause may be transient (read_error, decode_timeout, "
                        "align_error, invert_error); never the permanent not_a_file/container_error/"
                        "decode_error/no_face/too_small/too_large")
    p.add_argument("--dry-run", action="store_true", help="print the plan, process nothing")
    p.add_argument("--no-resume", action="store_true",
                   help="do not adopt rows written by an earlier crashed run")
    p.add_argument("--run-id", default=None, help="run id (default: UTC time + random suffix)")
    add_arguments(p, InvertConfig, scopes=("run",))  # the same run options as `psp invert`
    p.set_defaults(func=main)
    return p


def _config_from_args(args: argparse.Namespace):
    return from_args(InvertConfig, args, input=args.input, output=args.output, run_id=args.run_id)


def main(args: argparse.Namespace) -> int:
    """Run ``psp nightly`` from parsed arguments; prints the result as JSON; returns the exit code."""
    config = _config_from_args(args)
    try:
        result = run_nightly(
            config,
            reprocess_on_model_change=args.reprocess_on_model_change,
            retry_failed=args.retry_failed,
            dry_run=args.dry_run,
            resume=not args.no_resume,
        )
    except NightlyError as exc:
        print(f"psp nightly: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2))
    return 3 if result.lost else 0
