"""Containers: WebDataset-style `.tar` shards and Parquet files with an image-bytes column,
listed into one `SourceItem` per image and read member by member.

Listing (`container_items`): tar members by the same name rules as files in a folder (hidden and
bookkeeping names skipped, non-image names sniffed by content), each with its data offset so the
read stage fetches it with one range request; Parquet rows from the image column (`--image-column`,
else the first of `IMAGE_COLUMNS`; img2dataset's `url` column becomes the row's source_uri, its
failed downloads are skipped). A container that cannot be listed keeps the items it gave and
reports its problem, which becomes a `container_error` row.

Reading (`read_members`): the named members of one container in one open (Parquet: only the row
groups holding them, the last one cached per worker), each answer bytes or the exception that is
that row's status.
"""
from __future__ import annotations

import stat as _stat
import tarfile
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipelines.items import (
    IMAGE_EXTENSIONS,
    KIND_CONTAINER,
    KIND_PARQUET,
    KIND_TAR,
    SKIP_NOT_DOWNLOADED,
    SKIP_NOT_IMAGE,
    TEXT_EXTENSIONS,
    InputProblem,
    ListingRules,
    SourceItem,
    describe_error,
    escape_member,
    info_etag,
    info_mtime,
    lower_ext,
    not_regular,
    record_uri,
    split_uri,
)
from psp_core.images import SNIFF_BYTES, sniff_format
from psp_core.uris import filesystem_for
from schemas import status as st

IMAGE_COLUMNS = ("jpg", "png", "image", "bytes", "jpeg", "webp")


# ------------------------------------------------------------------------------------------------
# Listing


def container_items(fs, path: str, info: Mapping[str, Any], image_column: str | None,
                     skipped: Counter) -> tuple[list[SourceItem], str | None]:
    """The items of one .tar / .parquet, and the container problem (None when it listed fine)."""
    uri = record_uri(fs, path)
    ext = lower_ext(path)
    items: list[SourceItem] = []
    try:
        if ext == ".tar":
            _tar_items(fs, path, uri, info, items, skipped)
        else:
            _parquet_items(fs, path, uri, info, image_column, items, skipped)
        return items, None
    except InputProblem as e:
        return items, str(e)
    except Exception as e:  # noqa: BLE001 - any failure to list a container is that container's row
        what = "a readable .tar shard" if ext == ".tar" else "a readable Parquet file"
        after = f" after {len(items)} images" if items else ""
        return items, f"{uri}: not {what} ({describe_error(e)}){after}: re-create or remove it"


def _tar_items(fs, path: str, uri: str, info: Mapping[str, Any], items: list, skipped: Counter) -> None:
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if member.isdir():
                continue
            reason = ListingRules().skip_reason(member.name)
            if reason is not None:
                skipped[reason] += 1
                continue
            ext = lower_ext(member.name)
            if ext not in IMAGE_EXTENSIONS and member.isfile():
                if ext in TEXT_EXTENSIONS:
                    skipped[SKIP_NOT_IMAGE] += 1
                    continue
                fh = tar.extractfile(member)
                if fh is None or sniff_format(fh.read(SNIFF_BYTES)) is None:
                    skipped[SKIP_NOT_IMAGE] += 1
                    continue
            items.append(
                SourceItem(
                    uri=f"{uri}#{escape_member(member.name)}",
                    size=member.size if member.isfile() else None,
                    etag=info_etag(info),
                    mtime=float(member.mtime) if member.mtime else info_mtime(info),
                    kind=KIND_TAR,
                    offset=member.offset_data if member.isfile() else None,
                )
            )
        # tarfile ends its iteration quietly at a damaged header after the first member: check that
        # what follows the last member is the end-of-archive marker (or nothing), not garbage.
        end = tar.offset
        f.seek(0, 2)
        size = f.tell()
        f.seek(end)
        tail = f.read(1024)
        if end > size or tail.strip(b"\0"):
            raise InputProblem(
                st.CONTAINER_ERROR,
                f"{uri}: .tar shard is truncated or corrupt at byte {min(end, size)} (after {len(items)} "
                "images, which are kept): re-create the shard",
            )


def detect_image_column(names: Sequence[str], requested: str | None = None) -> str | None:
    """The Parquet column holding image bytes: `requested`, else the first of jpg/png/image/bytes."""
    if requested is not None:
        return requested if requested in names else None
    return next((c for c in IMAGE_COLUMNS if c in names), None)


def _parquet_items(fs, path: str, uri: str, info: Mapping[str, Any], image_column: str | None,
                   items: list, skipped: Counter) -> None:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        column = detect_image_column(names, image_column)
        if column is None:
            wanted = f"column {image_column!r}" if image_column else f"one of {', '.join(IMAGE_COLUMNS)}"
            raise InputProblem(
                st.CONTAINER_ERROR,
                f"{uri}: Parquet file has no image-bytes {wanted} (its columns: {', '.join(names)}): "
                "pass --image-column NAME",
            )
        n = pf.metadata.num_rows
        # img2dataset keeps the original URL; only that (small) column is read on the driver.
        urls = pf.read(columns=["url"]).column("url").to_pylist() if "url" in names else [None] * n
        status = pf.read(columns=["status"]).column("status").to_pylist() if "status" in names else [None] * n
    for row in range(n):
        if status[row] not in (None, "success"):  # img2dataset rows that failed to download have no bytes
            skipped[SKIP_NOT_DOWNLOADED] += 1
            continue
        items.append(
            SourceItem(
                uri=f"{uri}#row={row}",
                size=None,
                etag=info_etag(info),
                mtime=info_mtime(info),
                kind=KIND_PARQUET,
                url=str(urls[row]) if urls[row] else None,
                column=column,
            )
        )


# ------------------------------------------------------------------------------------------------
# Reading


def read_container_row(uri: str, column: str | None, storage_options) -> bytes:
    """The row of a container that could not be listed: listed again, its problem is the status."""
    container, _ = split_uri(uri, KIND_CONTAINER)
    fs, path = filesystem_for(container, storage_options)
    info = fs.info(path)
    _, problem = container_items(fs, path, info, column, Counter())
    if problem is not None:
        raise InputProblem(st.CONTAINER_ERROR, problem)
    raise RuntimeError("the container lists fine now; rerun to process its images")


def read_members(container: str, kind: str, members: list[str], column: str | None, storage_options) -> dict:
    """Fetch the named members of one tar shard / Parquet file: {member: bytes or Exception}.
    `container` and `members` are raw (unescaped)."""
    out: dict[str, Any] = {}
    fs, path = filesystem_for(container, storage_options)
    if kind == KIND_TAR:
        wanted = set(members)
        try:
            with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for m in tar:
                    if m.name in wanted and m.name not in out:
                        out[m.name] = _tar_member_bytes(tar, m)
        except tarfile.TarError as e:
            problem = InputProblem(st.CONTAINER_ERROR, f"shard {container} is corrupt ({describe_error(e)})")
            for name in wanted - set(out):
                out[name] = problem
        for name in wanted - set(out):
            out[name] = FileNotFoundError(f"member {name!r} not found in {container!r}")
        return out
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowInvalid, OSError) as e:
            if isinstance(e, pa.ArrowInvalid) or "parquet" in str(e).lower():
                raise InputProblem(st.CONTAINER_ERROR, f"{container} is not a readable Parquet file ({describe_error(e)})") from None
            raise
        rows = sorted({int(m) for m in members})
        # Read only the row groups holding the wanted rows.
        starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
        groups = sorted({int(np.searchsorted(starts, r, side="right") - 1) for r in rows})
        for g in groups:
            try:
                values = _row_group(pf, container, g, column)
            except pa.ArrowInvalid as e:
                problem = InputProblem(st.CONTAINER_ERROR, f"row group {g} of {container} is corrupt ({describe_error(e)})")
                values = None
            for r in rows:
                if not starts[g] <= r < starts[g + 1]:
                    continue
                if values is None:
                    out[str(r)] = problem
                    continue
                v = values[r - starts[g]]
                if isinstance(v, dict):  # HF-datasets style {"bytes": ..., "path": ...}
                    v = v.get("bytes")
                if v is None or len(v) == 0:
                    out[str(r)] = InputProblem(
                        st.DECODE_ERROR, f"row {r} has no image bytes (an empty or null cell in column {column!r})")
                elif not isinstance(v, (bytes, bytearray)):
                    out[str(r)] = InputProblem(
                        st.DECODE_ERROR, f"row {r}: column {column!r} holds {type(v).__name__}, not image bytes")
                else:
                    out[str(r)] = v
    for m in members:
        out.setdefault(m, IndexError(f"row {m} is not in {container!r}"))
    return out


def _tar_member_bytes(tar: tarfile.TarFile, m: tarfile.TarInfo) -> bytes | InputProblem:
    try:
        fh = tar.extractfile(m)
    except (KeyError, tarfile.TarError) as e:  # a link to a member that is not there
        return InputProblem(st.NOT_A_FILE, f"is a tar link that leads nowhere ({describe_error(e)})")
    return fh.read() if fh is not None else not_regular(m.name, _tar_mode(m), False)


def _tar_mode(m: tarfile.TarInfo) -> int:
    if m.isfifo():
        return _stat.S_IFIFO
    if m.ischr():
        return _stat.S_IFCHR
    if m.isblk():
        return _stat.S_IFBLK
    return 0


_ROW_GROUP_CACHE: dict[tuple[str, int, str], list] = {}


def _row_group(pf, container: str, group: int, column: str) -> list:
    """One row group's image column, cached (one entry per worker process): consecutive read
    batches usually come from the same row group, which would otherwise be read once per batch."""
    key = (container, group, column)
    values = _ROW_GROUP_CACHE.get(key)
    if values is None:
        values = pf.read_row_group(group, columns=[column]).column(0).to_pylist()
        _ROW_GROUP_CACHE.clear()
        _ROW_GROUP_CACHE[key] = values
    return values
