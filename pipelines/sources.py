"""Sources: what to process. `list_inputs` / `iter_inputs` list on the caller (the driver for a
small run, the listing tasks of `pipelines.listing` for a large one).

`list_inputs` turns a URI (folder / object prefix / file / `.txt` manifest, any fsspec protocol) or a
list of URIs into `SourceItem`s (`pipelines.items`), one per input. What counts as an input
(README, "What counts as an input"):

- a file whose name has an image extension (`IMAGE_EXTENSIONS`, any case), whatever its content:
  the decoder decides, by content, and a non-image gets a `decode_error` row;
- a file with another name whose first bytes are an image (`psp_core.images.sniff_format`): JPEGs
  without an extension, camera files, ...; companion files named like text (`TEXT_EXTENSIONS`:
  .json, .txt, ...) are not opened;
- every member / row of a WebDataset-style `.tar` shard (uri `shard.tar#member`) and of a Parquet
  file with an image-bytes column (uri `file.parquet#row=N`; img2dataset's `url` column, when
  present, becomes the row's source_uri), by the same rules (`pipelines.containers`);
- a FIFO, socket, device node, a link to one or a dangling link: a row with status `not_a_file`;
  it is never opened;
- a `.tar` / `.parquet` that cannot be listed (corrupt, truncated, no image column): a row for the
  container itself with status `container_error`; its readable members still get their rows.

Skipped, and counted per reason in `skipped` (the run summary prints the counts): hidden entries
(a path part starting with `.`), data-lake bookkeeping (`BOOKKEEPING_NAMES`), the run's own output
when it lies inside the input, files that `--include` / `--exclude` leave out, files that are not
images (`not_an_image`), img2dataset rows that failed to download, links to directories (never
followed). A file or manifest line named explicitly is always an input.
"""
from __future__ import annotations

import os
import stat as _stat
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pipelines.containers import container_items
from pipelines.items import (
    CONTAINER_EXTENSIONS,
    IMAGE_EXTENSIONS,
    KIND_CONTAINER,
    MANIFEST_EXTENSIONS,
    SKIP_DIRECTORY_LINK,
    SKIP_NOT_IMAGE,
    SKIP_OUTPUT,
    SKIP_UNREADABLE_DIRECTORY,
    TEXT_EXTENSIONS,
    InputError,
    ListingRules,
    SourceItem,
    escape_name,
    info_etag,
    info_mtime,
    lower_ext,
    record_uri,
)
from psp_core.images import SNIFF_BYTES, sniff_format
from psp_core.uris import filesystem_for, is_local_fs


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


def folder_items(fs, root: str, rules: ListingRules, image_column: str | None,
                  skipped: Counter, storage_options, base: str | None = None,
                  files_only: bool = False) -> Iterator[SourceItem]:
    """The items below folder `root`. `base`: the INPUT folder the rules' relative paths start
    at (a listing shard walks a folder below its INPUT; default `root`). `files_only`: only the
    entries directly in `root` (its sub-folders are other shards)."""
    root = root.rstrip("/") or "/"
    if is_local_fs(fs):
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
               if info.get("type") == "file" and lower_ext(p) not in IMAGE_EXTENSIONS + CONTAINER_EXTENSIONS
               and lower_ext(p) not in TEXT_EXTENSIONS]
    heads: dict[str, bytes | None] = {}
    if unknown:
        if is_local_fs(fs):
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
        ext = lower_ext(p)
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
        yield SourceItem(uri=record_uri(fs, p), size=info.get("size"), etag=info_etag(info), mtime=info_mtime(info))


def _container_rows(fs, path: str, info, image_column, skipped) -> Iterator[SourceItem]:
    items, problem = container_items(fs, path, info, image_column, skipped)
    yield from items
    if problem is not None:
        yield SourceItem(uri=record_uri(fs, path), size=info.get("size"), etag=info_etag(info), mtime=info_mtime(info),
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
        yield from folder_items(fs, path, rules, image_column, skipped, storage_options)
        return
    ext = lower_ext(path)
    if ext in MANIFEST_EXTENSIONS and info.get("type") == "file":
        for line in _manifest_uris(fs, path):
            yield from _iter_one(line, storage_options, image_column, rules, skipped, strict=False)
        return
    if ext in CONTAINER_EXTENSIONS and info.get("type") == "file":
        yield from _container_rows(fs, path, info, image_column, skipped)
        return
    if strict and info.get("type") == "file" and ext not in IMAGE_EXTENSIONS:
        head = _sniff_local(path) if is_local_fs(fs) else fs.cat_file(path, start=0, end=SNIFF_BYTES)
        if head is not None and sniff_format(head) is None:
            raise InputError(
                f"input {uri!r} is not an image, .tar shard, .parquet file or .txt manifest: "
                f"image extensions are {', '.join(IMAGE_EXTENSIONS)}, and other files are read when "
                "their content is an image"
            )
    yield SourceItem(uri=record_uri(fs, path), size=info.get("size") if info.get("type") == "file" else None,
                     etag=info_etag(info), mtime=info_mtime(info))
