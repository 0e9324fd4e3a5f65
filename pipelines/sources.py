"""Sources: what to process. Listing runs on the driver; fetching bytes runs in Ray read tasks.

`list_inputs` turns a URI (folder / object prefix / file / `.txt` manifest, any fsspec protocol) or a
list of URIs into `SourceItem`s, one per input image:
- image files by extension (`.jpg .jpeg .png .bmp .ppm .tif .tiff .webp`, any case);
- WebDataset-style `.tar` shards: one item per image member, uri `shard.tar#member`;
- Parquet files with an image-bytes column (img2dataset output): one item per row, uri
  `file.parquet#row=N`; img2dataset's `url` column, when present, becomes the row's source_uri.

`read_batch` is the read stage: it fetches each item's bytes (one open per container file in a
batch) and never raises: a failure becomes `status='read_error'` with the reason.
"""
from __future__ import annotations

import hashlib
import tarfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
MANIFEST_EXTENSIONS = (".txt", ".lst")
IMAGE_COLUMNS = ("jpg", "png", "image", "bytes", "jpeg", "webp")

KIND_FILE = "file"
KIND_TAR = "tar_member"
KIND_PARQUET = "parquet_row"


@dataclass(frozen=True)
class SourceItem:
    """One input image.

    uri: where the bytes are: a file URI, `shard.tar#member`, or `file.parquet#row=N`.
    size: bytes (None where unknown). etag / mtime: from the object store (None where the filesystem
    has none); mtime in seconds since the epoch. kind: 'file', 'tar_member' or 'parquet_row'.
    url: the original URL for img2dataset Parquet rows (then it is the row's `source_uri`).
    column: Parquet rows: the column holding the image bytes.
    offset: tar members: byte offset of the member's data in the shard, so the read stage fetches
    it with one range request instead of scanning the shard (None: scan).
    """

    uri: str
    size: int | None = None
    etag: str | None = None
    mtime: float | None = None
    kind: str = KIND_FILE
    url: str | None = None
    column: str | None = None
    offset: int | None = None

    @property
    def source_uri(self) -> str:
        """The URI recorded on the output row (its `image_id` is derived from it)."""
        return self.url or self.uri

    def to_row(self) -> dict[str, str]:
        """The read stage's input row, for `ray.data.from_items` (strings only: columns that are
        all None in one block would get another Arrow type than in the next)."""
        return {
            "uri": self.uri,
            "kind": self.kind,
            "column": self.column or "",
            "source_uri": self.source_uri,
            "offset": -1 if self.offset is None else int(self.offset),
            "size": -1 if self.size is None else int(self.size),
        }


class InputError(ValueError):
    """An input location that cannot be listed; the message says what to check."""


def _lower_ext(path: str) -> str:
    name = path.rsplit("/", 1)[-1].lower()
    return name[name.rfind(".") :] if "." in name else ""


def is_image_path(path: str) -> bool:
    return _lower_ext(path) in IMAGE_EXTENSIONS


def _filesystem(uri: str, storage_options: Mapping[str, Any] | None):
    import fsspec

    return fsspec.core.url_to_fs(uri, **dict(storage_options or {}))


def _mtime(info: Mapping[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "updated", "last_modified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        try:
            from datetime import datetime

            return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
    return None


def _etag(info: Mapping[str, Any]) -> str | None:
    for key in ("ETag", "etag", "md5Hash", "md5"):
        value = info.get(key)
        if value:
            return str(value).strip('"')
    return None


def _tar_items(fs, path: str, uri: str, info: Mapping[str, Any]) -> list[SourceItem]:
    items = []
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if member.isfile() and is_image_path(member.name):
                items.append(
                    SourceItem(
                        uri=f"{uri}#{member.name}",
                        size=member.size,
                        etag=_etag(info),
                        mtime=float(member.mtime) if member.mtime else _mtime(info),
                        kind=KIND_TAR,
                        offset=member.offset_data,
                    )
                )
    return items


def detect_image_column(names: Sequence[str], requested: str | None = None) -> str | None:
    """The Parquet column holding image bytes: `requested`, else the first of jpg/png/image/bytes."""
    if requested is not None:
        return requested if requested in names else None
    return next((c for c in IMAGE_COLUMNS if c in names), None)


def _parquet_items(
    fs, path: str, uri: str, info: Mapping[str, Any], image_column: str | None
) -> list[SourceItem]:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        column = detect_image_column(names, image_column)
        if column is None:
            wanted = f"column {image_column!r}" if image_column else f"one of {IMAGE_COLUMNS}"
            raise InputError(
                f"Parquet input {uri!r} has no image-bytes {wanted} (columns: {names}): "
                "pass --image-column NAME"
            )
        n = pf.metadata.num_rows
        # img2dataset keeps the original URL; only that (small) column is read on the driver.
        urls = pf.read(columns=["url"]).column("url").to_pylist() if "url" in names else [None] * n
        status = pf.read(columns=["status"]).column("status").to_pylist() if "status" in names else [None] * n
    items = []
    for row in range(n):
        if status[row] not in (None, "success"):  # img2dataset rows that failed to download have no bytes
            continue
        items.append(
            SourceItem(
                uri=f"{uri}#row={row}",
                size=None,
                etag=_etag(info),
                mtime=_mtime(info),
                kind=KIND_PARQUET,
                url=urls[row] or None,
                column=column,
            )
        )
    return items


def _manifest_uris(fs, path: str, uri: str) -> list[str]:
    base = uri.rsplit("/", 1)[0]
    out = []
    with fs.open(path, "rt") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            out.append(line if ("://" in line or line.startswith("/")) else f"{base}/{line}")
    return out


def _items_for_file(fs, path: str, info: Mapping[str, Any], image_column: str | None) -> list[SourceItem]:
    uri = fs.unstrip_protocol(path)
    ext = _lower_ext(path)
    if ext in IMAGE_EXTENSIONS:
        return [SourceItem(uri=uri, size=info.get("size"), etag=_etag(info), mtime=_mtime(info))]
    if ext == ".tar":
        return _tar_items(fs, path, uri, info)
    if ext == ".parquet":
        return _parquet_items(fs, path, uri, info, image_column)
    return []


def _is_hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/") if part)


def list_inputs(
    uri_or_list: str | Sequence[str],
    storage_options: Mapping[str, Any] | None = None,
    image_column: str | None = None,
) -> list[SourceItem]:
    """List every input image under `uri_or_list`, sorted by uri within each location.

    A folder/prefix is walked recursively (hidden `.x`/`_x` entries skipped, e.g. `_SUCCESS.json`);
    a `.txt`/`.lst` file is a manifest with one URI per line (relative ones resolve against the
    manifest's folder); `.tar` and `.parquet` files expand to one item per image. Files of other
    types inside a folder are ignored; naming one directly raises InputError.
    """
    return list(iter_inputs(uri_or_list, storage_options, image_column))


def iter_inputs(
    uri_or_list: str | Sequence[str],
    storage_options: Mapping[str, Any] | None = None,
    image_column: str | None = None,
) -> Iterator[SourceItem]:
    """`list_inputs` one item at a time (same items, same order, same errors, raised when reached),
    for callers that keep the listing in another form (the nightly job's Arrow table) and should
    not hold a `SourceItem` per input."""
    uris = [uri_or_list] if isinstance(uri_or_list, str) else list(uri_or_list)
    for uri in uris:
        yield from _iter_one(uri, storage_options, image_column)


def _iter_one(uri: str, storage_options, image_column) -> Iterator[SourceItem]:
    try:
        fs, path = _filesystem(uri, storage_options)
        info = fs.info(path)
    except FileNotFoundError:
        raise InputError(f"input {uri!r} does not exist: check the path or bucket/prefix") from None
    except Exception as e:
        raise InputError(
            f"input {uri!r} cannot be listed ({type(e).__name__}: {e}): check the URI, credentials "
            "and --storage-options"
        ) from None
    if info.get("type") == "directory":
        found = fs.find(path, detail=True)
        root = path.rstrip("/")
        for p in sorted(found):
            rel = p[len(root) :].lstrip("/") if p.startswith(root) else p
            if _is_hidden(rel):
                continue
            yield from _items_for_file(fs, p, found[p], image_column)
        return
    if _lower_ext(path) in MANIFEST_EXTENSIONS:
        yield from iter_inputs(_manifest_uris(fs, path, fs.unstrip_protocol(path)), storage_options, image_column)
        return
    items = _items_for_file(fs, path, info, image_column)
    if not items and _lower_ext(path) not in (".tar", ".parquet"):
        raise InputError(
            f"input {uri!r} is not an image, .tar shard, .parquet file or .txt manifest: "
            f"image extensions are {', '.join(IMAGE_EXTENSIONS)}"
        )
    yield from items


# ------------------------------------------------------------------------------------------------
# Read stage


def _split(uri: str, kind: str) -> tuple[str, str | None]:
    """'shard.tar#member' -> ('shard.tar', 'member'); 'f.parquet#row=3' -> ('f.parquet', '3')."""
    if kind == KIND_FILE:
        return uri, None
    container, _, member = uri.rpartition("#")
    if kind == KIND_PARQUET:
        member = member.removeprefix("row=")
    return container, member


def _read_container(container: str, kind: str, members: list[str], column: str | None, storage_options) -> dict:
    """Fetch the named members of one tar shard / Parquet file: {member: bytes or Exception}."""
    out: dict[str, Any] = {}
    fs, path = _filesystem(container, storage_options)
    if kind == KIND_TAR:
        wanted = set(members)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                if m.name in wanted:
                    fh = tar.extractfile(m)
                    out[m.name] = fh.read() if fh is not None else FileNotFoundError(f"{m.name} is not a file")
        for name in wanted - set(out):
            out[name] = FileNotFoundError(f"member {name!r} not found in {container!r}")
        return out
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        rows = sorted({int(m) for m in members})
        # Read only the row groups holding the wanted rows.
        starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
        groups = sorted({int(np.searchsorted(starts, r, side="right") - 1) for r in rows})
        for g in groups:
            values = _row_group(pf, container, g, column)
            for r in rows:
                if starts[g] <= r < starts[g + 1]:
                    v = values[r - starts[g]]
                    if isinstance(v, dict):  # HF-datasets style {"bytes": ..., "path": ...}
                        v = v.get("bytes")
                    out[str(r)] = v if v is not None else ValueError(f"row {r} has no bytes in column {column!r}")
    for m in members:
        out.setdefault(m, IndexError(f"row {m} is not in {container!r}"))
    return out


_ROW_GROUP_CACHE: dict[tuple[str, int, str], list] = {}


def _row_group(pf, container: str, group: int, column: str) -> list:
    """One row group's image column, cached (one entry per worker process): consecutive read
    batches usually come from the same row group, which would otherwise be read once per batch."""
    key = (container, group, column)
    if key not in _ROW_GROUP_CACHE:
        _ROW_GROUP_CACHE.clear()
        _ROW_GROUP_CACHE[key] = pf.read_row_group(group, columns=[column]).column(0).to_pylist()
    return _ROW_GROUP_CACHE[key]


def _describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return f"{type(e).__name__}: {text}" if type(e).__name__ not in text else text


def read_batch(
    batch: Mapping[str, np.ndarray],
    storage_options: Mapping[str, Any] | None = None,
    stage_clock: Any = None,
) -> dict[str, np.ndarray]:
    """The read stage: fetch each row's bytes.

    In: a batch of `SourceItem.to_row()` dicts (columns uri, kind, column, source_uri, ...).
    Out: columns `source_uri`, `data` (bytes; b'' on failure), `source_sha256` ('' on failure),
    `status` ('ok' or 'read_error'), `error` ('' or the reason, naming the input). Missing values
    are '' rather than None so every block has the same Arrow types.
    """
    start = time.perf_counter()
    uris = [str(u) for u in batch["uri"]]
    kinds = [str(k) for k in batch["kind"]]
    columns = [str(c) or None for c in batch["column"]] if "column" in batch else [None] * len(uris)
    results: list[Any] = [None] * len(uris)

    offsets = [int(v) for v in batch["offset"]] if "offset" in batch else [-1] * len(uris)
    sizes = [int(v) for v in batch["size"]] if "size" in batch else [-1] * len(uris)
    groups: dict[tuple[str, str, Any], list[int]] = {}
    for i, (uri, kind) in enumerate(zip(uris, kinds)):
        if kind == KIND_TAR and offsets[i] >= 0 and sizes[i] >= 0:
            try:  # one range request, no scan of the shard
                container, _ = _split(uri, kind)
                fs, path = _filesystem(container, storage_options)
                results[i] = fs.cat_file(path, start=offsets[i], end=offsets[i] + sizes[i])
                if len(results[i]) != sizes[i]:
                    raise EOFError(f"shard ended after {len(results[i])} of {sizes[i]} member bytes")
            except Exception as e:
                results[i] = e
        elif kind == KIND_FILE:
            try:
                fs, path = _filesystem(uri, storage_options)
                with fs.open(path, "rb") as f:
                    results[i] = f.read()
            except Exception as e:  # any failure is this row's status
                results[i] = e
        else:
            container, _ = _split(uri, kind)
            groups.setdefault((container, kind, columns[i]), []).append(i)
    for (container, kind, column), idx in groups.items():
        members = [_split(uris[i], kind)[1] for i in idx]
        try:
            got = _read_container(container, kind, members, column, storage_options)
        except Exception as e:
            got = {m: e for m in members}
        for i, m in zip(idx, members):
            results[i] = got[m]

    data, sha, status, error = [], [], [], []
    for uri, r in zip(uris, results):
        if isinstance(r, (bytes, bytearray, memoryview)):
            b = bytes(r)
            data.append(b)
            sha.append(hashlib.sha256(b).hexdigest())
            status.append("ok")
            error.append("")
        else:
            data.append(b"")
            sha.append("")
            status.append("read_error")
            error.append(f"cannot read {uri}: {_describe(r)}")
    out = {
        "source_uri": np.asarray(batch["source_uri"], dtype=object),
        "data": object_column(data),
        "source_sha256": np.asarray(sha, dtype=object),
        "status": np.asarray(status, dtype=object),
        "error": np.asarray(error, dtype=object),
    }
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
