"""Locations: how every module turns a path or URI into a filesystem, one rule for all of them.

A location is a local path (absolute or relative), a `file://` URI, or `PROTOCOL://...` for any
fsspec protocol (`s3://`, `gs://`, `memory://`, ...). There is no URL chaining: `::` is an
ordinary character of a name (`a::b.jpg` is a file, `simplecache::s3://...` is not a cache), so
a location means the same thing to the listing, the readers, the table and the checkpoint loader.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")


def protocol_of(uri: str) -> str:
    """'s3://b/k' -> 's3'; '/a/b', 'a/b', 'file:///a' -> 'file'."""
    head, sep, _ = str(uri).partition("://")
    return head.lower() if sep and _SCHEME.fullmatch(head) else "file"


def is_local(uri: str | os.PathLike) -> bool:
    """True for a local path or a `file://` URI."""
    return protocol_of(os.fspath(uri)) in ("file", "local")


def local_path(uri: str | os.PathLike) -> str:
    """A local location as an absolute path (`file://` removed)."""
    uri = os.fspath(uri)
    return os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)


def is_local_fs(fs: Any) -> bool:
    """True for fsspec's local filesystem."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def filesystem_for(uri: str | os.PathLike, storage_options: Mapping[str, Any] | None = None):
    """(fsspec filesystem, path on it) for a location: local paths absolute, no URL chaining.
    `storage_options` are the fsspec filesystem's keyword arguments (`--storage-options`)."""
    import fsspec

    uri = os.fspath(uri)
    protocol = protocol_of(uri)
    fs = fsspec.filesystem(protocol, **dict(storage_options or {}))
    path = fs._strip_protocol(uri if protocol != "file" or "://" in uri else os.path.abspath(uri))
    return fs, path


def open_uri(uri: str | os.PathLike, mode: str = "rb", storage_options: Mapping[str, Any] | None = None, **kwargs):
    """`open` for a location (a file object; text modes take `encoding=` etc.), by the same rule."""
    fs, path = filesystem_for(uri, storage_options)
    return fs.open(path, mode, **kwargs)
