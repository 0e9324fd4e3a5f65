"""One input: what it is (`SourceItem`), how its URI is written, and the rules on names.

Kinds: a file (`file`), a member of a WebDataset-style `.tar` shard (`tar_member`, uri
`shard.tar#member`), a row of a Parquet file with an image-bytes column (`parquet_row`, uri
`file.parquet#row=N`), or a `.tar` / `.parquet` that could not be listed (`container`: its row says
why).

URIs: names are used exactly as the file system / object store has them (no fsspec URL chaining,
`::` and `#` are ordinary characters: `psp_core.uris`). In a recorded URI `%` is written `%25`, a
byte of a name that is not UTF-8 `%XX`, and `#` inside a tar member name `%23`, so that every URI is
valid UTF-8 and `container#member` splits unambiguously (`split_uri` undoes it).

Names: which extensions are images, containers, manifests or text, which path parts are hidden or
a data lake's bookkeeping, and `ListingRules` (`--include` / `--exclude`, the output inside the
input), shared by the folder listing (`pipelines.sources`) and the container listing
(`pipelines.containers`).
"""
from __future__ import annotations

import datetime as _dt
import fnmatch
import re
import stat as _stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

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


def split_uri(uri: str, kind: str) -> tuple[str, str | None]:
    """An escaped item uri -> (raw container or file URI, raw member / row number or None)."""
    if kind in (KIND_FILE, KIND_CONTAINER):
        return unescape_name(uri), None
    container, _, member = uri.rpartition("#")
    if kind == KIND_PARQUET:
        return unescape_name(container), member.removeprefix("row=")
    return unescape_name(container), unescape_name(member)


def record_uri(fs, path: str) -> str:
    return escape_name(fs.unstrip_protocol(path))


def describe_error(e: BaseException) -> str:
    """An exception as a row's error text: its type name once, then its message."""
    text = str(e) or type(e).__name__
    return f"{type(e).__name__}: {text}" if type(e).__name__ not in text else text


# ------------------------------------------------------------------------------------------------
# Names and listing facts


def lower_ext(path: str) -> str:
    name = path.rsplit("/", 1)[-1].lower()
    return name[name.rfind(".") :] if "." in name else ""


def is_image_path(path: str) -> bool:
    return lower_ext(path) in IMAGE_EXTENSIONS


def info_mtime(info: Mapping[str, Any]) -> float | None:
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


def info_etag(info: Mapping[str, Any]) -> str | None:
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


FILE_TYPES = (
    (_stat.S_ISFIFO, "a named pipe (FIFO)"),
    (_stat.S_ISSOCK, "a socket"),
    (_stat.S_ISCHR, "a character device"),
    (_stat.S_ISBLK, "a block device"),
    (_stat.S_ISDIR, "a directory"),
)


def not_regular(path: str, mode: int, islink: bool) -> InputProblem:
    what = next((name for test, name in FILE_TYPES if test(mode)), "not a regular file")
    link = "a symbolic link to " if islink else ""
    return InputProblem(st.NOT_A_FILE, f"is {link}{what}, not a regular file: not read")


def mtime_us(value: Any) -> int | None:
    """A listing's mtime (epoch seconds, datetime or ISO string) as integer microseconds (UTC)."""
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        value = (value if value.tzinfo else value.replace(tzinfo=_dt.UTC)).timestamp()
    elif isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return mtime_us(_dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
    value = float(value)
    return None if np.isnan(value) else int(round(value * 1e6))
