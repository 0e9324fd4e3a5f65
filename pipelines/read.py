"""The read stage: fetch each listed input's bytes in a Ray read task, and never raise.

`read_batch` takes a batch of `SourceItem.to_row()` rows, plans one fetch per file (local files read
without following them into FIFOs or devices; object-store keys with one GET), per tar member with a
known offset (one range request) and per container for the other members (`pipelines.containers`),
runs the fetches concurrently, each under a time limit (`--read-timeout`), and turns each answer into
the row's bytes and sha256, or its status and a readable error that names the input.
"""
from __future__ import annotations

import collections
import hashlib
import os
import queue
import stat as _stat
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from pipelines.containers import read_container_row, read_members
from pipelines.items import (
    KIND_CONTAINER,
    KIND_FILE,
    KIND_TAR,
    InputProblem,
    describe_error,
    not_regular,
    split_uri,
)
from pipelines.reuse import REUSE_COLUMNS
from psp_core.uris import filesystem_for, is_local, is_local_fs
from schemas import status as st

#: Default time limit of one read (one file, or one container's members in a batch), seconds.
DEFAULT_READ_TIMEOUT_S = 120.0


def _read_local(path: str) -> bytes:
    """A local regular file's bytes. A FIFO, socket, device or a link to one, or a dangling link,
    raises InputProblem(not_a_file) without being opened for reading."""
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    islink = _stat.S_ISLNK(lst.st_mode)
    try:
        mode = os.stat(path).st_mode if islink else lst.st_mode
    except OSError:
        target = os.readlink(path)
        raise InputProblem(st.NOT_A_FILE, f"is a dangling symbolic link (to {target!r}): fix or remove it") from None
    if not _stat.S_ISREG(mode):
        raise not_regular(path, mode, islink)
    # Non-blocking open and a check after opening: a file swapped for a FIFO is not waited on.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        fstat = os.fstat(fd)
        if not _stat.S_ISREG(fstat.st_mode):
            raise not_regular(path, fstat.st_mode, islink)
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def _cat(fs, path: str, start: int | None = None, end: int | None = None) -> bytes:
    """`fs.cat_file`, except for S3 keys holding '?versionId=', which s3fs would read as a version
    of a shorter key: those are fetched by bucket and key as they are."""
    if "?versionId=" not in path or not hasattr(fs, "_call_s3"):
        return fs.cat_file(path, start=start, end=end)
    from fsspec.asyn import sync

    bucket, _, key = path.partition("/")
    kwargs = {"Bucket": bucket, "Key": key}
    if start is not None or end is not None:
        kwargs["Range"] = f"bytes={start or 0}-{'' if end is None else end - 1}"

    async def get() -> bytes:
        resp = await fs._call_s3("get_object", **kwargs)
        try:
            return await resp["Body"].read()
        finally:
            resp["Body"].close()

    return sync(fs.loop, get)


def _read_file(uri: str, storage_options) -> bytes:
    fs, path = filesystem_for(uri, storage_options)
    if is_local_fs(fs):
        return _read_local(path)
    return _cat(fs, path)


def _read_tar_range(uri: str, offset: int, size: int, storage_options) -> bytes:
    container, _ = split_uri(uri, KIND_TAR)
    fs, path = filesystem_for(container, storage_options)
    data = _cat(fs, path, start=offset, end=offset + size)
    if len(data) != size:
        raise EOFError(f"shard ended after {len(data)} of {size} member bytes")
    return data


class ReadTimeout(TimeoutError):
    """A read that did not finish within its time limit."""


#: Threads one batch's reads start on (more start only while those stall): a local read takes
#: ~10 µs, so a thread per read cost 15× the read; an object read is one request, so many at once.
LOCAL_LANES = 4  # network file systems mounted locally answer in milliseconds
REMOTE_LANES = 64
#: After this long without a finished read, a batch with reads still waiting starts one more
#: thread: a stalled read holds only its own.
STALL_S = 0.5


class _ReadThreads:
    """Daemon threads, kept for the life of the process (a read task's or actor's worker), that
    run functions: starting a thread per read cost more than a small read. A function starts at
    once (an idle thread takes it, or a new one is started); a thread whose function never returns
    (a stalled read) is simply never idle again."""

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.idle = 0

    def submit(self, fn) -> None:
        with self.lock:
            if self.idle:
                self.idle -= 1
            else:
                threading.Thread(target=self._work, daemon=True, name="psp-read").start()
        self.jobs.put(fn)

    def _work(self) -> None:
        while True:
            fn = self.jobs.get()
            fn()
            del fn
            with self.lock:
                self.idle += 1


_read_threads = _ReadThreads()


class _Reads:
    """One batch's reads: a queue of calls that each lane (a thread) takes in order; a call's
    result is its return value or the exception it raised."""

    def __init__(self, calls: list):
        self.todo = collections.deque(enumerate(calls))
        self.results: list[Any] = [None] * len(calls)
        self.done = [threading.Event() for _ in calls]
        self.lock = threading.Lock()
        self.progress = time.monotonic()

    def lane(self) -> None:
        while True:
            with self.lock:
                if not self.todo:
                    return
                i, call = self.todo.popleft()
            try:
                self.results[i] = call()
            except BaseException as e:  # noqa: BLE001 - handed back as the row's result
                self.results[i] = e
            finally:
                del call
                self.progress = time.monotonic()
                self.done[i].set()


def _with_time_limits(calls: list, timeout_s: float | None, lanes: int = REMOTE_LANES) -> list:
    """Run the zero-argument `calls` on up to `lanes` daemon threads, one more whenever the batch
    made no progress for STALL_S while calls wait (so a stalled read delays no other); each
    result is its return value or the exception it raised, or ReadTimeout when it did not finish
    within `timeout_s` of the start (its thread is abandoned: a stalled read cannot hold the
    stage)."""
    if not calls:
        return []
    deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)
    reads = _Reads(calls)
    for _ in range(min(max(1, lanes), len(calls))):
        _read_threads.submit(reads.lane)
    out = []
    for i, done in enumerate(reads.done):
        while not done.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            if done.wait(STALL_S if left is None else min(STALL_S, left)):
                break
            if reads.todo and time.monotonic() - reads.progress >= STALL_S:
                reads.progress = time.monotonic()
                _read_threads.submit(reads.lane)
        if done.is_set():
            out.append(reads.results[i])
        else:
            out.append(ReadTimeout(f"timed out after {timeout_s:g} s (the read time limit); retried by a rerun"))
    with reads.lock:
        reads.todo.clear()  # reads not started by the deadline are not started after it
    return out


def read_batch(
    batch: Mapping[str, np.ndarray],
    storage_options: Mapping[str, Any] | None = None,
    stage_clock: Any = None,
    timeout_s: float | None = DEFAULT_READ_TIMEOUT_S,
) -> dict[str, np.ndarray]:
    """The read stage: fetch each row's bytes, each fetch within `timeout_s` (None: no limit).

    In: a batch of `SourceItem.to_row()` dicts (columns uri, kind, column, source_uri, ...).
    Out: columns `source_uri`, `data` (bytes; b'' on failure), `source_sha256` ('' on failure),
    `status` ('ok', 'read_error' -- retried --, or a permanent 'not_a_file', 'container_error',
    'decode_error'), `error` ('' or the reason, naming the input), and the listing facts the
    output row records, `source_size` (-1: none), `source_etag` ('': none), `source_mtime` (epoch
    s, NaN: none), when the batch has them, and the alignment stored for the row's input
    (`pipelines.reuse.REUSE_COLUMNS`) when the plan attached one. Missing values are '' rather than
    None so every block has the same Arrow types.
    """
    start = time.perf_counter()
    uris = [str(u) for u in batch["uri"]]
    kinds = [str(k) for k in batch["kind"]]
    columns = [str(c) or None for c in batch["column"]] if "column" in batch else [None] * len(uris)
    offsets = [int(v) for v in batch["offset"]] if "offset" in batch else [-1] * len(uris)
    sizes = [int(v) for v in batch["size"]] if "size" in batch else [-1] * len(uris)

    calls: list = []
    targets: list[list[tuple[int, str | None]]] = []  # per call: (row, member) it answers
    groups: dict[tuple[str, str, Any], list[int]] = {}
    for i, (uri, kind) in enumerate(zip(uris, kinds)):
        if kind == KIND_TAR and offsets[i] >= 0 and sizes[i] >= 0:  # one range request, no scan
            calls.append(lambda u=uri, o=offsets[i], n=sizes[i]: _read_tar_range(u, o, n, storage_options))
            targets.append([(i, None)])
        elif kind == KIND_FILE:
            calls.append(lambda u=uri: _read_file(split_uri(u, KIND_FILE)[0], storage_options))
            targets.append([(i, None)])
        elif kind == KIND_CONTAINER:
            calls.append(lambda u=uri, c=columns[i]: read_container_row(u, c, storage_options))
            targets.append([(i, None)])
        else:
            container, _ = split_uri(uri, kind)
            groups.setdefault((container, kind, columns[i]), []).append(i)
    for (container, kind, column), idx in groups.items():
        members = [split_uri(uris[i], kind)[1] for i in idx]
        calls.append(lambda c=container, k=kind, m=members, col=column: read_members(c, k, m, col, storage_options))
        targets.append(list(zip(idx, members)))

    results: list[Any] = [None] * len(uris)
    lanes = LOCAL_LANES if all(is_local(u) for u in uris) else REMOTE_LANES
    for got, answers in zip(_with_time_limits(calls, timeout_s, lanes), targets):
        for i, member in answers:
            results[i] = got.get(member) if member is not None and isinstance(got, dict) else got

    data, sha, status, error = [], [], [], []
    for uri, r in zip(uris, results):
        if isinstance(r, (bytes, bytearray, memoryview)):
            b = bytes(r)
            data.append(b)
            sha.append(hashlib.sha256(b).hexdigest())
            status.append(st.OK)
            error.append("")
            continue
        data.append(b"")
        sha.append("")
        if isinstance(r, InputProblem):
            status.append(r.status)
            text = str(r)
            error.append(text if text.startswith(uri) else f"{uri}: {text}")
        else:
            status.append(st.READ_ERROR)
            error.append(f"cannot read {uri}: {describe_error(r) if r is not None else 'no result'}")
    out = {
        "source_uri": np.asarray(batch["source_uri"], dtype=object),
        "data": object_column(data),
        "source_sha256": np.asarray(sha, dtype=object),
        "status": np.asarray(status, dtype=object),
        "error": np.asarray(error, dtype=object),
    }
    if "etag" in batch:  # the listing facts travel with the row to the output table
        out["source_size"] = np.asarray(batch["size"], dtype=np.int64)
        out["source_etag"] = np.asarray(batch["etag"], dtype=object)
        out["source_mtime"] = np.asarray(batch["mtime"], dtype=np.float64)
    for name in REUSE_COLUMNS:  # a stored alignment travels to the align stage (pipelines.reuse)
        if name in batch:
            out[name] = np.asarray(batch[name], dtype=object)
    if stage_clock is not None:
        stage_clock.record("read", len(uris), time.perf_counter() - start)
    return out


def object_column(values: list) -> np.ndarray:
    """A 1-D object array of `values` (np.asarray would stack equal-shaped arrays or bytes into
    an N-D / fixed-width array)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out
