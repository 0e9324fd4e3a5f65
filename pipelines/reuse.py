"""Align once, invert many: reuse the alignment an earlier run stored for the same input bytes.

A rerun over inputs the output table already holds (a new checkpoint with
`--reprocess-on-model-change`, a retried `invert_error`, or another OUTPUT that names this one with
`--alignment-from`) does not need dlib again: the crop depends only on the decoded image and the
68 landmarks (`psp_core.align.alignment_quad` -> `extract_aligned`), and the table stores those
landmarks exactly (dlib's integer points as float32). So:

1. after the plan, `pipelines.diff.attach_stored_alignment` (called by the planners) joins
   the plan's rows with the reusable rows of the output table and of each `--alignment-from` table
   (hash-partitioned by source_uri in Ray tasks, as the plan itself: the driver holds run ids, file
   and shard names, nothing per input), keeps per input the whole alignment of the first table
   whose run used the same alignment options (`alignment_signature`, recorded in each run's
   summary), and writes the plan's rows again with two more columns (`REUSE_FIELDS`): the sha256
   of the bytes that alignment was made from and its face rows (≈ 560 bytes per face);
2. the read stage hands them on, and each align actor (`pipelines.align.AlignFaces`) compares the
   stored sha256 with the one the read stage computed from the bytes: the same bytes rebuild the
   same crop from the stored landmarks (no detection), with the stored face_score / face_box /
   face_index / face_count; a `no_face` input stays `no_face`. Other bytes (a changed input), no
   stored alignment, another alignment setting or an incomplete set of face rows align as usual.
   The align stage reports the reused inputs as the stage `align_reused` in the run summary.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: What the join reads of the stored rows, with source_uri (never images or W+).
STORED_COLUMNS = ("source_id", "source_sha256", "status", "face_index", "face_count", "face_score",
                  "face_box", "landmarks", "run_id")
#: Stored statuses that carry a usable alignment: a face (landmarks) or the fact that there is none.
REUSABLE_STATUSES = ("ok", "invert_error", "no_face")
#: Config fields that change what alignment gives, besides every `align*` field (align_actors and
#: alignment_from only say where and from what it runs).
_ALIGNMENT_FIELDS = ("faces", "min_face")
_NOT_ALIGNMENT = ("align_actors",)


def alignment_signature(config: Any, align: str) -> str:
    """The alignment options of a run as a string (recorded in its summary): rows of two runs with
    the same signature and the same input bytes have the same alignment. `align` is the resolved
    --align mode; every other `align*` option, --faces and --min-face are included."""
    names = sorted(f.name for f in fields(config)
                   if (f.name.startswith("align_") and f.name not in _NOT_ALIGNMENT) or f.name in _ALIGNMENT_FIELDS)
    values = {"align": align, **{n: getattr(config, n) for n in names}}
    return "v1 " + json.dumps(values, sort_keys=True, default=str)


def reuse_enabled(config: Any, align: str) -> bool:
    """--reuse-alignment (on unless --no-reuse-alignment) and a run that detects faces."""
    return align == "dlib" and getattr(config, "reuse_alignment", None) is not False


#: What a plan's shards carry per input when reuse is on (`attach_stored_alignment`): the sha256 of
#: the bytes an earlier run aligned ('' when nothing usable is stored) and its face rows packed as
#: float32 [faces, FACE_VALUES] (score, box, 68 landmarks; no rows: the input had no face).
REUSE_FIELDS = (pa.field("stored_sha256", pa.string(), nullable=False),
                pa.field("stored_faces", pa.binary(), nullable=False))
REUSE_COLUMNS = tuple(f.name for f in REUSE_FIELDS)
FACE_VALUES = 1 + 4 + 68 * 2


def pack_faces(score: np.ndarray, box: np.ndarray, landmarks: np.ndarray) -> bytes:
    """One input's stored face rows (score [k] NaN = none, box [k,4] NaN = none, landmarks [k,68,2])
    as the bytes of `stored_faces` (k = 0: a stored no_face)."""
    k = len(score)
    values = np.empty((k, FACE_VALUES), np.float32)
    values[:, 0] = score
    values[:, 1:5] = np.reshape(box, (k, 4))
    values[:, 5:] = np.reshape(landmarks, (k, 68 * 2))
    return values.tobytes()


def stored_results(faces: bytes, rgb: np.ndarray, aligner: Any, name: str) -> list:
    """AlignResults for a decoded input (HxWx3 uint8) from its stored alignment (`stored_faces`
    bytes), each crop made by `aligner.align_landmarks` exactly as a fresh alignment makes it."""
    from psp_core.align import AlignResult

    values = np.frombuffer(faces, np.float32).reshape(-1, FACE_VALUES)
    if not len(values):
        msg = (f"{name}: no face found by the HOG detector (alignment of the same bytes reused from an "
               "earlier run; --no-reuse-alignment detects again)")
        return [AlignResult(status="no_face", error=msg, n_faces=0, source_size=(rgb.shape[1], rgb.shape[0]))]
    out = []
    for v in values:
        r = aligner.align_landmarks(rgb, v[5:].reshape(68, 2))
        r.score = None if np.isnan(v[0]) else float(v[0])
        r.box = None if np.isnan(v[1:5]).any() else v[1:5].astype(np.int32)
        r.n_faces = len(values)
        out.append(r)
    return out


def matching_runs(table: Any, dt, signature: str, run_ids: Sequence[str] = ()) -> set[str]:
    """Run ids of the table's commits whose summary records alignment `signature`. The commit log
    forgets old commits (delta-rs cleans up logs past `delta.logRetentionDuration`, 30 days by
    default, at each checkpoint), so each of `run_ids` (the runs of the stored rows) it no longer
    holds is looked up in its ``_runs/<run_id>.json`` summary (`pipelines.commit.write_run_summary`)."""
    from schemas.table import COMMIT_RUN, COMMIT_RUN_ID, RUNS_DIR

    out, seen = set(), set()
    for commit in dt.history():
        run = commit.get(COMMIT_RUN)
        if not run or not commit.get(COMMIT_RUN_ID):
            continue
        seen.add(commit[COMMIT_RUN_ID])
        doc = json.loads(run) if isinstance(run, str) else dict(run)
        if doc.get("alignment") == signature:
            out.add(commit[COMMIT_RUN_ID])
    missing = sorted({r for r in run_ids if r} - seen)
    if missing:
        fs, root = table.filesystem()
        for run_id in missing:
            try:
                doc = json.loads(fs.cat_file(f"{root}/{RUNS_DIR}/{run_id}.json"))
            except (FileNotFoundError, ValueError):  # no summary (a crashed run's adopted rows): not reused
                continue
            if doc.get("alignment") == signature:
                out.add(run_id)
    return out


def complete_inputs(rows: pa.Table) -> pa.Table:
    """The stored rows (`STORED_COLUMNS`) of the inputs whose stored alignment is whole: one
    `no_face` row, or all `face_count` face rows (face_index 0..count-1, each with landmarks), all
    of the same bytes (one source_sha256)."""
    face = pc.and_(pc.is_valid(rows["landmarks"]), pc.is_valid(rows["face_index"]))
    usable = pc.or_(pc.equal(rows["status"], "no_face"), face)
    rows = rows.filter(pc.and_(pc.fill_null(usable, False), pc.is_valid(rows["source_sha256"])))
    if rows.num_rows == 0:
        return rows
    slim = pa.table({"source_uri": rows["source_uri"], "sha": rows["source_sha256"], "face_index": rows["face_index"],
                     "face_count": rows["face_count"],
                     "_nf": pc.cast(pc.equal(rows["status"], "no_face"), pa.int32()),
                     "_i": pa.array(np.arange(rows.num_rows, dtype=np.int64))})
    stats = slim.group_by("source_uri", use_threads=False).aggregate(
        [("_i", "count"), ("sha", "count_distinct"), ("face_index", "count_distinct"), ("face_index", "max"),
         ("face_count", "min"), ("face_count", "max"), ("_nf", "sum")])
    n, nf = stats["_i_count"], stats["_nf_sum"]
    one_no_face = pc.and_(pc.equal(n, 1), pc.equal(nf, 1))
    all_faces = pc.and_(
        pc.and_(pc.equal(nf, 0), pc.equal(stats["face_index_count_distinct"], n)),
        pc.and_(pc.equal(stats["face_index_max"], pc.subtract(n, 1)),
                pc.and_(pc.equal(stats["face_count_min"], n), pc.equal(stats["face_count_max"], n))))
    whole = pc.and_(pc.equal(stats["sha_count_distinct"], 1), pc.or_kleene(one_no_face, all_faces))
    keep = stats.filter(pc.fill_null(whole, False)).select(["source_uri"])
    slim = slim.select(["source_uri", "_i"]).join(keep, keys="source_uri", join_type="inner", use_threads=False)
    return rows.take(np.sort(slim["_i"].to_numpy()))


def packed(rows: pa.Table) -> pa.Table:
    """Whole stored alignments (`complete_inputs` rows) as one row per input: source_uri and the
    `REUSE_FIELDS` (stored_sha256, stored_faces)."""
    schema = pa.schema([pa.field("source_uri", pa.string()), *REUSE_FIELDS])
    if rows.num_rows == 0:
        return schema.empty_table()
    rows = rows.sort_by([("source_uri", "ascending"), ("face_index", "ascending")])
    n = rows.num_rows
    uris = np.asarray(rows["source_uri"].to_numpy(zero_copy_only=False), dtype=object)
    sha = np.asarray(rows["source_sha256"].to_numpy(zero_copy_only=False), dtype=object)
    no_face = np.asarray(pc.equal(rows["status"], "no_face").to_numpy(zero_copy_only=False), bool)
    score = np.asarray(pc.fill_null(rows["face_score"], np.nan).to_numpy(), np.float32)
    box, landmarks = _fixed(rows["face_box"], n, 4), _fixed(rows["landmarks"], n, 68 * 2)
    starts = np.flatnonzero(np.r_[True, uris[1:] != uris[:-1]])
    ends = np.r_[starts[1:], n]
    faces = [b"" if no_face[a] else pack_faces(score[a:b], box[a:b], landmarks[a:b]) for a, b in zip(starts, ends)]
    return pa.table([pa.array(uris[starts], pa.string()), pa.array(sha[starts], pa.string()),
                     pa.array(faces, pa.binary())], schema=schema)


def _fixed(column: pa.ChunkedArray, n: int, size: int) -> np.ndarray:
    """A list<float32> column as float32 [n, size] (NaN where null)."""
    out = np.full((n, size), np.nan, np.float32)
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), bool)
    if valid.any():
        out[valid] = np.asarray(arr.filter(pa.array(valid)).flatten().to_numpy(), np.float32).reshape(-1, size)
    return out


def choose_stored(stored: Sequence[pa.Table], runs: Sequence[set[str]]) -> pa.Table:
    """One partition's stored alignments: `stored[p]` the rows (`STORED_COLUMNS`) of table p
    (the run's OUTPUT first, then each --alignment-from table), `runs[p]` the runs of table p made
    with this run's alignment options. Per input, the first table with a whole alignment wins;
    returned `packed`."""
    chosen, seen = [], None
    for rows, ok in zip(stored, runs):
        if not rows.num_rows or not ok:
            continue
        rows = rows.filter(pc.is_in(rows["run_id"], value_set=pa.array(sorted(ok), pa.string())))
        rows = packed(complete_inputs(rows))
        if seen is not None and rows.num_rows:
            rows = rows.filter(pc.invert(pc.is_in(rows["source_uri"], value_set=seen)))
        if rows.num_rows:
            chosen.append(rows)
            seen = pa.concat_arrays([c["source_uri"].combine_chunks() for c in chosen])
    return pa.concat_tables(chosen) if chosen else packed(stored_rows_schema().empty_table())


def stored_rows_schema() -> pa.Schema:
    """The stored rows' columns the join reads: source_uri and `STORED_COLUMNS`."""
    from schemas.outputs import output_schema

    schema = output_schema(1)
    return pa.schema([schema.field(c) for c in ("source_uri", *STORED_COLUMNS)])


def with_stored(todo: pa.Table, stored: pa.Table) -> pa.Table:
    """`todo` (plan rows, any columns with source_uri) with the `REUSE_FIELDS` of `stored`
    (`packed` rows; '' / b'' where none), in todo's order."""
    idx = pa.array(np.arange(todo.num_rows, dtype=np.int64))
    joined = pa.table({"source_uri": todo["source_uri"], "_i": idx}).join(
        stored, keys="source_uri", join_type="left outer", use_threads=False)
    joined = joined.take(pc.sort_indices(joined["_i"]))
    out = todo
    for f in REUSE_FIELDS:
        empty = "" if f.type == pa.string() else b""
        out = out.append_column(f, pc.fill_null(joined[f.name], pa.scalar(empty, f.type)))
    return out


__all__ = ["FACE_VALUES", "REUSE_COLUMNS", "REUSE_FIELDS", "alignment_signature", "choose_stored", "complete_inputs",
           "matching_runs", "pack_faces", "packed", "reuse_enabled", "stored_results", "stored_rows_schema",
           "with_stored"]
