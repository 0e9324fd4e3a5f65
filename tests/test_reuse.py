"""Align once, invert many: a rerun reuses the alignment stored for the same input bytes."""
from __future__ import annotations

import io
import os

import pytest
from PIL import Image

from jobs.demo import sample_files

NAMES = ("face_crop_wide.jpg", "face_exif_rot.jpg", "bad_no_face.jpg")


def _config(inp, out, checkpoint, **overrides):
    from pipelines.config import InvertConfig

    base = dict(input=str(inp), output=str(out), checkpoint=checkpoint, align="dlib", device="cpu",
                batch_size=4, align_actors=1, output_actors=1, images="none", save_aligned=True, cpu_threads=1)
    base.update(overrides)
    return InvertConfig(**base)


def _rows(out, version=None) -> dict:
    import numpy as np

    import schemas

    cols = ["source_uri", "status", "aligned_image", "landmarks", "face_box", "face_score", "checkpoint_sha256",
            "w_plus", "source_sha256"]
    table = schemas.read_outputs(str(out), columns=cols, as_of=version)
    return {r["source_uri"].rsplit("/", 1)[-1]: {**r, "w_plus": None if r["w_plus"] is None else np.asarray(r["w_plus"])}
            for r in table.to_pylist()}


def _reused(out) -> int:
    """Inputs the last committed run aligned from a stored alignment (its summary's stage)."""
    import schemas

    return schemas.read_runs(str(out))[-1]["stages"].get("align_reused", {}).get("rows", 0)


@pytest.mark.slow
def test_a_rerun_with_another_checkpoint_reuses_the_stored_alignment(ray_cluster, tiny_checkpoint, tmp_path):
    import numpy as np

    from pipelines.run import run_nightly
    from psp_core.testing import random_checkpoint

    inp, out, other = tmp_path / "in", tmp_path / "out", tmp_path / "other"
    os.makedirs(inp)
    for name, blob, _ in sample_files(20):
        if name in NAMES:
            (inp / name).write_bytes(blob)
    run_nightly(_config(inp, out, tiny_checkpoint))
    first = _rows(out)
    assert [first[n]["status"] for n in NAMES] == ["ok", "ok", "no_face"] and _reused(out) == 0

    # a new model into the same table: no detection, the same crops and faces, new latents
    ckpt2 = str(random_checkpoint(str(tmp_path / "psp_v2.pt"), output_size=32, seed=3))
    r2 = run_nightly(_config(inp, out, ckpt2), reprocess_on_model_change=True)
    assert r2.processed == 3 and _reused(out) == 3
    again = _rows(out)
    for name in NAMES:
        a, b = first[name], again[name]
        assert (a["status"], a["aligned_image"], a["landmarks"], a["face_box"], a["face_score"]) == (
            b["status"], b["aligned_image"], b["landmarks"], b["face_box"], b["face_score"])
        assert a["checkpoint_sha256"] != b["checkpoint_sha256"]
    assert not np.allclose(first[NAMES[0]]["w_plus"], again[NAMES[0]]["w_plus"])

    # another OUTPUT (another checkpoint's table) finds them with --alignment-from: the plan's rows
    # get them attached (a join in Ray tasks, here over several partitions), and its align stage
    # makes the same crops without detecting (the stage as a plain callable: no third run); bytes
    # changed since are aligned afresh
    import pyarrow as pa

    from pipelines.align import AlignFaces
    from pipelines.config import resolve_config
    from pipelines.diff import attach_stored_alignment
    from pipelines.listing import Listing, items_table, write_shard
    from pipelines.read import read_batch
    from pipelines.reuse import REUSE_COLUMNS
    from pipelines.run import open_output
    from pipelines.sources import list_inputs

    resolved = resolve_config(_config(inp, other, ckpt2, alignment_from=[str(out)]))
    items = list_inputs(str(inp))
    plan = str(tmp_path / "plan" / "todo-00000.parquet")
    listed = items_table(items)  # the plan's rows: the listing's with their bucket (0: new)
    write_shard(listed.append_column("bucket", pa.array([0] * listed.num_rows, pa.int8())), plan, {})
    todo = Listing([plan], [len(items)], root=str(tmp_path / "plan"))
    # 3 inputs + 3 stored rows at 2 rows a partition: 3 partitions (the shards name theirs)
    attached = attach_stored_alignment(resolved, todo, open_output(resolved)[0], use_ray=True, partition_rows=2)
    assert attached.extra == REUSE_COLUMNS and attached.total == len(items)
    rows = attached.read_table()
    assert sorted(rows["stored_sha256"].to_pylist()) == sorted(first[n]["source_sha256"] for n in first)
    changed = inp / NAMES[1]
    Image.open(changed).save(changed, quality=60)  # other bytes: its stored alignment no longer applies
    batch = read_batch({k: np.asarray(rows[k].to_pylist(), dtype=object) for k in rows.column_names})
    stage = AlignFaces(task="ffhq_encode")
    stage.aligner.detector = None  # detection fails: only the stored alignments can align
    aligned = stage(batch)
    assert stage._reused == 2 and not set(REUSE_COLUMNS) & set(aligned)
    for i, uri in enumerate(aligned["source_uri"]):
        name = str(uri).rsplit("/", 1)[-1]
        if name == NAMES[1]:
            assert aligned["status"][i] == "align_error"
            continue
        assert aligned["status"][i] == first[name]["status"]
        if first[name]["aligned_image"] is not None:
            assert np.array_equal(aligned["aligned"][i], np.asarray(Image.open(io.BytesIO(first[name]["aligned_image"]))))
    attached.discard()


def test_reuse_is_off_with_the_flag_or_without_detection(tmp_path, tiny_checkpoint):
    """--no-reuse-alignment and --align none never look up stored alignments; another alignment
    setting has another signature, so its rows are never reused."""
    from pipelines.config import resolve_config
    from pipelines.diff import attach_stored_alignment
    from pipelines.listing import Listing
    from pipelines.reuse import alignment_signature, reuse_enabled

    cfg = _config(tmp_path, tmp_path / "out", tiny_checkpoint, reuse_alignment=False)
    assert not reuse_enabled(cfg, "dlib") and not reuse_enabled(_config(tmp_path, "o", "c"), "none")
    assert reuse_enabled(_config(tmp_path, "o", "c"), "dlib")  # on by default (the switch absent: None)
    todo = Listing(["never-read.parquet"], [1])
    assert attach_stored_alignment(resolve_config(cfg), todo, table=None) is todo
    base = alignment_signature(_config(tmp_path, "o", "c"), "dlib")
    for change in ({"faces": "all"}, {"min_face": 32}, {"align_detect_size": 640}):
        assert alignment_signature(_config(tmp_path, "o", "c", **change), "dlib") != base
    assert alignment_signature(_config(tmp_path, "o", "c", align_actors=4, images="jpeg"), "dlib") == base


def test_runs_the_commit_log_forgot_are_matched_by_their_summary_file(tmp_path):
    """Delta drops old commits from its log (retention) at checkpoints: a run whose commit is gone
    is still matched through its _runs/<run_id>.json, so months-old rows stay reusable."""
    import json

    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake
    from deltalake.transaction import CommitProperties

    from pipelines.reuse import matching_runs
    from pipelines.table import OutputTable
    from schemas.table import COMMIT_RUN, COMMIT_RUN_ID, RUNS_DIR

    path = tmp_path / "out"
    runs = {"old-same": "sig A", "old-other": "sig B", "new-same": "sig A"}
    for i, (run_id, sig) in enumerate(runs.items()):
        meta = {COMMIT_RUN_ID: run_id, COMMIT_RUN: json.dumps({"run_id": run_id, "alignment": sig})}
        write_deltalake(str(path), pa.table({"a": [i]}), mode="append", commit_properties=CommitProperties(
            custom_metadata=meta), configuration={"delta.logRetentionDuration": "interval 0 seconds"})
        if run_id.startswith("old"):
            (path / RUNS_DIR).mkdir(exist_ok=True)
            (path / RUNS_DIR / f"{run_id}.json").write_text(json.dumps({"run_id": run_id, "alignment": sig}))
    dt = DeltaTable(str(path))
    dt.create_checkpoint()
    dt.cleanup_metadata()
    dt = DeltaTable(str(path))
    assert {c.get(COMMIT_RUN_ID) for c in dt.history()} == {"new-same"}  # the log forgot the old runs
    table = OutputTable(str(path))
    assert matching_runs(table, dt, "sig A") == {"new-same"}
    assert matching_runs(table, dt, "sig A", ["old-same", "old-other", "crashed", "new-same"]) == {"old-same", "new-same"}


def test_each_input_gets_the_whole_alignment_of_the_first_table_that_has_one():
    """The plan's join (`choose_stored` per partition): per input, the first table (OUTPUT, then each
    --alignment-from) whose matching run stored all its face rows (or its no_face row) wins; an
    incomplete set, another run's rows or two byte strings for one input are never used."""
    import numpy as np
    import pyarrow as pa

    from pipelines.reuse import FACE_VALUES, STORED_COLUMNS, choose_stored, with_stored
    from schemas.outputs import output_schema

    schema = pa.schema([output_schema(1).field(c) for c in ("source_uri", *STORED_COLUMNS)])

    def rows(*specs):
        out = []
        for uri, sha, status, index, count, run, mark in specs:
            face = status != "no_face"
            out.append({"source_uri": uri, "source_id": uri, "source_sha256": sha, "status": status,
                        "face_index": index if face else None, "face_count": count if face else None,
                        "face_score": 1.0 + mark if face else None, "face_box": [mark] * 4 if face else None,
                        "landmarks": [float(mark)] * 136 if face else None, "run_id": run})
        return pa.Table.from_pylist(out, schema=schema)

    mine = rows(("a", "sa", "ok", 0, 2, "r0", 1), ("a", "sa", "ok", 1, 2, "r0", 2),  # whole: 2 faces
                ("b", "sb", "ok", 1, 2, "r0", 3),  # face 0 of 2 missing
                ("c", "sc", "no_face", None, None, "other", 0),  # another alignment setting's run
                ("e", "se", "ok", 0, 2, "r0", 4), ("e", "sx", "ok", 1, 2, "r0", 5))  # two byte strings
    theirs = rows(("a", "sa", "ok", 0, 1, "r1", 9), ("b", "sb", "ok", 0, 1, "r1", 6),
                  ("c", "sc", "no_face", None, None, "r1", 0))
    stored = choose_stored([mine, theirs], [{"r0"}, {"r1"}])
    todo = pa.table({"source_uri": ["d", "c", "b", "a", "e"], "bucket": pa.array([0] * 5, pa.int8())})
    got = with_stored(todo, stored)
    assert got["source_uri"].to_pylist() == ["d", "c", "b", "a", "e"]  # the plan's order
    assert got["stored_sha256"].to_pylist() == ["", "sc", "sb", "sa", ""]
    faces = [np.frombuffer(f, np.float32).reshape(-1, FACE_VALUES) for f in got["stored_faces"].to_pylist()]
    assert [len(f) for f in faces] == [0, 0, 1, 2, 0]  # c: a stored no_face; b: table 1's; a: table 0's
    assert faces[2][0, 0] == 7.0 and faces[3][:, 5].tolist() == [1.0, 2.0]  # by face_index
