"""Align once, invert many: reuse the alignment an earlier run stored for the same input bytes.

A rerun over inputs the output table already holds (a new checkpoint with
`--reprocess-on-model-change`, a retried `invert_error`, or another OUTPUT that names this one with
`--alignment-from`) does not need dlib again: the crop depends only on the decoded image and the
68 landmarks (`psp_core.align.alignment_quad` -> `extract_aligned`), and the table stores those
landmarks exactly (dlib's integer points as float32). So:

1. the driver (`load_stored_alignment`, called by `pipelines.dataflow.process_items`) reads, from the
   output table and each `--alignment-from` table, the rows of exactly the inputs this run
   processes (by source_id; Arrow columns, no Python object per input), keeps those made by a run
   with the same alignment options (`alignment_signature`, recorded in each run's summary), and
   puts one compact `StoredAlignment` (sorted by source_sha256, ≈ 650 bytes per face) in the Ray
   object store;
2. each align actor (`pipelines.align.AlignFaces`) looks a decoded input up by the source_sha256
   the read stage computed from its bytes: a hit rebuilds the same crop from the stored landmarks
   (no detection), with the stored face_score / face_box / face_index / face_count; a `no_face`
   input stays `no_face`. A miss (new or changed bytes, another alignment setting, an incomplete
   set of face rows) aligns as usual. The align stage reports the reused inputs as the stage
   `align_reused` in the run summary.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: What the lookup reads of the stored rows (never images or W+).
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


@dataclass
class StoredAlignment:
    """Stored alignments keyed by source_sha256: rows sorted by (sha, face_index); an input's rows
    are `sha[lo:hi]` (one image-level `no_face` row, or its `face_count` face rows)."""

    sha: np.ndarray  # S64, sorted
    no_face: np.ndarray  # bool [n]
    face_count: np.ndarray  # int32 [n]
    score: np.ndarray  # float32 [n] (NaN: none)
    box: np.ndarray  # float32 [n,4] (NaN: none)
    landmarks: np.ndarray  # float32 [n,68,2]

    def __len__(self) -> int:
        return len(self.sha)

    @property
    def inputs(self) -> int:
        """Distinct input byte strings held."""
        return len(np.unique(self.sha))

    def find(self, source_sha256: str | None) -> tuple[int, int]:
        """(lo, hi) of the rows stored for these bytes (lo == hi: none)."""
        if not source_sha256:
            return 0, 0
        key = np.bytes_(str(source_sha256).encode())
        return int(np.searchsorted(self.sha, key, "left")), int(np.searchsorted(self.sha, key, "right"))

    def results(self, source_sha256: str | None, rgb: np.ndarray, aligner: Any, name: str) -> list | None:
        """AlignResults for a decoded input (HxWx3 uint8) from its stored alignment, the crop made by
        `aligner.align_landmarks` exactly as a fresh alignment makes it; None when nothing is stored."""
        from psp_core.align import AlignResult

        lo, hi = self.find(source_sha256)
        if lo == hi:
            return None
        size = (rgb.shape[1], rgb.shape[0])
        if self.no_face[lo]:
            msg = (f"{name}: no face found by the HOG detector (alignment of the same bytes reused from an "
                   "earlier run; --no-reuse-alignment detects again)")
            return [AlignResult(status="no_face", error=msg, n_faces=0, source_size=size)]
        out = []
        for j in range(lo, hi):
            r = aligner.align_landmarks(rgb, self.landmarks[j])
            r.score = None if np.isnan(self.score[j]) else float(self.score[j])
            r.box = None if np.isnan(self.box[j]).any() else self.box[j].astype(np.int32)
            r.n_faces = int(self.face_count[j])
            out.append(r)
        return out

    @classmethod
    def from_rows(cls, rows: pa.Table) -> StoredAlignment:
        """From stored rows already reduced to complete inputs (see `_complete`)."""
        rows = rows.sort_by([("source_sha256", "ascending"), ("face_index", "ascending")])
        n = rows.num_rows
        no_face = np.asarray(pc.equal(rows["status"], "no_face").to_numpy(zero_copy_only=False), bool)
        return cls(
            sha=np.asarray(rows["source_sha256"].to_numpy(zero_copy_only=False), dtype="S64"),
            no_face=no_face,
            face_count=np.asarray(pc.fill_null(rows["face_count"], 0).to_numpy(), np.int32),
            score=np.asarray(pc.fill_null(rows["face_score"], np.nan).to_numpy(), np.float32),
            box=_fixed(rows["face_box"], n, (4,)),
            landmarks=_fixed(rows["landmarks"], n, (68, 2)),
        )


def _fixed(column: pa.ChunkedArray, n: int, shape: tuple[int, ...]) -> np.ndarray:
    """A list<float32> column as float32 [n, *shape] (NaN where null)."""
    size = int(np.prod(shape))
    out = np.full((n, size), np.nan, np.float32)
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), bool)
    if valid.any():
        out[valid] = np.asarray(arr.filter(pa.array(valid)).flatten().to_numpy(), np.float32).reshape(-1, size)
    return out.reshape(n, *shape)


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


def _slim(rows: pa.Table, *names: str) -> pa.Table:
    """`rows`' columns `names` plus `_i` (row number): what the joins below work on (Arrow's hash
    join takes no list columns such as landmarks)."""
    return pa.table({**{n: rows[n] for n in names}, "_i": pa.array(np.arange(rows.num_rows, dtype=np.int64))})


def _complete(rows: pa.Table) -> pa.Table:
    """Rows of the inputs whose stored alignment is whole: one `no_face` row, or all `face_count`
    face rows (face_index 0..count-1, each with landmarks) of one source; one source per sha
    (the same bytes align the same whatever their URI)."""
    face = pc.and_(pc.is_valid(rows["landmarks"]), pc.is_valid(rows["face_index"]))
    usable = pc.or_(pc.equal(rows["status"], "no_face"), face)
    rows = rows.filter(pc.and_(pc.fill_null(usable, False), pc.is_valid(rows["source_sha256"])))
    if rows.num_rows == 0:
        return rows
    slim = _slim(rows, "source_sha256", "source_id", "status", "face_index", "face_count")
    first = slim.group_by("source_sha256", use_threads=False).aggregate([("source_id", "min")])
    slim = slim.join(first, keys="source_sha256", use_threads=False)
    slim = slim.filter(pc.equal(slim["source_id"], slim["source_id_min"]))
    slim = slim.append_column("_nf", pc.cast(pc.equal(slim["status"], "no_face"), pa.int32()))
    stats = slim.group_by("source_sha256", use_threads=False).aggregate(
        [("_i", "count"), ("face_index", "count_distinct"), ("face_index", "max"), ("face_count", "min"),
         ("face_count", "max"), ("_nf", "sum")])
    n, nf = stats["_i_count"], stats["_nf_sum"]
    one_no_face = pc.and_(pc.equal(n, 1), pc.equal(nf, 1))
    all_faces = pc.and_(
        pc.and_(pc.equal(nf, 0), pc.equal(stats["face_index_count_distinct"], n)),
        pc.and_(pc.equal(stats["face_index_max"], pc.subtract(n, 1)),
                pc.and_(pc.equal(stats["face_count_min"], n), pc.equal(stats["face_count_max"], n))))
    keep = stats.filter(pc.fill_null(pc.or_kleene(one_no_face, all_faces), False)).select(["source_sha256"])
    slim = slim.select(["source_sha256", "_i"]).join(keep, keys="source_sha256", join_type="inner",
                                                      use_threads=False)
    return rows.take(np.sort(slim["_i"].to_numpy()))


def load_stored_alignment(resolved: Any, items: Sequence[Any], table: Any) -> StoredAlignment | None:
    """The stored alignments for `items` (SourceItems) from the run's output table and its
    `--alignment-from` tables (earlier tables first win), made with this run's alignment options;
    None when reuse is off or nothing is stored. ConfigError when an --alignment-from table is
    missing."""
    from pipelines.options import ConfigError
    from pipelines.table import OutputTable
    from schemas.ids import image_id_for

    config = resolved.config
    if not reuse_enabled(config, resolved.align) or not items:
        return None
    signature = alignment_signature(config, resolved.align)
    ids = pa.array(sorted({image_id_for(it.source_uri) for it in items}), pa.string())
    tables = [table] + [OutputTable(uri, config.storage_options) for uri in (config.alignment_from or [])]
    found = []
    for priority, source in enumerate(tables):
        dt = source.load()
        if dt is None:
            if priority == 0:
                continue
            raise ConfigError(f"--alignment-from {source.uri!r}: no output table there; name a psp OUTPUT "
                              "(or drop the flag)")
        rows = source.state(dt, STORED_COLUMNS, ids=ids, with_file=False)
        runs = matching_runs(source, dt, signature, pc.unique(rows["run_id"]).to_pylist())
        if not runs:
            continue
        rows = rows.filter(pc.and_(pc.is_in(rows["run_id"], value_set=pa.array(sorted(runs), pa.string())),
                                   pc.is_in(rows["status"], value_set=pa.array(REUSABLE_STATUSES))))
        rows = _complete(rows)
        if rows.num_rows:
            found.append(rows.append_column("_priority", pa.array(np.full(rows.num_rows, priority, np.int32))))
    if not found:
        return None
    rows = pa.concat_tables(found)
    slim = _slim(rows, "source_sha256", "_priority")
    best = slim.group_by("source_sha256", use_threads=False).aggregate([("_priority", "min")])
    slim = slim.join(best, keys="source_sha256", use_threads=False)
    slim = slim.filter(pc.equal(slim["_priority"], slim["_priority_min"]))
    return StoredAlignment.from_rows(rows.take(np.sort(slim["_i"].to_numpy())))


__all__ = ["StoredAlignment", "alignment_signature", "load_stored_alignment", "matching_runs", "reuse_enabled"]
