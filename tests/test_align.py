"""FFHQ alignment on real photos: the astronaut and images derived from it.

The reference is `psp_core.align_reference.reference_align`, a re-statement of the original
`scripts/align_all_parallel.py` procedure (its own dlib.load_rgb_image + detector(img, 1) + last
detection + PIL steps).
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from psp_core.align import (
    AlignResult,
    FaceAligner,
    ImageDecodeError,
    alignment_quad,
    load_image,
    pad_blend,
    plan_alignment,
)
from psp_core.align_reference import reference_align
from psp_core.face_detection import PyramidDetector, box_side, skip_levels


@pytest.fixture(scope="module")
def aligner() -> FaceAligner:
    return FaceAligner()  # output 256, select="best", exact detection


@pytest.fixture(scope="module")
def photos(tmp_path_factory, astronaut) -> dict[str, Path]:
    """Real photos derived from the astronaut, saved as PNG (lossless, so dlib's and PIL's decoders agree)."""
    folder = tmp_path_factory.mktemp("photos")
    lanczos = Image.Resampling.LANCZOS
    images = {
        "astronaut": astronaut,
        # face close-up upscaled: qsize ~1040 px, so output 256 shrinks by 2 (and the quad needs padding)
        "closeup": astronaut.crop((120, 20, 330, 230)).resize((1260, 1260), lanczos),
        # the face cut by the image corner: the quad leaves the image on the left and top (pad branch)
        "corner": astronaut.crop((190, 90, 512, 512)),
    }
    paths = {}
    for name, im in images.items():
        paths[name] = folder / f"{name}.png"
        im.save(paths[name])
    return paths


def _max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


def _iod(lm: np.ndarray) -> float:
    return float(np.linalg.norm(lm[42:48].mean(0) - lm[36:42].mean(0)))


# -- face selection ---------------------------------------------------------------------------


def test_run_lists_detections_in_the_order_of_detector_call(aligner, astronaut):
    """select='last' relies on detector.run giving detector(img, 1)'s order."""
    arr = np.asarray(astronaut)
    called = [(r.left(), r.top(), r.right(), r.bottom()) for r in aligner.detector(arr, 1)]
    dets = aligner.detect(arr)
    assert [box for box, _ in dets] == called
    assert len(dets) == 2
    scores = [s for _, s in dets]
    assert scores == sorted(scores, reverse=True)


def test_select_policies_on_the_astronaut(aligner, astronaut):
    best = aligner(astronaut)
    last = aligner.replace(select="last")(astronaut)
    largest = aligner.replace(select="largest")(astronaut)
    both = aligner.replace(select="all")(astronaut)

    assert best.status == last.status == "ok" and best.n_faces == last.n_faces == 2
    # best is the face (score > 1); the original's choice is the low-score mission patch
    assert best.score > 1.0 > last.score
    assert best.score == max(r.score for r in both)
    assert [r.score for r in both] == sorted((r.score for r in both), reverse=True)
    assert {tuple(r.box) for r in both} == {tuple(best.box), tuple(last.box)}
    area = lambda r: (r.box[2] - r.box[0] + 1) * (r.box[3] - r.box[1] + 1)  # noqa: E731
    assert area(largest) == max(area(r) for r in both)
    # the face is in the upper half of the photo, the patch in the lower half
    assert best.landmarks[:, 1].mean() < 256 < last.landmarks[:, 1].mean()
    assert best.image.size == (256, 256) and best.image.mode == "RGB"
    assert best.landmarks.shape == (68, 2) and best.landmarks.dtype == np.float32
    assert best.quad.shape == (4, 2) and best.quad.dtype == np.float32


def test_last_reproduces_the_original_end_to_end(aligner, photos):
    """Same file: the original's detections, integer landmarks and crop."""
    predictor = aligner.predictor
    ref_img, ref_lm = reference_align(str(photos["astronaut"]), predictor, 256, 256)
    ours = aligner.replace(select="last")(str(photos["astronaut"]))
    assert ours.status == "ok"
    np.testing.assert_array_equal(ours.landmarks, ref_lm)
    assert _max_diff(ours.image, ref_img) <= 1


@pytest.mark.parametrize(
    "photo, output_size, transform_size, branch",
    [
        ("closeup", 256, 256, "shrink+pad"),  # padded ~940 px square: the strip-only blur path
        ("corner", 256, 256, "pad"),
        ("corner", 1024, 1024, "pad"),
        ("astronaut", 1024, 4096, "ffhq"),
    ],
)
def test_crop_matches_the_original_given_the_same_landmarks(aligner, photos, photo, output_size, transform_size, branch):
    fast = aligner.replace(detect_size=512)  # detection is not under test here: keep it cheap
    image = Image.open(photos[photo])
    found = fast(image)
    assert found.status == "ok"
    quad, qsize = alignment_quad(found.landmarks)
    plan = plan_alignment(image.size, quad, qsize, output_size)
    assert (plan.shrink > 1) == ("shrink" in branch)
    assert (plan.pad is not None) == ("pad" in branch)

    ours = aligner.replace(output_size=output_size, transform_size=transform_size).align_landmarks(image, found.landmarks)
    ref, _ = reference_align(str(photos[photo]), None, output_size, transform_size, landmarks=found.landmarks)
    assert ours.image.size == ref.size == (output_size, output_size)
    assert _max_diff(ours.image, ref) <= 1
    np.testing.assert_allclose(ours.quad, quad.astype(np.float32))


def test_array_pil_bytes_and_path_inputs_agree(aligner, astronaut, photos):
    results = [
        aligner(np.asarray(astronaut)),
        aligner(astronaut),
        aligner(photos["astronaut"].read_bytes()),
        aligner(str(photos["astronaut"])),
    ]
    for r in results:
        assert r.status == "ok"
        np.testing.assert_array_equal(r.landmarks, results[0].landmarks)
        assert _max_diff(r.image, results[0].image) == 0


# -- statuses instead of exceptions ------------------------------------------------------------


def test_no_face_is_a_status_not_an_exception(aligner):
    from skimage import data

    result = aligner(data.coffee())  # the original raised UnboundLocalError here
    assert result.status == "no_face" and result.image is None and result.n_faces == 0
    assert "no face" in result.error
    listed = aligner.replace(select="all")(data.coffee())
    assert isinstance(listed, list) and [r.status for r in listed] == ["no_face"]


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _png_claiming_size(width: int, height: int) -> bytes:
    """A small valid-looking PNG whose header claims width x height pixels."""
    data = bytearray(_png_bytes(Image.new("L", (8, 8))))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def test_decode_errors_are_readable_statuses(aligner, astronaut):
    jpeg = io.BytesIO()
    astronaut.save(jpeg, format="JPEG", quality=90)
    truncated = jpeg.getvalue()[: len(jpeg.getvalue()) // 2]

    r = aligner(truncated, name="s3://bucket/cut.jpg")
    assert r.status == "decode_error"
    assert r.error.startswith("s3://bucket/cut.jpg: truncated JPEG")
    r = aligner(b"this is not an image at all", name="notes.txt")
    assert r.status == "decode_error" and "not an image" in r.error

    with pytest.raises(ImageDecodeError) as e:
        load_image(truncated)
    assert e.value.status == "decode_error"

    r = aligner("/nonexistent/photo.jpg")
    assert r.status == "read_error" and "/nonexistent/photo.jpg" in r.error


def test_size_guards_run_before_decoding(aligner, astronaut):
    png = _png_bytes(astronaut)
    cut = png[:200]  # header intact, pixel data missing
    # the size check happens on the header: a truncated body is never decoded
    with pytest.raises(ImageDecodeError) as e:
        load_image(cut, max_pixels=512 * 511)
    assert e.value.status == "too_large" and "512x512" in e.value.message
    with pytest.raises(ImageDecodeError) as e:
        load_image(cut)
    assert e.value.status == "decode_error"

    # a header claiming 40000 x 40000 pixels: rejected by our guard, and by Pillow's when ours is off
    bomb = _png_claiming_size(40000, 40000)
    assert aligner(bomb).status == "too_large"
    with pytest.raises(ImageDecodeError) as e:
        load_image(bomb, max_pixels=10**12)
    assert e.value.status == "too_large"

    r = aligner(astronaut.resize((30, 30)))
    assert r.status == "too_small" and "30x30" in r.error
    assert aligner(np.zeros((20, 600, 3), np.uint8)).status == "too_small"


# -- image modes and EXIF ----------------------------------------------------------------------


def _roundtrip(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_modes_are_normalised_to_rgb_and_align(aligner, astronaut):
    reference = aligner(astronaut)
    gray = astronaut.convert("L")
    gray16 = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)  # 16-bit: 0..65535
    rgba = astronaut.convert("RGBA")
    alpha = np.full((512, 512), 255, np.uint8)
    alpha[:, 400:] = 0  # right strip transparent
    rgba.putalpha(Image.fromarray(alpha))
    variants = {
        "L png": _roundtrip(gray, "PNG"),
        "I;16 png": _roundtrip(gray16, "PNG"),
        "P png": _roundtrip(astronaut.quantize(256), "PNG"),
        "RGBA png": _roundtrip(rgba, "PNG"),
        "LA png": _roundtrip(gray.convert("LA"), "PNG"),
        "CMYK jpeg": _roundtrip(astronaut.convert("CMYK"), "JPEG", quality=95),
        "CMYK tiff": _roundtrip(astronaut.convert("CMYK"), "TIFF"),
    }
    decoded = {}
    for name, data in variants.items():
        img = load_image(data, name=name)
        assert img.mode == "RGB" and img.size == (512, 512), name
        decoded[name] = np.asarray(img)
        result = aligner(data, name=name)
        assert result.status == "ok", (name, result.error)
        shift = np.abs(result.landmarks - reference.landmarks).mean()
        assert shift < 0.05 * _iod(reference.landmarks), (name, shift)

    gray_rgb = np.repeat(np.asarray(gray)[:, :, None], 3, axis=2)
    # 16-bit is scaled (v * 255 / 65535), not clipped at 255: it equals the 8-bit gray image
    np.testing.assert_array_equal(decoded["I;16 png"], gray_rgb)
    np.testing.assert_array_equal(decoded["L png"], gray_rgb)
    # transparent pixels are composited on white; opaque ones keep their colour
    assert (decoded["RGBA png"][:, 400:] == 255).all()
    np.testing.assert_array_equal(decoded["RGBA png"][:, :400], np.asarray(astronaut)[:, :400])
    # CMYK round trips close to the RGB original
    assert np.abs(decoded["CMYK tiff"].astype(int) - np.asarray(astronaut)).mean() < 2.0
    assert np.abs(decoded["CMYK jpeg"].astype(int) - np.asarray(astronaut)).mean() < 6.0


@pytest.mark.parametrize("orientation, stored", [(6, Image.Transpose.ROTATE_90), (3, Image.Transpose.ROTATE_180)])
def test_exif_orientation_is_applied_before_detection(aligner, astronaut, orientation, stored):
    upright = astronaut.crop((0, 0, 512, 400))  # not square, so a wrong rotation changes the size
    pixels = upright.transpose(stored)  # what a camera writes, with the tag saying how to show it
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _roundtrip(pixels, "JPEG", quality=95, exif=exif)

    img = load_image(data)
    assert img.size == upright.size
    assert np.abs(np.asarray(img, int) - np.asarray(upright, int)).mean() < 3.0

    expected = aligner(upright)
    result = aligner(data)
    assert result.status == "ok"
    assert np.abs(result.landmarks - expected.landmarks).mean() < 0.05 * _iod(expected.landmarks)
    if orientation == 6:  # the stored (sideways) pixels alone: the frontal detector misses the face
        assert aligner.replace(select="best")(np.asarray(pixels)).status == "no_face"


# -- fast mode ---------------------------------------------------------------------------------


def test_fast_mode_finds_the_same_face_and_is_exact_when_the_scan_fits(aligner, astronaut):
    # a 512 px photo fits detect_size=1024: the exact scan, nothing changes
    fits = aligner.replace(detect_size=1024)(astronaut)
    np.testing.assert_array_equal(fits.landmarks, aligner(astronaut).landmarks)

    big = astronaut.resize((1024, 1024), Image.Resampling.LANCZOS)
    exact, quick = aligner(big), aligner.replace(detect_size=512)(big)
    assert exact.status == quick.status == "ok"
    # coarse scan at 512 px, then the face re-detected on the original's level grid: on this photo
    # the box is the exact one (in general landmarks may move a little: bench/align.py)
    assert np.abs(quick.landmarks - exact.landmarks).mean() < 0.01 * _iod(exact.landmarks)
    assert quick.image.size == (256, 256)


# -- exact detection without the small-face pyramid levels --------------------------------------


def _composite(seed: int, astronaut: Image.Image) -> Image.Image:
    """Astronaut faces (0-3, random scales 0.3-2.5, mirrored or not) pasted on a plain or photo
    background, some cut by the border."""
    from psp_core.align_reference import composite_photo

    return composite_photo(seed, astronaut.crop((90, 0, 360, 270)), max_size=(1400, 1200), min_faces=0)


def _original_detections(aligner, arr, min_face):
    rects, scores, idx = aligner.detector.run(arr, 1, 0.0)
    found = [((r.left(), r.top(), r.right(), r.bottom()), s, i) for r, s, i in zip(rects, scores, idx)]
    return [d for d in found if box_side(d[0]) >= min_face]


def test_pyramid_detector_equals_the_original_detector_for_kept_faces(aligner, astronaut):
    """Boxes, scores, filter index and order of `detector(img, 1)` for every face of at least
    min_face px, on astronauts of several sizes and composites with faces at random scales."""
    images = [astronaut.resize((s, s), Image.Resampling.LANCZOS) for s in (400, 700, 1000)]
    images += [_composite(seed, astronaut) for seed in range(6)]
    compared = 0
    for min_face in (64, 100, 160):
        assert skip_levels(min_face) > 0
        detector = PyramidDetector(aligner.detector, min_face)
        for img in images:
            arr = np.asarray(img)
            expected = _original_detections(aligner, arr, min_face)
            assert [tuple(d) for d in detector.run(arr)] == expected
            compared += len(expected)
    assert compared > 20  # the images do hold faces of these sizes


def test_min_face_keeps_the_original_landmarks_and_crop(aligner, astronaut):
    """The aligner with min_face 64 gives the original's box, score, landmarks and crop."""
    big = astronaut.resize((900, 900), Image.Resampling.LANCZOS)
    plain, fast = aligner.replace(select="all"), aligner.replace(select="all", min_face=64)
    expected = [r for r in plain(big) if box_side(r.box) >= 64]
    found = fast(big)
    assert len(found) == len(expected) == 2
    for a, b in zip(found, expected):
        assert tuple(a.box) == tuple(b.box) and a.score == b.score
        np.testing.assert_array_equal(a.landmarks, b.landmarks)
        assert _max_diff(a.image, b.image) == 0


def test_min_face_applies_to_best_and_largest(aligner, astronaut):
    face = astronaut.crop((90, 0, 360, 270))
    group = Image.new("RGB", (480, 310), (128, 128, 128))
    group.paste(face, (20, 20))  # a box of about 90 px
    group.paste(face.resize((162, 162), Image.Resampling.LANCZOS), (300, 20))  # about 53 px
    group = np.asarray(group)
    every = aligner.replace(select="all")(group)
    sides = sorted(box_side(r.box) for r in every)
    assert len(sides) == 2 and sides[0] < 64 <= sides[1]
    for select in ("best", "largest"):
        r = aligner.replace(select=select, min_face=64)(group)
        assert r.ok and box_side(r.box) >= 64
        tiny = aligner.replace(select=select, min_face=200)(group)
        assert tiny.status == "no_face" and "minimum face size 200 px" in tiny.error


def test_pad_blend_is_bit_identical_to_the_whole_image_version():
    """The strips-only pad branch equals the original's whole-image blur / median blend exactly."""
    from skimage import data

    from psp_core.align_reference import reference_pad_blend as whole

    rng = np.random.default_rng(7)
    source = data.astronaut()
    cases = 0
    while cases < 25:
        hh, ww = int(rng.integers(20, 300)), int(rng.integers(20, 300))
        y, x = int(rng.integers(0, 512 - hh)), int(rng.integers(0, 512 - ww))
        img = source[y : y + hh, x : x + ww] if cases % 3 else rng.integers(0, 256, (hh, ww, 3), dtype=np.uint8)
        qsize = float(rng.uniform(30, 500))
        p = int(np.rint(qsize * 0.3))
        pad = [max(int(rng.integers(0, 3 * p)), p) if rng.random() < 0.5 else p for _ in range(4)]
        pad = [min(v, d - 1) for v, d in zip(pad, (ww, hh, ww, hh))]  # reflect needs pad < size
        if min(pad) < 1:
            continue
        assert np.array_equal(pad_blend(img, pad, qsize), whole(img, pad, qsize)), (img.shape, pad, qsize)
        cases += 1


def test_invalid_options_are_rejected(aligner):
    with pytest.raises(ValueError, match="select"):
        aligner.replace(select="first")
    with pytest.raises(ValueError, match="transform_size"):
        aligner.replace(output_size=1024, transform_size=256)
    with pytest.raises(TypeError, match="unknown"):
        aligner.replace(sise=3)
    with pytest.raises(ValueError, match="min_face"):
        aligner.replace(min_face=-1)


def test_align_result_defaults():
    r = AlignResult(status="no_face", error="x")
    assert not r.ok and r.image is None and r.n_faces == 0


# -- speed mode (WindowDetector) ----------------------------------------------------------------


def _best_box(results) -> tuple[int, ...] | None:
    ok = [r for r in (results if isinstance(results, list) else [results]) if r.ok]
    return tuple(int(v) for v in max(ok, key=lambda r: r.score).box) if ok else None


def test_speed_mode_never_picks_another_face_on_group_photos(aligner, astronaut):
    """A group photo whose best face (~90 px) is under what the coarse scan sees, and composites
    with faces at random scales: the speed mode aligns the face the exact mode aligns."""
    from psp_core.align_reference import group_photo

    face = astronaut.crop((90, 0, 360, 270))
    group = np.asarray(group_photo(face))
    exact, speed = aligner.replace(min_face=64), aligner.replace(min_face=64, detect_size=512)
    best = exact(group)
    assert best.ok and box_side(best.box) < 100  # the small face wins: the case under test
    assert _best_box(speed(group)) == _best_box(best)
    for seed in (1, 4, 6, 13):  # composites with 2-3 faces of different sizes
        img = np.asarray(_composite(seed, astronaut))
        assert _best_box(speed(img)) == _best_box(exact(img)), f"composite {seed}"


def test_speed_mode_refines_one_clear_face_on_the_original_grid(aligner, astronaut):
    """A one-face photo larger than detect_size takes the window path: a 1414 px astronaut and a 4:3
    mirrored crop; the box has the exact mode's size and the landmarks stay within 2 % of the
    inter-ocular distance (the 1414 px photo's box lands one HOG cell off: 1.0 %; the bench's mean
    over its photos is ~0.1 %)."""
    from psp_core.face_detection import WindowDetector

    photos = [astronaut.resize((1414, 1414), Image.Resampling.LANCZOS),
              astronaut.crop((0, 64, 512, 448)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((1155, 866))]
    exact = PyramidDetector(aligner.detector, 64)
    window = WindowDetector(aligner.detector, exact, 512)
    for img in photos:
        arr = np.asarray(img)
        found = window.run(arr)
        assert window.last_path == "window" and len(found) == 1
        want = aligner.replace(min_face=64)(arr)
        lm = aligner.landmarks(arr, found[0].box)
        assert np.abs(box_side(found[0].box) - box_side(want.box)) <= 1
        assert np.linalg.norm(lm - want.landmarks, axis=1).mean() < 0.02 * _iod(want.landmarks)


def test_speed_mode_refines_in_the_farther_level_when_the_nearer_two_find_nothing(aligner, astronaut):
    """The refinement tries the level the coarse box's size points to and its nearer neighbour, and
    the farther neighbour only where those found nothing: on a mirrored 1581 px astronaut (one of
    bench/align_stage.py's photos) the two nearer levels find no box, and the photo stays on the
    window path (not the exact scan) with landmarks within 2 % of the inter-ocular distance."""
    from PIL import ImageOps

    from psp_core.face_detection import WindowDetector

    arr = np.asarray(ImageOps.mirror(astronaut.resize((1581, 1581), Image.Resampling.BICUBIC)))
    window = WindowDetector(aligner.detector, PyramidDetector(aligner.detector, 64), 512)
    found = window.run(arr)
    assert window.last_path == "window" and len(found) == 1
    want = aligner.replace(min_face=64)(arr)
    lm = aligner.landmarks(arr, found[0].box)
    assert np.linalg.norm(lm - want.landmarks, axis=1).mean() < 0.02 * _iod(want.landmarks)


def test_fast_pad_blend_stays_within_a_few_gray_levels(astronaut):
    """The speed mode's pad blend (reduced-scale blur): the padded image within 4 gray levels of the
    original's blend, the interior untouched."""
    from psp_core.align import pad_blend_fast

    img = np.asarray(astronaut.crop((100, 0, 400, 300)).resize((600, 600), Image.Resampling.LANCZOS))
    pad, qsize = (180, 200, 180, 180), 600.0
    exact, fast = pad_blend(img, pad, qsize), pad_blend_fast(img, pad, qsize)
    assert fast.shape == exact.shape
    diff = np.abs(exact.astype(np.int16) - fast.astype(np.int16))
    assert diff.max() <= 4 and diff.mean() < 0.3
    inner = (slice(200 + 300, 200 + 400), slice(180 + 250, 180 + 350))  # weight 0 there: the photo's pixels
    np.testing.assert_array_equal(fast[inner], img[300:400, 250:350])


def test_speed_mode_with_all_faces_finds_what_the_exact_mode_finds(aligner, astronaut):
    """faces 'all' / 'largest': a second candidate (the astronaut's weak detection on the suit) sends
    the photo to the exact path, so no face row is lost."""
    big = np.asarray(astronaut.resize((1414, 1414), Image.Resampling.LANCZOS))
    exact = aligner.replace(select="all", min_face=64)(big)
    speed = aligner.replace(select="all", min_face=64, detect_size=512)(big)
    assert len(exact) >= 2
    assert [tuple(r.box) for r in speed] == [tuple(r.box) for r in exact]
    largest = aligner.replace(select="largest", min_face=64)
    assert tuple(largest.replace(detect_size=512)(big).box) == tuple(largest(big).box)


# -- speed mode on JPEG bytes: decoded at reduced scale (psp_core.images.JpegDraft) ---------------


@pytest.fixture(scope="module")
def camera_jpegs(astronaut) -> list[bytes]:
    """The astronaut at camera sizes as JPEG bytes (q92): 1414 px square, and a 4:3 mirrored crop at
    1155x866 whose face is near the top (the pad branch runs)."""
    photos = [astronaut.resize((1414, 1414), Image.Resampling.BICUBIC),
              astronaut.crop((0, 64, 512, 448)).transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((1155, 866))]
    return [_roundtrip(p, "JPEG", quality=92) for p in photos]


def test_speed_mode_aligns_a_jpeg_from_its_half_scale_decode_within_the_stated_deviation(aligner, camera_jpegs):
    """The speed mode decodes a camera-size JPEG at 1/2 scale (Image.draft) and aligns the face from
    that decode: the same face as the exact mode, landmarks within 2 % of the inter-ocular distance
    per photo (in the photo's pixels; the 1414 px photo's box lands one HOG cell off, 1.1 %, as in
    the full-resolution speed mode; bench/align_stage.py's mean over its photos is under 1 %), the
    photo's own size, and a crop within a few gray levels on average."""
    exact, speed = aligner.replace(min_face=64), aligner.replace(min_face=64, detect_size=512)
    for blob in camera_jpegs:
        e, s = exact(blob), speed(blob)
        assert speed.last_path == "1/2 decode"
        assert e.ok and s.ok and s.source_size == e.source_size
        assert np.linalg.norm(s.landmarks - e.landmarks, axis=1).mean() < 0.02 * _iod(e.landmarks)
        diff = np.abs(np.asarray(s.image, np.int16) - np.asarray(e.image, np.int16))
        assert diff.mean() < 4.0, diff.mean()


def test_exact_mode_and_non_jpeg_inputs_decode_every_pixel(aligner, camera_jpegs, astronaut):
    """The exact mode given JPEG bytes aligns exactly what it aligns on the fully decoded pixels; the
    speed mode given a PNG (or a JPEG whose photo fits detect_size) takes its full-resolution path."""
    exact = aligner.replace(min_face=64)
    blob = camera_jpegs[0]
    pixels = np.asarray(load_image(blob))
    a, b = exact(blob), exact(pixels)
    np.testing.assert_array_equal(a.landmarks, b.landmarks)
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    speed = aligner.replace(min_face=64, detect_size=512)
    png = _roundtrip(Image.fromarray(pixels), "PNG")
    a, b = speed(png), speed(pixels)
    np.testing.assert_array_equal(a.landmarks, b.landmarks)
    np.testing.assert_array_equal(np.asarray(a.image), np.asarray(b.image))
    small = _roundtrip(astronaut, "JPEG", quality=92)  # 512 px: fits detect_size 512
    np.testing.assert_array_equal(speed(small).landmarks, speed(np.asarray(load_image(small))).landmarks)
    assert speed.last_path.startswith("full decode")


def test_jpeg_draft_decodes_at_reduced_scale_and_only_plain_jpegs_are_drafts(camera_jpegs, astronaut):
    from psp_core.images import open_jpeg_draft

    blob = camera_jpegs[1]  # 1155x866
    draft = open_jpeg_draft(blob)
    assert draft is not None and draft.size == (1155, 866)
    full = np.asarray(load_image(blob))
    np.testing.assert_array_equal(np.asarray(draft.decode(1)), full)
    half = draft.decode(2)
    assert half.size == (578, 433)
    # the DCT-scaled decode is close to the full decode box-reduced by 2
    reduced = np.asarray(Image.fromarray(full).reduce(2), np.int16)
    assert np.abs(np.asarray(half, np.int16) - reduced).mean() < 2.0
    rotated = Image.Exif()
    rotated[0x0112] = 6
    assert open_jpeg_draft(_roundtrip(astronaut, "JPEG", exif=rotated)) is None  # EXIF rotation: full decode
    assert open_jpeg_draft(_roundtrip(astronaut, "PNG")) is None
    assert open_jpeg_draft(_roundtrip(astronaut.convert("L"), "JPEG")) is None
    assert open_jpeg_draft(b"\xff\xd8\xff" + b"\x00" * 64) is None  # a broken header: load_image names it


def test_speed_mode_reports_a_truncated_jpeg_as_a_decode_error(aligner, camera_jpegs):
    blob = camera_jpegs[0]
    result = aligner.replace(min_face=64, detect_size=512)(blob[: len(blob) // 2], name="cut.jpg")
    assert result.status == "decode_error" and "truncated" in result.error and "cut.jpg" in result.error
