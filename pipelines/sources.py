"""Sources: what to process. Listing runs on the driver; fetching bytes runs in Ray read tasks.

`list_inputs` turns a URI (folder / object prefix / file / `.txt` manifest, any fsspec protocol) or a
list of URIs into `SourceItem`s, one per input. What counts as an input (README, "What counts as an
input"):

- a file whose name has an image extension (`IMAGE_EXTENSIONS`, any case), whatever its content:
  the decoder decides, by content, and a non-image gets a `decode_error` row;
- a file with another name whose first bytes are an image (`psp_core.images.sniff_format`): JPEGs
  without an extension, camera files, ...; companion files named like text (`TEXT_EXTENSIONS`:
  .json, .txt, ...) are not opened;
- every member / row of a WebDataset-style `.tar` shard (uri `shard.tar#member`) and of a Parquet
  file with an image-bytes column (uri `file.parquet#row=N`; img2dataset's `url` column, when
  present, becomes the row's source_uri), by the same rules;
- a FIFO, socket, device node, a link to one or a dangling link: a row with status `not_a_file`;
  it is never opened;
- a `.tar` / `.parquet` that cannot be listed (corrupt, truncated, no image column): a row for the
  container itself with status `container_error`; its readable members still get their rows.

Skipped, and counted per reason in `skipped` (the run summary prints the counts): hidden entries
(a path part starting with `.`), data-lake bookkeeping (`BOOKKEEPING_NAMES`), the run's own output
when it lies inside the input, files that `--include` / `--exclude` leave out, files that are not
images (`not_an_image`), img2dataset rows that failed to download, links to directories (never
followed). A file or manifest line named explicitly is always an input.

URIs: names are used exactly as the file system / object store has them (no fsspec URL chaining,
`::` and `#` are ordinary characters). In a recorded URI `%` is written `%25`, a byte of a name
that is not UTF-8 `%XX`, and `#` inside a tar member name `%23`, so that every URI is valid UTF-8
and `container#member` splits unambiguously (`uri_to_path` undoes it).

`read_batch` is the read stage: it fetches each item's bytes (one open per container file in a
batch, each fetch under a time limit) and never raises: a failure becomes the row's status.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import queue
import re
import stat as _stat
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from psp_core.images import SNIFF_BYTES, sniff_format
from schemas import status as st

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".dib", ".gif", ".ppm", ".pgm", ".pbm",
    ".pnm", ".tif", ".tiff", ".webp", ".heic", ".heif", ".avif", ".jp2", ".j2k", ".qoi",
)
CONTAINER_EXTENSIONS = (".tar", ".parquet")
MANIFEST_EXTENSIONS = (".txt", ".lst")
#: Companion and metadata files: never opened to sniff (WebDataset sidecars, img2dataset stats).
TEXT_EXTENSIONS = (
    ".json", ".jsonl", ".txt", ".csv", ".tsv", ".md", ".xml", ".yaml", ".yml", ".html", ".htm", ".log",
    ".cls", ".lst", ".py", ".sh", ".ini", ".toml", ".crc",
)
#: Path parts that are a data lake's bookkeeping, not data (Delta log, Spark/Hadoop markers).
BOOKKEEPING_NAMES = ("_delta_log", "_temporary", "_spark_metadata", "_SUCCESS", "_SUCCESS.json")
IMAGE_COLUMNS = ("jpg", "png", "image", "bytes", "jpeg", "webp")
#: Default time limit of one read (one file, or one container's members in a batch), seconds.
DEFAULT_READ_TIMEOUT_S = 120.0

KIND_FILE = "file"
KIND_TAR = "tar_member"
KIND_PARQUET = "parquet_row"
KIND_CONTAINER = "container"  # a .tar / .parquet that could not be listed: its row says why

# skip reasons (keys of the `skipped` counter)
SKIP_HIDDEN = "hidden"
SKIP_BOOKKEEPING = "bookkeeping"
SKIP_OUTPUT = "output"
SKIP_EXCLUDED = "excluded"
SKIP_NOT_IMAGE = "not_an_image"
SKIP_NOT_DOWNLOADED = "not_downloaded"
SKIP_DIRECTORY_LINK = "directory_link"
SKIP_UNREADABLE_DIRECTORY = "unreadable_directory"


@dataclass(frozen=True)
class SourceItem:
    """One input.

    uri: where the bytes are: a file URI, `shard.tar#member`, or `file.parquet#row=N` (escaped as
    the module docstring says). size: bytes (None where unknown). etag / mtime: from the object
    store (None where the filesystem has none); mtime in seconds since the epoch. kind: 'file',
    'tar_member', 'parquet_row' or 'container' (a container that could not be listed).
    url: the original URL for img2dataset Parquet rows (then it is the row's `source_uri`).
    column: Parquet rows: the column holding the image bytes; containers: the requested one.
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

    def to_row(self) -> dict[str, Any]:
        """The read stage's input row (`pipelines.listing.SHARD_SCHEMA`): no None (columns that
        are all None in one block would get another Arrow type than in the next)."""
        return {
            "uri": self.uri,
            "kind": self.kind,
            "column": self.column or "",
            "source_uri": self.source_uri,
            "offset": -1 if self.offset is None else int(self.offset),
            "size": -1 if self.size is None else int(self.size),
            "etag": str(self.etag).strip('"') if self.etag else "",
            "mtime": float("nan") if self.mtime is None else float(self.mtime),
        }


class InputError(ValueError):
    """An input location that cannot be listed; the message says what to check."""


class InputProblem(Exception):
    """A permanent property of one input (`status` from schemas.status): not retried."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------------------
# URIs


_ESCAPED = re.compile(r"%([0-9A-Fa-f]{2})")


def escape_name(text: str) -> str:
    """A path / key / URI as recorded: `%` -> `%25`, a non-UTF-8 byte (a surrogate-escaped str
    from the OS) -> `%XX`. Everything else is kept as is."""
    if "%" not in text and text.isascii():
        return text
    out = []
    for ch in text:
        if ch == "%":
            out.append("%25")
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"%{ord(ch) - 0xDC00:02X}")
        else:
            out.append(ch)
    return "".join(out)


def escape_member(name: str) -> str:
    """A tar member name as it follows `shard.tar#`: `escape_name`, and `#` -> `%23`."""
    return escape_name(name).replace("#", "%23")


def unescape_name(text: str) -> str:
    """Inverse of `escape_name` / `escape_member`."""
    if "%" not in text:
        return text

    def one(m: re.Match) -> str:
        b = int(m.group(1), 16)
        return chr(b) if b < 0x80 else chr(0xDC00 + b)

    return _ESCAPED.sub(one, text)


def _protocol(uri: str) -> tuple[str, str]:
    """'s3://b/k' -> ('s3', 'b/k'); '/a/b' or 'a/b' -> ('file', '/abs/a/b'). No URL chaining."""
    head, sep, rest = uri.partition("://")
    if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", head):
        return head.lower(), rest
    return "file", uri


def filesystem_for(uri: str, storage_options: Mapping[str, Any] | None = None):
    """(fsspec filesystem, path) for a raw (unescaped) URI or local path, without URL chaining:
    `a::b.jpg` is a file name, not a chain."""
    import fsspec

    protocol, _ = _protocol(uri)
    fs = fsspec.filesystem(protocol, **dict(storage_options or {}))
    path = fs._strip_protocol(uri if protocol != "file" or "://" in uri else os.path.abspath(uri))
    return fs, path


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def split_uri(uri: str, kind: str) -> tuple[str, str | None]:
    """An escaped item uri -> (raw container or file URI, raw member / row number or None)."""
    if kind in (KIND_FILE, KIND_CONTAINER):
        return unescape_name(uri), None
    container, _, member = uri.rpartition("#")
    if kind == KIND_PARQUET:
        return unescape_name(container), member.removeprefix("row=")
    return unescape_name(container), unescape_name(member)


def _record(fs, path: str) -> str:
    return escape_name(fs.unstrip_protocol(path))


# ------------------------------------------------------------------------------------------------
# Listing


def _lower_ext(path: str) -> str:
    name = path.rsplit("/", 1)[-1].lower()
    return name[name.rfind(".") :] if "." in name else ""


def is_image_path(path: str) -> bool:
    return _lower_ext(path) in IMAGE_EXTENSIONS


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


@dataclass(frozen=True)
class ListingRules:
    """Which files under a folder are inputs: `include` / `exclude` globs (a pattern without `/`
    matches the file name, one with `/` the path below the input folder; `*` matches anything),
    and the output location to leave out when it lies inside the input."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    output: str | None = None

    def skip_reason(self, rel: str) -> str | None:
        parts = [p for p in rel.split("/") if p and p != "."]  # './x.jpg' (tar of '.') is not hidden
        if any(p.startswith(".") and p != ".." for p in parts):  # a tar member '../x.jpg' is only a name
            return SKIP_HIDDEN
        if any(p in BOOKKEEPING_NAMES for p in parts):
            return SKIP_BOOKKEEPING
        name = parts[-1] if parts else rel
        if self.include and not any(_glob(rel, name, g) for g in self.include):
            return SKIP_EXCLUDED
        if any(_glob(rel, name, g) for g in self.exclude):
            return SKIP_EXCLUDED
        return None


def _glob(rel: str, name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(rel if "/" in pattern else name, pattern.strip("/") if "/" in pattern else pattern)


def _container_items(fs, path: str, info: Mapping[str, Any], image_column: str | None,
                     skipped: Counter) -> tuple[list[SourceItem], str | None]:
    """The items of one .tar / .parquet, and the container problem (None when it listed fine)."""
    uri = _record(fs, path)
    ext = _lower_ext(path)
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
        return items, f"{uri}: not {what} ({_describe(e)}){after}: re-create or remove it"


def _tar_items(fs, path: str, uri: str, info: Mapping[str, Any], items: list, skipped: Counter) -> None:
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if member.isdir():
                continue
            reason = ListingRules().skip_reason(member.name)
            if reason is not None:
                skipped[reason] += 1
                continue
            ext = _lower_ext(member.name)
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
                    etag=_etag(info),
                    mtime=float(member.mtime) if member.mtime else _mtime(info),
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
                etag=_etag(info),
                mtime=_mtime(info),
                kind=KIND_PARQUET,
                url=str(urls[row]) if urls[row] else None,
                column=column,
            )
        )


def _manifest_uris(fs, path: str) -> list[str]:
    base = fs.unstrip_protocol(path).rsplit("/", 1)[0]
    out = []
    with fs.open(path, "rt", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            out.append(line if ("://" in line or line.startswith("/")) else f"{base}/{line}")
    return out


def _local_entries(root: str, skipped: Counter, recursive: bool = True) -> Iterator[tuple[str, dict]]:
    """(path, info) for everything below a local folder that is not a directory, symlinked
    directories included (info type 'directory_link'), without following links into folders
    (`recursive=False`: only the folder's own entries). info type: 'file' (regular, or a link to
    one), 'other' (FIFO, socket, device, a link to one, a dangling link)."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            skipped[SKIP_UNREADABLE_DIRECTORY] += 1
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    if recursive:
                        stack.append(e.path)
                    continue
                islink = e.is_symlink()
                try:
                    s = os.stat(e.path)
                except OSError:  # dangling link (or a loop)
                    yield e.path, {"type": "other", "size": None, "islink": islink}
                    continue
                kind = "file" if _stat.S_ISREG(s.st_mode) else "directory_link" if _stat.S_ISDIR(s.st_mode) else "other"
                yield e.path, {"type": kind, "size": s.st_size if kind == "file" else None,
                               "mtime": s.st_mtime, "islink": islink}
            except OSError:
                yield e.path, {"type": "other", "size": None}


def _sniff_local(path: str) -> bytes | None:
    """The first bytes of a local regular file (opened non-blocking, checked regular after opening:
    a file swapped for a FIFO since the listing is not waited on), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError:
        return None
    try:
        if not _stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, SNIFF_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)


def _folder_items(fs, root: str, rules: ListingRules, image_column: str | None,
                  skipped: Counter, storage_options, base: str | None = None,
                  files_only: bool = False) -> Iterator[SourceItem]:
    """The items below folder `root`. `base`: the INPUT folder the rules' relative paths start
    at (a listing shard walks a folder below its INPUT; default `root`). `files_only`: only the
    entries directly in `root` (its sub-folders are other shards)."""
    root = root.rstrip("/") or "/"
    if _is_local(fs):
        entries = dict(_local_entries(root, skipped, recursive=not files_only))
    else:
        entries = fs.find(root, detail=True, maxdepth=1 if files_only else None)
    root = (base.rstrip("/") or "/") if base is not None else root
    out_prefix = None
    if rules.output:
        ofs, opath = filesystem_for(rules.output, storage_options)
        if type(ofs) is type(fs):
            out_prefix = opath.rstrip("/")
    candidates: list[tuple[str, dict]] = []
    for p in sorted(entries):
        rel = p[len(root) :].lstrip("/") if p.startswith(root) else p
        if out_prefix and (p == out_prefix or p.startswith(out_prefix + "/")):
            skipped[SKIP_OUTPUT] += 1
            continue
        reason = rules.skip_reason(rel)
        if reason is not None:
            skipped[reason] += 1
            continue
        candidates.append((p, entries[p]))
    # Files that are neither named as images nor as containers nor as text: sniffed (one batched
    # request per listing on object stores).
    unknown = [p for p, info in candidates
               if info.get("type") == "file" and _lower_ext(p) not in IMAGE_EXTENSIONS + CONTAINER_EXTENSIONS
               and _lower_ext(p) not in TEXT_EXTENSIONS]
    heads: dict[str, bytes | None] = {}
    if unknown:
        if _is_local(fs):
            heads = {p: _sniff_local(p) for p in unknown}
        else:
            got = fs.cat_ranges(unknown, [0] * len(unknown), [SNIFF_BYTES] * len(unknown), on_error="return")
            heads = {p: (g if isinstance(g, bytes) else None) for p, g in zip(unknown, got)}
    for p, info in candidates:
        kind = info.get("type")
        if kind == "directory_link":
            skipped[SKIP_DIRECTORY_LINK] += 1
            continue
        if kind in ("directory",):
            continue
        ext = _lower_ext(p)
        if kind == "file" and ext in CONTAINER_EXTENSIONS:
            yield from _container_rows(fs, p, info, image_column, skipped)
            continue
        if kind == "file" and ext not in IMAGE_EXTENSIONS:
            if ext in TEXT_EXTENSIONS:
                skipped[SKIP_NOT_IMAGE] += 1
                continue
            head = heads.get(p)
            if head is not None and sniff_format(head) is None:
                skipped[SKIP_NOT_IMAGE] += 1
                continue
            # an image by content, or a file that could not be sniffed: its row says what happens
        yield SourceItem(uri=_record(fs, p), size=info.get("size"), etag=_etag(info), mtime=_mtime(info))


def _container_rows(fs, path: str, info, image_column, skipped) -> Iterator[SourceItem]:
    items, problem = _container_items(fs, path, info, image_column, skipped)
    yield from items
    if problem is not None:
        yield SourceItem(uri=_record(fs, path), size=info.get("size"), etag=_etag(info), mtime=_mtime(info),
                         kind=KIND_CONTAINER, column=image_column)


def list_inputs(
    uri_or_list: str | Sequence[str],
    storage_options: Mapping[str, Any] | None = None,
    image_column: str | None = None,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    output: str | None = None,
    skipped: Counter | None = None,
) -> list[SourceItem]:
    """List every input under `uri_or_list`, sorted by uri within each location.

    A folder/prefix is walked recursively by the rules of the module docstring (`include` /
    `exclude` globs, `output` left out when inside); a `.txt`/`.lst` file is a manifest with one
    URI per line (relative ones resolve against the manifest's folder); `.tar` and `.parquet`
    files expand to one item per image. `skipped` (a Counter), when given, receives the number of
    files left out per reason. Naming a missing location, or a non-image file directly, raises
    InputError; problems of single files never raise (they become rows).
    """
    return list(iter_inputs(uri_or_list, storage_options, image_column, include=include, exclude=exclude,
                            output=output, skipped=skipped))


def iter_inputs(
    uri_or_list: str | Sequence[str],
    storage_options: Mapping[str, Any] | None = None,
    image_column: str | None = None,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    output: str | None = None,
    skipped: Counter | None = None,
) -> Iterator[SourceItem]:
    """`list_inputs` one item at a time (same items, same order, same errors, raised when reached),
    for callers that keep the listing in another form (the nightly job's Arrow table) and should
    not hold a `SourceItem` per input."""
    rules = ListingRules(tuple(include or ()), tuple(exclude or ()), output)
    counter = skipped if skipped is not None else Counter()
    uris = [uri_or_list] if isinstance(uri_or_list, str) else list(uri_or_list)
    for uri in uris:
        yield from _iter_one(uri, storage_options, image_column, rules, counter, strict=True)


def _iter_one(uri: str, storage_options, image_column, rules: ListingRules, skipped: Counter,
              strict: bool) -> Iterator[SourceItem]:
    try:
        fs, path = filesystem_for(uri, storage_options)
        info = fs.info(path)
    except FileNotFoundError:
        if strict:
            raise InputError(f"input {uri!r} does not exist: check the path or bucket/prefix") from None
        # a manifest line naming a missing file: its row says so (read_error, retried)
        yield SourceItem(uri=escape_name(uri if "://" in uri else f"file://{os.path.abspath(uri)}"))
        return
    except Exception as e:
        if strict:
            raise InputError(
                f"input {uri!r} cannot be listed ({type(e).__name__}: {e}): check the URI, credentials "
                "and --storage-options"
            ) from None
        yield SourceItem(uri=escape_name(uri))
        return
    if info.get("type") == "directory":
        yield from _folder_items(fs, path, rules, image_column, skipped, storage_options)
        return
    ext = _lower_ext(path)
    if ext in MANIFEST_EXTENSIONS and info.get("type") == "file":
        for line in _manifest_uris(fs, path):
            yield from _iter_one(line, storage_options, image_column, rules, skipped, strict=False)
        return
    if ext in CONTAINER_EXTENSIONS and info.get("type") == "file":
        yield from _container_rows(fs, path, info, image_column, skipped)
        return
    if strict and info.get("type") == "file" and ext not in IMAGE_EXTENSIONS:
        head = _sniff_local(path) if _is_local(fs) else fs.cat_file(path, start=0, end=SNIFF_BYTES)
        if head is not None and sniff_format(head) is None:
            raise InputError(
                f"input {uri!r} is not an image, .tar shard, .parquet file or .txt manifest: "
                f"image extensions are {', '.join(IMAGE_EXTENSIONS)}, and other files are read when "
                "their content is an image"
            )
    yield SourceItem(uri=_record(fs, path), size=info.get("size") if info.get("type") == "file" else None,
                     etag=_etag(info), mtime=_mtime(info))


# ------------------------------------------------------------------------------------------------
# Read stage


_FILE_TYPES = (
    (_stat.S_ISFIFO, "a named pipe (FIFO)"),
    (_stat.S_ISSOCK, "a socket"),
    (_stat.S_ISCHR, "a character device"),
    (_stat.S_ISBLK, "a block device"),
    (_stat.S_ISDIR, "a directory"),
)


def _not_regular(path: str, mode: int, islink: bool) -> InputProblem:
    what = next((name for test, name in _FILE_TYPES if test(mode)), "not a regular file")
    link = "a symbolic link to " if islink else ""
    return InputProblem(st.NOT_A_FILE, f"is {link}{what}, not a regular file: not read")


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
        raise _not_regular(path, mode, islink)
    # Non-blocking open and a check after opening: a file swapped for a FIFO is not waited on.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        fstat = os.fstat(fd)
        if not _stat.S_ISREG(fstat.st_mode):
            raise _not_regular(path, fstat.st_mode, islink)
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
    if _is_local(fs):
        return _read_local(path)
    return _cat(fs, path)


def _read_tar_range(uri: str, offset: int, size: int, storage_options) -> bytes:
    container, _ = split_uri(uri, KIND_TAR)
    fs, path = filesystem_for(container, storage_options)
    data = _cat(fs, path, start=offset, end=offset + size)
    if len(data) != size:
        raise EOFError(f"shard ended after {len(data)} of {size} member bytes")
    return data


def _read_container_row(uri: str, column: str | None, storage_options) -> bytes:
    """The row of a container that could not be listed: listed again, its problem is the status."""
    container, _ = split_uri(uri, KIND_CONTAINER)
    fs, path = filesystem_for(container, storage_options)
    info = fs.info(path)
    _, problem = _container_items(fs, path, info, column, Counter())
    if problem is not None:
        raise InputProblem(st.CONTAINER_ERROR, problem)
    raise RuntimeError("the container lists fine now; rerun to process its images")


def _read_container(container: str, kind: str, members: list[str], column: str | None, storage_options) -> dict:
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
            problem = InputProblem(st.CONTAINER_ERROR, f"shard {container} is corrupt ({_describe(e)})")
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
                raise InputProblem(st.CONTAINER_ERROR, f"{container} is not a readable Parquet file ({_describe(e)})") from None
            raise
        rows = sorted({int(m) for m in members})
        # Read only the row groups holding the wanted rows.
        starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
        groups = sorted({int(np.searchsorted(starts, r, side="right") - 1) for r in rows})
        for g in groups:
            try:
                values = _row_group(pf, container, g, column)
            except pa.ArrowInvalid as e:
                problem = InputProblem(st.CONTAINER_ERROR, f"row group {g} of {container} is corrupt ({_describe(e)})")
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
        return InputProblem(st.NOT_A_FILE, f"is a tar link that leads nowhere ({_describe(e)})")
    return fh.read() if fh is not None else _not_regular(m.name, _tar_mode(m), False)


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


def _describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return f"{type(e).__name__}: {text}" if type(e).__name__ not in text else text


class ReadTimeout(TimeoutError):
    """A read that did not finish within its time limit."""


class _ReadThreads:
    """Daemon threads that run read calls, kept for the life of the process (a read task's or
    actor's worker): starting a thread per read cost more than a small read. A call starts at
    once (an idle thread takes it, or a new one is started), as with a thread per call; a thread
    whose call never returns (a stalled read) is simply never idle again."""

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.idle = 0

    def submit(self, call) -> tuple[list, threading.Event]:
        box: list[Any] = [None]
        done = threading.Event()
        with self.lock:
            if self.idle:
                self.idle -= 1
            else:
                threading.Thread(target=self._work, daemon=True, name="psp-read").start()
        self.jobs.put((call, box, done))
        return box, done

    def _work(self) -> None:
        while True:
            call, box, done = self.jobs.get()
            try:
                box[0] = call()
            except BaseException as e:  # noqa: BLE001 - handed back as the row's result
                box[0] = e
            finally:
                del call
                done.set()
            with self.lock:
                self.idle += 1


_read_threads = _ReadThreads()


def _with_time_limits(calls: list, timeout_s: float | None) -> list:
    """Run the zero-argument `calls` concurrently on daemon threads; each result is its return
    value or the exception it raised, or ReadTimeout when it ran over `timeout_s` (its thread is
    abandoned: a stalled read cannot hold the stage)."""
    if not calls:
        return []
    deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)
    jobs = [_read_threads.submit(call) for call in calls]
    out = []
    for box, done in jobs:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if done.wait(left):
            out.append(box[0])
        else:
            out.append(ReadTimeout(f"timed out after {timeout_s:g} s (the read time limit); retried by a rerun"))
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
    s, NaN: none), when the batch has them. Missing values are '' rather than None so every block
    has the same Arrow types.
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
            calls.append(lambda u=uri, c=columns[i]: _read_container_row(u, c, storage_options))
            targets.append([(i, None)])
        else:
            container, _ = split_uri(uri, kind)
            groups.setdefault((container, kind, columns[i]), []).append(i)
    for (container, kind, column), idx in groups.items():
        members = [split_uri(uris[i], kind)[1] for i in idx]
        calls.append(lambda c=container, k=kind, m=members, col=column: _read_container(c, k, m, col, storage_options))
        targets.append(list(zip(idx, members)))

    results: list[Any] = [None] * len(uris)
    for got, answers in zip(_with_time_limits(calls, timeout_s), targets):
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
            error.append(f"cannot read {uri}: {_describe(r) if r is not None else 'no result'}")
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
