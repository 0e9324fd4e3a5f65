"""Image decoding: untrusted bytes -> upright 8-bit RGB, robustly, with a size guard and a time limit.

Separate from face alignment (`psp_core.align`) so that anything that only needs pixels -- the
pipeline's decode stage, metrics, identity -- does not depend on dlib. What is decided here:

- what an image is: `sniff_format` reads the magic bytes (JPEG, PNG, GIF, BMP, TIFF, WebP, PNM,
  JPEG 2000, QOI, HEIC/HEIF, AVIF); the file name plays no part;
- what is decoded: only `ALLOWED_FORMATS`, passed as `formats=` to every `Image.open` of untrusted
  bytes (Pillow's advice for untrusted input). Anything else -- PostScript/EPS and PDF, whose
  Pillow plugins run Ghostscript, ICO, PSD, ... -- is a `decode_error` naming the detected format
  (`detect_format`), so no decoder ever starts a subprocess;
- decompression bombs (`max_pixels`, checked from the header before any pixel is decoded), tiny
  images and undecodable files are `ImageDecodeError` statuses, not crashes;
- a decode has a time limit (`timeout_s`): checked each time the decoder pulls more bytes and
  between the steps (header, pixels, orientation, mode conversion), so a pathological file costs
  at most about that long (a single native decoder call is not interrupted);
- PNG text/XMP chunks over Pillow's `MAX_TEXT_CHUNK` / `MAX_TEXT_MEMORY` limits: the chunks are
  dropped (never decompressed) and the pixels decoded; Pillow's limits are left as they are;
- GIF and other multi-frame files give their first frame; HEIC/HEIF needs the optional
  `pillow-heif` plugin (registered when installed), AVIF is read by Pillow itself.
"""
from __future__ import annotations

import io
import os
import struct
import time
import warnings
import zlib
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_DECODE_TIMEOUT_S",
    "DEFAULT_MAX_PIXELS",
    "MIN_SIDE",
    "JpegDraft",
    "SNIFF_BYTES",
    "ALLOWED_FORMATS",
    "ImageDecodeError",
    "detect_format",
    "load_image",
    "open_jpeg_draft",
    "open_untrusted",
    "normalize_image",
    "sniff_format",
]

#: Largest image accepted by default: 8192 x 8192 (about 192 MiB decoded as RGB).
DEFAULT_MAX_PIXELS = 8192 * 8192
#: Smallest accepted side in pixels. The HOG detector's window is 80 px, 40 px with one upsampling,
#: so a smaller image cannot hold a detectable face.
MIN_SIDE = 40
#: Default time limit of one decode, seconds (a 8192x8192 JPEG decodes in well under 2 s).
DEFAULT_DECODE_TIMEOUT_S = 30.0
#: How many leading bytes `sniff_format` needs.
SNIFF_BYTES = 32

#: The Pillow formats decoded from untrusted bytes: those of the documented input extensions
#: (README "What counts as an input"). Pillow's other plugins never see input bytes; EPS in
#: particular would start Ghostscript (`gs`) on them.
ALLOWED_FORMATS: tuple[str, ...] = (
    "JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000", "QOI", "AVIF", "HEIF",
)

ImageInput = Union[bytes, bytearray, memoryview, str, os.PathLike, Image.Image, np.ndarray]

_EXIF_ORIENTATION = 0x0112
_WHITE = (255, 255, 255)

try:  # optional: HEIC/HEIF support, when the plugin is installed
    from pillow_heif import register_heif_opener as _register_heif

    _register_heif()
except Exception:  # noqa: BLE001 - absent or broken plugin: HEIC stays a named decode_error
    pass


# ---------------------------------------------------------------------------------------------
# what is an image

_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}


def sniff_format(head: bytes) -> str | None:
    """The image format named by the magic bytes at the start of a file, or None.

    head: at least the first `SNIFF_BYTES` bytes (fewer when the file is shorter).
    Returns e.g. "JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PNM", "JPEG2000", "QOI", "HEIF",
    "AVIF". Only formats a photo comes in are named: a text file, an archive or a Parquet file is None.
    """
    h = bytes(head[:SNIFF_BYTES])
    if h.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if h.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if h.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if h.startswith(b"BM") and len(h) >= 18 and struct.unpack_from("<I", h, 14)[0] in (12, 40, 52, 56, 64, 108, 124):
        return "BMP"
    if h.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):
        return "TIFF"
    if h.startswith(b"RIFF") and h[8:12] == b"WEBP":
        return "WEBP"
    if len(h) >= 3 and h[0:1] == b"P" and h[1:2] in b"123456" and h[2:3] in b" \t\r\n#":
        return "PNM"
    if h.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xffO\xffQ")):
        return "JPEG2000"
    if h.startswith(b"qoif"):
        return "QOI"
    if h[4:8] == b"ftyp":
        brands = {h[i : i + 4] for i in range(8, min(len(h), 32) - 3, 4)}
        if brands & _AVIF_BRANDS:
            return "AVIF"
        if brands & _HEIF_BRANDS:
            return "HEIF"
    return None


# Formats that are not decoded, named from their magic bytes for the error message.
_OTHER_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%!PS-Adobe", "PostScript/EPS"),
    (b"%!", "PostScript"),
    (b"\xc5\xd0\xd3\xc6", "PostScript/EPS (DOS EPS binary)"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"8BPS", "PSD"),
    (b"icns", "ICNS"),
    (b"SIMPLE  =", "FITS"),
    (b"\x89HDF", "HDF5"),
    (b"\xd7\xcd\xc6\x9a", "WMF"),
    (b"/* XPM */", "XPM"),
    (b"#define", "XBM"),
    (b"DDS ", "DDS"),
    (b"PK\x03\x04", "ZIP"),
    (b"\x1f\x8b", "gzip"),
    (b"<?xml", "XML/SVG"),
    (b"<svg", "SVG"),
    (b"<!doctype html", "HTML"),
    (b"<html", "HTML"),
    (b"PAR1", "Parquet"),
)


def detect_format(head: bytes) -> str | None:
    """The format named by the magic bytes of `head`: an image format (`sniff_format`) or one that is
    not decoded (e.g. "PostScript/EPS", "PDF", "ICO", "PSD"); None when unknown."""
    name = sniff_format(head)
    if name is not None:
        return name
    h = bytes(head[:SNIFF_BYTES]).lstrip(b"\xef\xbb\xbf")
    for magic, label in _OTHER_MAGIC:
        if h.startswith(magic) or (magic.startswith(b"<") and h.lower().startswith(magic)):
            return label
    return None


def open_untrusted(fp) -> Image.Image:
    """`Image.open(fp, formats=ALLOWED_FORMATS)`: only the allowed decoders look at the bytes.

    Raises UnidentifiedImageError for anything else (the caller names the detected format)."""
    return Image.open(fp, formats=_allowed_formats())


def _allowed_formats() -> list[str]:
    Image.init()  # registers the plugins (pillow-heif's too, when installed) before filtering
    return [f for f in ALLOWED_FORMATS if f in Image.OPEN]


# ---------------------------------------------------------------------------------------------
# decoding


class _DecodeTimeout(Exception):
    pass


class _DeadlineBytesIO(io.BytesIO):
    """A BytesIO whose reads fail once `deadline` (time.monotonic) has passed: the decoder pulls
    its input through here, so a slow decode stops at its next read."""

    def __init__(self, data: bytes, deadline: float | None):
        super().__init__(data)
        self.deadline = deadline

    def read(self, *args):
        _check_deadline(self.deadline)
        return super().read(*args)


def _check_deadline(deadline: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise _DecodeTimeout()


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")


def _strip_png_text(data: bytes) -> bytes | None:
    """`data` (a PNG) without its tEXt/zTXt/iTXt chunks (never decompressed), or None if the chunk
    structure cannot be walked. The pixels, palette, transparency and eXIf chunks are kept."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    out = [_PNG_SIGNATURE]
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(data):
            out.append(data[pos:])  # truncated: let the decoder report it
            break
        if kind not in _PNG_TEXT_CHUNKS:
            out.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            break
    return b"".join(out)


def _is_text_limit(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, (ValueError, zlib.error)) and ("MAX_TEXT" in text or "text chunks" in text)


class ImageDecodeError(Exception):
    """An input that cannot become an RGB image.

    `status` is "decode_error" (not an image, truncated, unsupported), "too_large" (over
    `max_pixels`, the decompression-bomb guard), "too_small" (a side under `min_side`) or
    "decode_timeout" (over the decode time limit); `message` names the input and says what went wrong.
    """

    text_limit = False  # set when Pillow refused a PNG text chunk over its limit

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _label(data: object, name: str | None) -> str:
    if name:
        return name
    if isinstance(data, (str, os.PathLike)):
        return os.fspath(data)
    if isinstance(data, (bytes, bytearray, memoryview)):
        return f"<{len(data)} bytes>"
    return f"<{type(data).__name__}>"


def load_image(
    data: bytes | bytearray | memoryview | str | os.PathLike | Image.Image,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = MIN_SIDE,
    *,
    name: str | None = None,
    timeout_s: float | None = None,
) -> Image.Image:
    """Decode encoded bytes, a file path or a PIL image into an upright 8-bit RGB PIL image.

    The size is checked against `max_pixels` from the header, before any pixel is decoded; Pillow's
    own decompression-bomb error also maps to "too_large" (its warning is ignored when `max_pixels`
    is above Pillow's limit, since the caller vouched for the size). Truncated files are errors
    (Pillow's LOAD_TRUNCATED_IMAGES is left False). Multi-frame files (GIF, APNG, TIFF) give their
    first frame. PNG text/XMP chunks over Pillow's text limits are dropped, not decoded. Then
    `normalize_image` applies EXIF orientation and converts the mode to RGB.

    timeout_s: time limit of the whole decode (None: no limit); over it the status is
    "decode_timeout" (the machine may have been busy: worth retrying, unlike "decode_error").
    A missing path raises FileNotFoundError (a read error, not a decode error).
    Raises ImageDecodeError(status, message) with status "decode_error", "too_large", "too_small"
    or "decode_timeout". `name` labels the input in messages (e.g. its URI).
    """
    label = _label(data, name)
    deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)
    try:
        if isinstance(data, Image.Image):
            _check_size(data.size, max_pixels, min_side, label)
            return normalize_image(data, name=label)
        if isinstance(data, (bytes, bytearray, memoryview)):
            blob = bytes(data)
        elif isinstance(data, (str, os.PathLike)):
            with open(os.fspath(data), "rb") as f:  # FileNotFoundError propagates: a read error
                blob = f.read()
        else:
            raise TypeError(f"load_image: expected bytes, a path or a PIL image, got {type(data).__name__}")
        try:
            img = _decode(blob, max_pixels, min_side, label, deadline)
        except ImageDecodeError as e:
            stripped = _strip_png_text(blob) if getattr(e, "text_limit", False) else None
            if stripped is None:
                raise
            img = _decode(stripped, max_pixels, min_side, label, deadline)
        _check_deadline(deadline)
        rgb = normalize_image(img, name=label)
        _check_deadline(deadline)
        return rgb
    except _DecodeTimeout:
        raise ImageDecodeError(
            "decode_timeout",
            f"{label}: decoding took longer than {timeout_s:g} s (the decode time limit); "
            "retry later or raise the limit",
        ) from None


def _decode(blob: bytes, max_pixels: int, min_side: int, label: str, deadline: float | None,
            draft: tuple[int, int] | None = None) -> Image.Image:
    """Header, size guard, pixels: the decoded (not yet normalised) first frame of `blob`.
    draft: `Image.draft("RGB", draft)` before the pixels are decoded (a JPEG's scaled decode)."""
    fmt_sniffed = detect_format(blob[:SNIFF_BYTES])
    with warnings.catch_warnings():
        # Above Pillow's limit the caller vouched for the size with max_pixels; below it, an image
        # over Pillow's limit is also over ours and is rejected by _check_size.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = open_untrusted(_DeadlineBytesIO(blob, deadline))
        except _DecodeTimeout:
            raise
        except Image.DecompressionBombError as e:
            raise ImageDecodeError("too_large", f"{label}: too large: {e}") from None
        except UnidentifiedImageError as e:
            if fmt_sniffed is not None and sniff_format(blob[:SNIFF_BYTES]) is None:
                raise ImageDecodeError(
                    "decode_error", f"{label}: {fmt_sniffed} content is not an accepted image format "
                    f"(accepted: {', '.join(ALLOWED_FORMATS)}); convert it to PNG or JPEG"
                ) from None
            if fmt_sniffed is not None:
                raise ImageDecodeError(
                    "decode_error", f"{label}: {fmt_sniffed} image that this Pillow cannot read"
                    + (" (install pillow-heif for HEIC/HEIF)" if fmt_sniffed == "HEIF" else "")
                ) from None
            raise ImageDecodeError("decode_error", f"{label}: not an image: {_short(e)}") from None
        except Exception as e:  # noqa: BLE001 - any parser failure on untrusted bytes is a decode error
            raise _with_text_flag(ImageDecodeError(
                "decode_error", f"{label}: cannot read image header: {_short(e)}"), e) from None
        _check_size(img.size, max_pixels, min_side, label)
        fmt = img.format or fmt_sniffed or "image"
        if draft is not None:
            img.draft("RGB", draft)
        try:
            img.load()
        except _DecodeTimeout:
            raise
        except Image.DecompressionBombError as e:
            raise ImageDecodeError("too_large", f"{label}: too large: {e}") from None
        except Exception as e:  # noqa: BLE001
            if "truncated" in str(e).lower() or isinstance(e, EOFError):
                raise ImageDecodeError(
                    "decode_error", f"{label}: truncated {fmt}: {_short(e)}; re-fetch or re-encode the file"
                ) from None
            raise _with_text_flag(ImageDecodeError(
                "decode_error", f"{label}: corrupt {fmt} data: {_short(e)}"), e) from None
    return img


class JpegDraft:
    """A JPEG whose header is read and checked, its pixels not yet decoded (the speed mode's input).

    size: (width, height) of the upright image (the size guards already passed). `decode(scale)`
    decodes it at 1/scale (1, 2, 4 or 8) with libjpeg's DCT-domain scaling (`Image.draft`: an
    8x8 block becomes 8/scale px; nearly free compared with decoding all pixels and resizing):
    an RGB PIL image of ceil(width/scale) x ceil(height/scale) whose pixel (i, j) covers the full
    image's pixels around (scale*i + (scale-1)/2, scale*j + (scale-1)/2). decode(1) is
    `load_image(blob)`; None where the decoder did not scale as asked. Only JPEGs in RGB mode without an EXIF rotation/flip are drafts
    (`open_jpeg_draft`); raises ImageDecodeError as `load_image` does (e.g. truncated data).
    """

    SCALES = (1, 2, 4, 8)

    def __init__(self, blob: bytes, size: tuple[int, int], max_pixels: int, min_side: int, label: str,
                 timeout_s: float | None):
        self.blob, self.size, self.label = blob, size, label
        self.max_pixels, self.min_side, self.timeout_s = max_pixels, min_side, timeout_s

    def decode(self, scale: int = 1) -> Image.Image | None:
        if scale not in self.SCALES:
            raise ValueError(f"JpegDraft.decode: scale {scale!r}, expected one of {self.SCALES}")
        if scale == 1:
            return load_image(self.blob, self.max_pixels, self.min_side, name=self.label, timeout_s=self.timeout_s)
        deadline = None if self.timeout_s is None else time.monotonic() + float(self.timeout_s)
        w, h = self.size
        try:
            img = _decode(self.blob, self.max_pixels, self.min_side, self.label, deadline,
                          draft=(w // scale, h // scale))
        except _DecodeTimeout:
            raise ImageDecodeError("decode_timeout", f"{self.label}: decoding took longer than "
                                   f"{self.timeout_s:g} s (the decode time limit); retry later or raise the limit") from None
        want = (-(-w // scale), -(-h // scale))
        if img.mode != "RGB" or img.size != want:  # not what the draft promised: the caller decodes fully
            return None
        return img


def open_jpeg_draft(
    data: bytes | bytearray | memoryview,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = MIN_SIDE,
    *,
    name: str | None = None,
    timeout_s: float | None = None,
) -> JpegDraft | None:
    """A `JpegDraft` of encoded bytes when they are a baseline/progressive RGB JPEG whose EXIF
    orientation is upright (1 or absent) and whose header passes the size guards; None otherwise
    (decode those with `load_image`, which also reports what is wrong with them)."""
    blob = bytes(data)
    if sniff_format(blob[:SNIFF_BYTES]) != "JPEG":
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = open_untrusted(io.BytesIO(blob))
        if img.format != "JPEG" or img.mode != "RGB":
            return None
        _check_size(img.size, max_pixels, min_side, _label(data, name))
        if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            return None
    except Exception:  # noqa: BLE001 - anything odd: the full decode decides and names the problem
        return None
    return JpegDraft(blob, img.size, max_pixels, min_side, _label(data, name), timeout_s)


def _with_text_flag(err: ImageDecodeError, cause: BaseException) -> ImageDecodeError:
    err.text_limit = _is_text_limit(cause)  # a PNG text chunk over Pillow's limit: strip and retry
    return err


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, UnidentifiedImageError):
        # Pillow's message includes the BytesIO repr; keep it short and stable.
        text = "cannot identify image file"
    return text if len(text) < 300 else text[:300] + "..."


def _check_size(size: tuple[int, int], max_pixels: int, min_side: int, label: str) -> None:
    w, h = size
    if max_pixels and w * h > max_pixels:
        raise ImageDecodeError(
            "too_large",
            f"{label}: {w}x{h} = {w * h} pixels is more than max_pixels={max_pixels} "
            "(decompression-bomb guard); raise max_pixels if the image is genuine",
        )
    if min(w, h) < min_side:
        raise ImageDecodeError(
            "too_small", f"{label}: {w}x{h} is smaller than {min_side} px on a side; no face can be found"
        )


def normalize_image(img: Image.Image, *, name: str | None = None) -> Image.Image:
    """Upright 8-bit RGB version of a decoded PIL image (may return `img` itself when already so).

    - EXIF orientation (tag 0x0112) is applied with `ImageOps.exif_transpose`.
    - Transparency (RGBA, LA, PA, P with a transparent index) is composited on white: transparent
      pixels become white, as an image viewer shows them, so a cut-out face sits on a plain
      background rather than on whatever colour the hidden pixels happen to hold.
    - 16-bit ('I;16*') is scaled by 255/65535 with rounding (not clipped at 255). 32-bit 'I' is taken
      as 8-bit if it fits in 0..255, as 16-bit if it fits in 0..65535, else min-max scaled; 'F' as
      0..1 if it fits there, 0..255 if it fits there, else min-max scaled.
    - CMYK, YCbCr, L, 1, P go through Pillow's RGB conversion.
    """
    label = name or f"<{type(img).__name__}>"
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not reject an otherwise fine image
        orientation = 1
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    try:
        if mode == "RGB":
            return img
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", img.size, _WHITE + (255,)), rgba).convert("RGB")
        if mode.startswith("I;16"):
            a = np.asarray(img).astype(np.float32)
            return _gray_to_rgb(np.rint(a * (255.0 / 65535.0)))
        if mode in ("I", "F"):
            return _gray_to_rgb(_scale_wide(np.asarray(img), mode))
        return img.convert("RGB")
    except ImageDecodeError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ImageDecodeError("decode_error", f"{label}: cannot convert mode {mode!r} to RGB: {_short(e)}") from None


def _scale_wide(a: np.ndarray, mode: str) -> np.ndarray:
    a = a.astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        return np.rint(a * 255.0)
    if lo >= 0.0 and hi <= 255.0:
        return np.rint(a)
    if mode == "I" and lo >= 0.0 and hi <= 65535.0:
        return np.rint(a * (255.0 / 65535.0))
    if hi == lo:
        return np.zeros_like(a)
    return np.rint((a - lo) * (255.0 / (hi - lo)))


def _gray_to_rgb(a: np.ndarray) -> Image.Image:
    g = np.clip(a, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.repeat(g[:, :, None], 3, axis=2)), "RGB")


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    """HxW, HxWx1, HxWx3 or HxWx4 uint8/uint16 array -> C-contiguous HxWx3 uint8 (no copy if already so)."""
    if a.dtype == np.uint16:
        a = np.rint(a.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        raise ImageDecodeError(
            "decode_error", f"array of dtype {a.dtype}: expected uint8 (or uint16) pixels; convert with np.uint8"
        )
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        return np.ascontiguousarray(np.repeat(a[:, :, None], 3, axis=2))
    if a.ndim == 3 and a.shape[2] == 4:
        alpha = a[:, :, 3:4].astype(np.float32) / 255.0
        return np.rint(a[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 3:
        return np.ascontiguousarray(a)
    raise ImageDecodeError("decode_error", f"array of shape {a.shape}: expected HxW, HxWx1, HxWx3 or HxWx4")
