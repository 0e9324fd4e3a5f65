"""What a user can put in a bucket: non-regular files, broken containers, hostile but legal names,
metadata-heavy images, camera and extensionless files, stalled objects. Nothing of it may hang,
crash the listing, be read from the wrong path, or be dropped without a row or a counted reason.
Listing and the read/decode stages run for real (local files, tar, Parquet, moto S3, an HTTP
server that stalls); the end-to-end Ray run of a hostile folder is in tests/test_pipeline.py."""
from __future__ import annotations

import http.server
import io
import os
import socket
import struct
import tarfile
import threading
import time
import zlib
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, PngImagePlugin

from pipelines.decode import DecodeImages
from pipelines.items import InputError, SourceItem
from pipelines.read import read_batch
from pipelines.sources import list_inputs
from psp_core.images import ImageDecodeError, load_image, sniff_format
from schemas.status import FINAL_STATUSES, STATUSES

# A hang is a failure, not a stuck CI job.
pytestmark = pytest.mark.timeout(120)


def _batch(items: list[SourceItem]) -> dict[str, np.ndarray]:
    rows = [i.to_row() for i in items]
    return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


def _read(items, storage_options=None, timeout_s=10.0) -> dict[str, np.ndarray]:
    return read_batch(_batch(items), storage_options=storage_options, timeout_s=timeout_s)


def _rows(items, **kw) -> dict[str, tuple[str, str, bytes]]:
    got = _read(items, **kw)
    return {u: (s, e, d) for u, s, e, d in zip(got["source_uri"], got["status"], got["error"], got["data"])}


def _jpeg(size=(64, 48), color=(200, 30, 40), **save) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", size, color).save(b, "JPEG", **save)
    return b.getvalue()


def _png(img: Image.Image, **save) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG", **save)
    return b.getvalue()


# ------------------------------------------------------------------------------------------------
# 1. non-regular files


def test_fifo_socket_device_and_links_get_a_permanent_row_and_are_never_opened(tmp_path):
    (tmp_path / "good.jpg").write_bytes(_jpeg())
    os.mkfifo(tmp_path / "pipe.jpg")
    os.mkfifo(tmp_path / "pipe_no_ext")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock.png"))
    (tmp_path / "link_to_pipe.jpg").symlink_to(tmp_path / "pipe.jpg")
    (tmp_path / "device.jpg").symlink_to("/dev/zero")  # reading it would never end
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "link_to_good.jpg").symlink_to(tmp_path / "good.jpg")
    (tmp_path / "sub").mkdir()
    (tmp_path / "dir_link").symlink_to(tmp_path / "sub")

    skipped: Counter = Counter()
    items = list_inputs(str(tmp_path), skipped=skipped)
    root = f"file://{tmp_path}"
    assert {i.uri for i in items} == {f"{root}/{n}" for n in (
        "good.jpg", "pipe.jpg", "pipe_no_ext", "sock.png", "link_to_pipe.jpg", "device.jpg", "dangling.jpg",
        "link_to_good.jpg")}
    assert skipped == {"directory_link": 1}  # links to folders are not followed, but counted

    t0 = time.monotonic()
    rows = _rows(items, timeout_s=5.0)
    assert time.monotonic() - t0 < 4.0  # nothing waited on a writer or read /dev/zero
    assert rows[f"{root}/good.jpg"][0] == rows[f"{root}/link_to_good.jpg"][0] == "ok"
    for name, what in [("pipe.jpg", "named pipe (FIFO)"), ("pipe_no_ext", "named pipe (FIFO)"),
                       ("sock.png", "socket"), ("link_to_pipe.jpg", "symbolic link to a named pipe"),
                       ("device.jpg", "symbolic link to a character device"), ("dangling.jpg", "dangling symbolic link")]:
        status, error, data = rows[f"{root}/{name}"]
        assert status == "not_a_file" and name in error and what in error and data == b"", (name, error)
    assert "not_a_file" in FINAL_STATUSES  # a rerun leaves them alone
    sock.close()


def test_special_tar_members_get_not_a_file_rows(tmp_path):
    shard = tmp_path / "special.tar"
    with tarfile.open(shard, "w") as tar:
        for name, kind, target in [("fifo.jpg", tarfile.FIFOTYPE, ""), ("dangling.jpg", tarfile.SYMTYPE, "gone.jpg"),
                                   ("real.jpg", tarfile.REGTYPE, ""), ("alias.jpg", tarfile.SYMTYPE, "real.jpg")]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            blob = _jpeg() if kind == tarfile.REGTYPE else b""
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    rows = _rows(list_inputs(str(shard)))
    status = {u.rsplit("#", 1)[1]: (s, e) for u, (s, e, _) in rows.items()}
    assert status["real.jpg"][0] == status["alias.jpg"][0] == "ok"
    assert status["fifo.jpg"][0] == "not_a_file" and "named pipe" in status["fifo.jpg"][1]
    assert status["dangling.jpg"][0] == "not_a_file" and "leads nowhere" in status["dangling.jpg"][1]


# ------------------------------------------------------------------------------------------------
# 2. broken containers


def _tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_broken_containers_become_rows_and_the_listing_goes_on(tmp_path):
    good = _jpeg()
    (tmp_path / "a_good.jpg").write_bytes(good)
    (tmp_path / "corrupt.tar").write_bytes(os.urandom(3000))
    _tar(tmp_path / "whole.tar", [("m1.jpg", good), ("m2.jpg", good)])
    blob = (tmp_path / "whole.tar").read_bytes()
    (tmp_path / "truncated.tar").write_bytes(blob[:1024 + 512] + b"\x07" * 700)  # m1 whole, then garbage
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1" + os.urandom(500) + b"PAR1")
    pq.write_table(pa.table({"caption": ["a face"], "pixels": [good]}), tmp_path / "no_image_column.parquet")
    pq.write_table(pa.table({"jpg": [good, None, b""]}), tmp_path / "cells.parquet")

    items = list_inputs(str(tmp_path))  # must not raise
    root = f"file://{tmp_path}"
    rows = _rows(items)
    assert rows[f"{root}/a_good.jpg"][0] == "ok"
    assert rows[f"{root}/truncated.tar#m1.jpg"][0] == "ok"  # what could be listed is kept
    for name, says in [("corrupt.tar", ".tar shard"), ("truncated.tar", ".tar shard"),
                       ("corrupt.parquet", "Parquet"), ("no_image_column.parquet", "--image-column")]:
        status, error, _ = rows[f"{root}/{name}"]
        assert status == "container_error" and name in error and says in error, (name, error)
    assert rows[f"{root}/cells.parquet#row=0"][0] == "ok"
    for r in (1, 2):  # null and empty cells: a property of the input, not retried
        status, error, _ = rows[f"{root}/cells.parquet#row={r}"]
        assert status == "decode_error" and "no image bytes" in error
    assert "container_error" in FINAL_STATUSES
    assert len(rows) == len(items)  # one row per input


# ------------------------------------------------------------------------------------------------
# 3. hostile but legal names


def _every_name_byte() -> list[bytes]:
    """One file name per byte a Linux file name may hold (all but NUL and '/'), plus the names that
    fsspec or a URI parser would misread."""
    names = [b"n" + bytes([c]) + b".jpg" for c in range(1, 256) if c != ord("/")]
    names += [b"a::b.jpg", b"c#d.jpg", b"e%23f.jpg", b"%41.jpg", b"s3:x.jpg", b"zip::file.jpg", b"-x.jpg",
              b"~home.jpg", "gr\u00fc\u00dfe \u6f22\u5b57 \U0001f600.jpg".encode(), b"q?versionId=1.jpg", b"x.jpg ",
              b"\xff\xfe.jpg", b"trailing.jpg#row=3"]
    return names


def test_every_byte_a_local_file_name_may_hold(tmp_path):
    root = os.fsencode(str(tmp_path / "w#e::ird%20root"))
    os.mkdir(root)
    expected = {}
    for i, name in enumerate(_every_name_byte()):
        payload = b"\xff\xd8\xff payload %d" % i  # sniffs as a JPEG: names like 'x.jpg ' count too
        with open(os.path.join(root, name), "wb") as f:
            f.write(payload)
        expected[payload] = name
    items = list_inputs(os.fsdecode(root))
    assert len(items) == len(expected) and len({i.uri for i in items}) == len(items)
    got = _read(items)
    assert set(got["status"]) == {"ok"}, [e for e in got["error"] if e][:3]
    assert sorted(got["data"]) == sorted(expected)  # each name read from its own file
    pa.array(list(got["source_uri"]), pa.string())  # every recorded URI is valid UTF-8


def test_every_byte_a_tar_member_name_may_hold(tmp_path):
    members = [(n.decode("utf-8", "surrogateescape"), b"\xff\xd8\xff member %d" % i)
               for i, n in enumerate(_every_name_byte())]
    shard = tmp_path / "odd#shard::x.tar"
    _tar(shard, members)
    items = list_inputs(str(shard))
    assert len(items) == len(members)
    got = _read(items)
    assert set(got["status"]) == {"ok"}, [e for e in got["error"] if e][:3]
    assert sorted(got["data"]) == sorted(b for _, b in members)
    # Scanning the shard (no offset) finds the same members by name.
    scanned = [SourceItem(uri=i.uri, kind=i.kind) for i in items]
    assert sorted(_read(scanned)["data"]) == sorted(b for _, b in members)
    pa.array(list(got["source_uri"]), pa.string())


def test_every_character_an_s3_key_may_hold(s3_server):
    bucket = s3_server.make_bucket("names")
    client = s3_server.client()
    keys = [n.decode() for n in _every_name_byte() if all(c < 0x80 for c in n) or n.decode("utf-8", "ignore") == n.decode("utf-8", "replace")]
    # moto's HTTP server (werkzeug) answers 404 to a request path holding CR or LF; S3 itself accepts them.
    keys = [k for k in keys if "\r" not in k and "\n" not in k]
    for i, key in enumerate(keys):
        client.put_object(Bucket=bucket, Key=f"raw/{key}", Body=b"\xff\xd8\xff object %d" % i)
    items = list_inputs(f"s3://{bucket}/raw/", s3_server.storage_options)
    assert len(items) == len(keys)
    got = _read(items, s3_server.storage_options)
    assert set(got["status"]) == {"ok"}, [e for e in got["error"] if e][:3]
    assert sorted(got["data"]) == sorted(b"\xff\xd8\xff object %d" % i for i in range(len(keys)))


# ------------------------------------------------------------------------------------------------
# 4-5. what is an image: metadata-heavy files, camera names, no extension, GIF, AVIF, HEIC


def test_png_with_huge_text_and_xmp_chunks_is_a_fine_image():
    img = Image.new("RGB", (64, 64), (10, 200, 30))
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "x" * (3 << 20), zip=True)  # over Pillow's MAX_TEXT_CHUNK once inflated
    info.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta>" + "y" * (3 << 20) + "</x:xmpmeta>", zip=True)
    blob = _png(img, pnginfo=info)
    got = load_image(blob, min_side=1)
    assert got.size == (64, 64) and got.getpixel((5, 5)) == (10, 200, 30)
    # A truncated PNG is still an error after the text chunks are dropped.
    with pytest.raises(ImageDecodeError) as e:
        load_image(blob[: len(blob) - 40], min_side=1)
    assert e.value.status == "decode_error"


def test_images_are_found_by_content_and_skips_are_counted(tmp_path):
    face = Image.new("RGB", (64, 64), (120, 80, 60))
    (tmp_path / "_DSC1234.JPG").write_bytes(_jpeg())
    (tmp_path / "IMG_0001").write_bytes(_jpeg())  # no extension
    (tmp_path / "photo.jfif").write_bytes(_jpeg())
    (tmp_path / "photo.dat").write_bytes(_png(face))  # a PNG under another name
    b = io.BytesIO()
    face.save(b, "GIF", save_all=True, append_images=[Image.new("RGB", (64, 64), (0, 0, 255))])
    (tmp_path / "anim.gif").write_bytes(b.getvalue())
    b = io.BytesIO()
    face.save(b, "AVIF")
    (tmp_path / "photo.avif").write_bytes(b.getvalue())
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    (tmp_path / "photo.heic").write_bytes(heic)
    (tmp_path / "notes").write_bytes(b"just some text, no image")
    (tmp_path / "captions.json").write_text("{}")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "._IMG_0002.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (tmp_path / "_delta_log").mkdir()
    (tmp_path / "_delta_log" / "00000.checkpoint.parquet").write_bytes(b"PAR1")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "skip_me.jpg").write_bytes(_jpeg())
    (tmp_path / "out").mkdir()  # the run's output inside its input
    (tmp_path / "out" / "part-0.parquet").write_bytes(b"PAR1")

    skipped: Counter = Counter()
    items = list_inputs(str(tmp_path), exclude=["raw/*"], output=str(tmp_path / "out"), skipped=skipped)
    names = sorted(i.uri.rsplit("/", 1)[1] for i in items)
    assert names == sorted(["_DSC1234.JPG", "IMG_0001", "photo.jfif", "photo.dat", "anim.gif", "photo.avif", "photo.heic"])
    assert skipped == {"not_an_image": 2, "hidden": 2, "bookkeeping": 1, "excluded": 1, "output": 1}

    only = list_inputs(str(tmp_path), include=["*.gif", "IMG_*"], output=str(tmp_path / "out"))
    assert sorted(i.uri.rsplit("/", 1)[1] for i in only) == ["IMG_0001", "anim.gif"]

    decoded = DecodeImages()(_read(items))
    by_name = {u.rsplit("/", 1)[1]: (s, e, img) for u, s, e, img in
               zip(decoded["source_uri"], decoded["status"], decoded["error"], decoded["image"])}
    for name in ("_DSC1234.JPG", "IMG_0001", "photo.jfif", "photo.dat", "anim.gif", "photo.avif"):
        assert by_name[name][0] == "ok" and by_name[name][2] is not None, (name, by_name[name][1])
    status, error, _ = by_name["photo.heic"]
    assert status == "decode_error" and "HEIF" in error


def test_gif_gives_its_first_frame():
    b = io.BytesIO()
    first = Image.new("RGB", (64, 64), (255, 0, 0))
    first.save(b, "GIF", save_all=True, append_images=[Image.new("RGB", (64, 64), (0, 0, 255))])
    got = load_image(b.getvalue(), min_side=1)
    assert got.mode == "RGB" and got.getpixel((10, 10)) == (255, 0, 0)
    assert sniff_format(b.getvalue()) == "GIF" and sniff_format(b"PAR1....") is None


# ------------------------------------------------------------------------------------------------
# 6. permanent is permanent


def test_permanent_and_retryable_statuses():
    from schemas.status import is_transient

    assert set(FINAL_STATUSES) <= set(STATUSES)
    for status in ("not_a_file", "container_error", "decode_error", "too_large", "too_small", "no_face", "ok"):
        assert status in FINAL_STATUSES and not is_transient(status)
    for status in ("read_error", "decode_timeout", "align_error", "invert_error"):
        assert status not in FINAL_STATUSES and is_transient(status)


# ------------------------------------------------------------------------------------------------
# 7. time limits


@pytest.fixture()
def stalling_http():
    """An HTTP server whose objects send their headers, then stall (until the test ends)."""
    release = threading.Event()

    class Stall(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"\xff\xd8\xff")
            self.wfile.flush()
            release.wait(30)

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stall)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def test_a_stalled_object_times_out_as_a_retryable_read_error(stalling_http, tmp_path):
    (tmp_path / "good.jpg").write_bytes(_jpeg())
    items = [SourceItem(uri=f"{stalling_http}/stalled.jpg"), SourceItem(uri=f"file://{tmp_path}/good.jpg")]
    t0 = time.monotonic()
    got = _read(items, timeout_s=0.5)
    assert time.monotonic() - t0 < 5.0
    assert list(got["status"]) == ["read_error", "ok"]
    assert "stalled.jpg" in got["error"][0] and "timed out after 0.5 s" in got["error"][0]


def test_a_stalled_read_holds_only_its_own_thread_when_the_lanes_are_full():
    """A batch's reads share a few threads (lanes); one that stalls must not make the reads queued
    behind it time out: another thread starts when the batch stops making progress."""
    from pipelines.read import STALL_S, ReadTimeout, _with_time_limits

    release = threading.Event()
    calls = [lambda: release.wait(30) and b"late", *[lambda k=k: bytes([k]) for k in range(5)]]
    t0 = time.monotonic()
    try:
        got = _with_time_limits(calls, timeout_s=3 * STALL_S + 2, lanes=1)
    finally:
        release.set()
    assert isinstance(got[0], ReadTimeout) and "timed out" in str(got[0])
    assert got[1:] == [bytes([k]) for k in range(5)]
    assert time.monotonic() - t0 < 3 * STALL_S + 5


def test_a_slow_decode_stops_at_its_time_limit():
    rng = np.random.default_rng(0)
    blob = _png(Image.fromarray(rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)))
    with pytest.raises(ImageDecodeError) as e:
        load_image(blob, name="big.png", timeout_s=1e-6)
    assert e.value.status == "decode_timeout" and "big.png" in e.value.message
    assert load_image(blob, timeout_s=30).size == (1024, 1024)


# ------------------------------------------------------------------------------------------------
# 7. only the allowed decoders see input bytes; none starts a program

# PostScript, EPS (text and the DOS binary header) and PDF: Pillow's EPS plugin would run
# Ghostscript on any of them if it were allowed to look.
_EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n"
        b"newpath 0 0 moveto 64 64 lineto stroke showpage\n%%EOF\n")
PROGRAM_CONTENT = {
    "ps_as.jpg": (b"%!PS\n/Helvetica findfont 12 scalefont setfont 10 10 moveto (x) show showpage\n", "PostScript"),
    "eps_as.png": (_EPS, "PostScript/EPS"),
    "eps_noext": (_EPS, "PostScript/EPS"),
    "dos_eps.jpg": (b"\xc5\xd0\xd3\xc6" + (30).to_bytes(4, "little") + len(_EPS).to_bytes(4, "little")
                    + bytes(18) + b"\xff\xff" + _EPS, "PostScript/EPS"),
    "pdf_as.png": (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n", "PDF"),
    "pdf_noext": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "PDF"),
}
_PROGRAMS = ("ghostscript", "'gs'", "gs --", "imagemagick", "magick ", "subprocess", "exit status", "command '")


def _recorded_calls() -> str:
    path = os.environ["PSP_TEST_SUBPROCESS_RECORDER"]  # tests/conftest.py: recording gs/convert/magick
    return open(path).read() if os.path.exists(path) else ""


def assert_no_program_ran_and_rows_name_the_format(rows: dict, names_to_format: dict) -> None:
    """Each row decode_error, its error naming the file and the detected format and no program."""
    for uri, (status, error) in rows.items():
        name = next(n for n in names_to_format if uri.endswith(n.replace("#", "%23")))
        assert status == "decode_error", (uri, status, error)
        assert name.split("#")[-1] in error and names_to_format[name] in error, (uri, error)
        assert not any(p in error.lower() for p in _PROGRAMS), (uri, error)
    assert _recorded_calls() == ""


def test_postscript_eps_and_pdf_under_image_names_never_reach_a_program(tmp_path):
    before = _recorded_calls()
    assert before == "" and os.environ["PATH"].split(os.pathsep)[0] in os.environ["PSP_TEST_SUBPROCESS_RECORDER"]
    for name, (blob, _) in PROGRAM_CONTENT.items():
        (tmp_path / name).write_bytes(blob)
    _tar(tmp_path / "shard.tar", [(f"m_{n}", b) for n, (b, _) in PROGRAM_CONTENT.items()])
    pq.write_table(pa.table({"jpg": [b for b, _ in PROGRAM_CONTENT.values()]}), tmp_path / "rows.parquet")
    # without an image extension the content is sniffed, never decoded: skipped when listed, refused
    # when named; nameless Parquet cells reach the decoder
    for n in PROGRAM_CONTENT:
        if "." not in n:
            with pytest.raises(InputError, match="not an image"):
                list_inputs(str(tmp_path / n))
    items = list_inputs(str(tmp_path))
    got = DecodeImages(timeout_s=10)(_read(items))
    rows = {u: (s, e) for u, s, e in zip(got["source_uri"], got["status"], got["error"])}
    expect = {n: f for n, (_, f) in PROGRAM_CONTENT.items()}
    expect = {n: f for n, f in expect.items() if "." in n}
    expect |= {f"shard.tar#m_{n}": f for n, f in list(expect.items())}
    assert len(rows) == len(expect) + len(PROGRAM_CONTENT), sorted(rows)
    parquet = {u: r for u, r in rows.items() if ".parquet#row=" in u}
    assert_no_program_ran_and_rows_name_the_format({u: r for u, r in rows.items() if u not in parquet}, expect)
    formats = [f for _, f in PROGRAM_CONTENT.values()]
    for i, (status, error) in enumerate(rows[f"file://{tmp_path}/rows.parquet#row={r}"] for r in range(len(formats))):
        assert status == "decode_error" and "rows.parquet#row=" in error and formats[i] in error, error
    # the report's thumbnails open source bytes too: same allowlist
    from pipelines.report import _thumb

    assert _thumb(_EPS)[0] is None and _thumb(PROGRAM_CONTENT["pdf_as.png"][0])[0] is None
    assert _recorded_calls() == ""


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "QOI"])
def test_every_allowed_format_still_decodes(fmt):
    from psp_core.images import ALLOWED_FORMATS

    assert fmt in ALLOWED_FORMATS
    b = io.BytesIO()
    img = Image.new("RGB", (48, 40), (10, 200, 30))
    img.save(b, fmt)
    assert load_image(b.getvalue(), name=f"x.{fmt}").size == (48, 40)


# ------------------------------------------------------------------------------------------------
# 8. more kinds: multi-frame files, header bombs, twin and non-UTF-8 names, hostile tar members,
#    truncated shards, content that does not match its name


def _frames(fmt: str, colors: list[tuple[int, int, int]], **save) -> bytes:
    b = io.BytesIO()
    first, *rest = [Image.new("RGB", (64, 64), c) for c in colors]
    first.save(b, fmt, save_all=True, append_images=rest, **save)
    return b.getvalue()


@pytest.mark.parametrize("fmt", ["TIFF", "PNG", "WEBP", "GIF"])
def test_multi_frame_files_give_their_first_frame(fmt, tmp_path):
    blob = _frames(fmt, [(250, 0, 0), (0, 0, 250), (0, 250, 0)], **({"lossless": True} if fmt == "WEBP" else {}))
    with Image.open(io.BytesIO(blob)) as im:
        assert getattr(im, "n_frames", 1) == 3  # really multi-frame (APNG for PNG)
    name = f"anim.{fmt.lower()}"
    (tmp_path / name).write_bytes(blob)
    got = DecodeImages(timeout_s=10)(_read(list_inputs(str(tmp_path))))
    assert list(got["status"]) == ["ok"], got["error"]
    assert got["image"][0].shape[:2] == (64, 64) and tuple(got["image"][0][10, 10]) == (250, 0, 0)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _header_bombs() -> dict[str, bytes]:
    """Files of a few hundred bytes whose headers declare gigapixel images."""
    png = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
           + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b""))
    jpg = bytearray(_jpeg((64, 48)))
    struct.pack_into(">HH", jpg, jpg.find(b"\xff\xc0") + 5, 60_000, 60_000)  # SOF0 height, width
    gif = bytearray(_frames("GIF", [(1, 2, 3)]))
    struct.pack_into("<HH", gif, 6, 65_535, 65_535)  # logical screen
    bmp = io.BytesIO()
    Image.new("RGB", (64, 64)).save(bmp, "BMP")
    bmp = bytearray(bmp.getvalue())
    struct.pack_into("<ii", bmp, 18, 40_000, 40_000)
    # under Pillow's own bomb limit (about 179 Mpx), over the pipeline's max_pixels (8192^2)
    mid = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 10_000, 10_000, 8, 2, 0, 0, 0))
           + _png_chunk(b"IEND", b""))
    return {"bomb.png": png, "bomb.jpg": bytes(jpg), "bomb.gif": bytes(gif), "bomb.bmp": bytes(bmp),
            "bomb_100mpx.png": mid}


def test_header_bombs_are_too_large_before_any_pixel_is_decoded(tmp_path):
    for name, blob in _header_bombs().items():
        (tmp_path / name).write_bytes(blob)
    t0 = time.monotonic()
    got = DecodeImages(timeout_s=10)(_read(list_inputs(str(tmp_path))))
    assert time.monotonic() - t0 < 3.0  # nothing was allocated or decoded
    for uri, status, error in zip(got["source_uri"], got["status"], got["error"]):
        name = uri.rsplit("/", 1)[1]
        assert status == "too_large" and name in error, (name, status, error)
    assert "max_pixels=67108864" in dict(zip(got["source_uri"], got["error"]))[f"file://{tmp_path}/bomb_100mpx.png"]
    assert len(got["status"]) == 5


def test_nfc_nfd_twins_and_non_utf8_names_are_separate_inputs(tmp_path):
    import unicodedata

    nfc = unicodedata.normalize("NFC", "caf\u00e9.jpg")
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfc != nfd
    names = {nfc.encode(): b"\xff\xd8\xff nfc", nfd.encode(): b"\xff\xd8\xff nfd",
             b"caf\xe9.jpg": b"\xff\xd8\xff latin-1", b"\x80\xfe\xff.jpg": b"\xff\xd8\xff invalid utf-8"}
    for name, payload in names.items():
        with open(os.path.join(os.fsencode(str(tmp_path)), name), "wb") as f:
            f.write(payload)
    _tar(tmp_path / "twins.tar", [(nfc, b"\xff\xd8\xff member nfc"), (nfd, b"\xff\xd8\xff member nfd")])
    items = list_inputs(str(tmp_path))
    assert len(items) == len({i.uri for i in items}) == 6  # no twin collapses into the other
    rows = _rows(items)
    assert {s for s, _, _ in rows.values()} == {"ok"}
    pa.array(list(rows), pa.string())  # every URI is valid UTF-8
    # each name read from its own file / member, and its URI tells the twins apart
    assert rows[f"file://{tmp_path}/{nfc}"][2] == b"\xff\xd8\xff nfc"
    assert rows[f"file://{tmp_path}/{nfd}"][2] == b"\xff\xd8\xff nfd"
    assert sorted(d for _, _, d in rows.values()) == sorted([*names.values(), b"\xff\xd8\xff member nfc",
                                                             b"\xff\xd8\xff member nfd"])


def test_tar_members_with_dotdot_absolute_names_links_and_directories(tmp_path):
    def member(name, kind=tarfile.REGTYPE, link="", payload=b""):
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.size = kind, link, len(payload)
        return info, io.BytesIO(payload)

    body = {n: b"\xff\xd8\xff " + n.encode() for n in ("../up.jpg", "/abs/root.jpg", "a/../../x.jpg", "sub/in.jpg")}
    shard = tmp_path / "in" / "evil.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for name, payload in body.items():
            tar.addfile(*member(name, payload=payload))
        for name, kind, link in [("dir.jpg", tarfile.DIRTYPE, ""), ("sub", tarfile.DIRTYPE, ""),
                                 ("hard.jpg", tarfile.LNKTYPE, "sub/in.jpg"), ("up_link.jpg", tarfile.SYMTYPE, "../up.jpg"),
                                 ("passwd.jpg", tarfile.SYMTYPE, "/etc/passwd"),
                                 ("hard_out.jpg", tarfile.LNKTYPE, "../../etc/hostname")]:
            tar.addfile(*member(name, kind, link))
    rows = _rows(list_inputs(str(shard)))
    by_member = {u.split("#", 1)[1]: r for u, r in rows.items()}
    # names are only names: members are read from the archive, never extracted, so '..' and '/'
    # reach nothing outside it
    for name, payload in body.items():
        assert by_member[name.replace("#", "%23")] == ("ok", "", payload)
    assert by_member["hard.jpg"] == ("ok", "", body["sub/in.jpg"])
    assert by_member["up_link.jpg"] == ("ok", "", body["../up.jpg"])
    for name in ("passwd.jpg", "hard_out.jpg"):  # a link out of the archive: never followed
        status, error, data = by_member[name]
        assert status == "not_a_file" and name in error and "leads nowhere" in error and data == b"", error
    assert "dir.jpg" not in by_member and "sub" not in by_member  # directories are not inputs
    assert len(rows) == 8
    assert sorted(os.listdir(tmp_path)) == ["in"] and os.listdir(shard.parent) == ["evil.tar"]


def test_shards_cut_short_keep_what_is_whole_and_name_the_rest(tmp_path):
    good = _jpeg((64, 64))
    _tar(tmp_path / "whole.tar", [("m1.jpg", good), ("m2.jpg", good * 20)])
    blob = (tmp_path / "whole.tar").read_bytes()
    (tmp_path / "whole.tar").unlink()
    (tmp_path / "cut.tar").write_bytes(blob[: 1024 + 512 + 512 + 700])  # m2 cut inside its data
    (tmp_path / "cut_header.tar").write_bytes(blob[:100])  # not even one whole header
    pq.write_table(pa.table({"jpg": [good] * 5}), tmp_path / "p.parquet")
    pqb = (tmp_path / "p.parquet").read_bytes()
    (tmp_path / "p.parquet").unlink()
    (tmp_path / "cut.parquet").write_bytes(pqb[: len(pqb) // 2])
    root = f"file://{tmp_path}"
    rows = _rows(list_inputs(str(tmp_path)))
    assert rows[f"{root}/cut.tar#m1.jpg"][0] == "ok"
    status, error, _ = rows[f"{root}/cut.tar#m2.jpg"]
    assert status == "read_error" and "cut.tar#m2.jpg" in error and "shard ended" in error, error
    for name, says in [("cut.tar", ".tar shard"), ("cut_header.tar", ".tar shard"), ("cut.parquet", "Parquet")]:
        status, error, _ = rows[f"{root}/{name}"]
        assert status == "container_error" and name in error and says in error, (name, error)
    assert len(rows) == 5


def test_content_that_does_not_match_its_name_is_decoded_by_content_or_named(tmp_path):
    good, png = _jpeg((64, 64)), _png(Image.new("RGB", (64, 64), (0, 90, 0)))
    _tar(tmp_path / "t.tar", [("m.jpg", good)])
    pq.write_table(pa.table({"jpg": [good]}), tmp_path / "p.parquet")
    files = {"png_as.jpg": (png, "ok", ""), "jpeg_as.png": (good, "ok", ""), "jpeg_as.gif": (good, "ok", ""),
             "text_as.jpg": (b"hello, not an image at all", "decode_error", "not an image"),
             "html_as.png": (b"<!DOCTYPE html><html>404</html>", "decode_error", "HTML"),
             "parquet_as.jpg": ((tmp_path / "p.parquet").read_bytes(), "decode_error", "Parquet"),
             "tar_as.jpg": ((tmp_path / "t.tar").read_bytes(), "decode_error", "not an image"),
             "zip_as.webp": (b"PK\x03\x04" + bytes(40), "decode_error", "ZIP")}
    for name in ("t.tar", "p.parquet"):
        (tmp_path / name).unlink()
    for name, (blob, _, _) in files.items():
        (tmp_path / name).write_bytes(blob)
    got = DecodeImages(timeout_s=10)(_read(list_inputs(str(tmp_path))))
    rows = {u.rsplit("/", 1)[1]: (s, e) for u, s, e in zip(got["source_uri"], got["status"], got["error"])}
    assert len(rows) == len(files)
    for name, (_, status, says) in files.items():
        assert rows[name][0] == status and says in rows[name][1], (name, rows[name])
        assert status == "ok" or name in rows[name][1], rows[name]
