"""dlib face descriptors: the same person stays close under flips, rescaling and alignment; other
people (LFW faces shipped with scikit-image) are farther."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from psp_core.align import FaceAligner
from psp_core.identity import SAME_PERSON_THRESHOLD, FaceDescriptor, identity_distance


@pytest.fixture(scope="module")
def descriptor() -> FaceDescriptor:
    return FaceDescriptor()


@pytest.fixture(scope="module")
def other_people(descriptor) -> list[np.ndarray]:
    """Descriptors of other people: the first 8 LFW faces of skimage's lfw_subset (25x25 gray,
    upscaled) in which the detector finds a face (it misses a few of these tiny crops)."""
    from skimage import data

    found = []
    for f in data.lfw_subset()[:100]:  # the first 100 are faces, the rest are not
        face = np.asarray(Image.fromarray((f * 255).astype(np.uint8)).resize((200, 200), Image.Resampling.BICUBIC))
        v = descriptor(face)
        if v is not None:
            found.append(v)
        if len(found) == 8:
            return found
    raise AssertionError(f"the detector found only {len(found)} of the LFW faces")


def test_descriptor_is_a_deterministic_128_vector(descriptor, astronaut):
    a, b = descriptor(astronaut), descriptor(np.asarray(astronaut))
    assert a.shape == (128,) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert 0.5 < np.linalg.norm(a) < 2.0  # dlib's descriptors are roughly unit length


def test_same_person_is_closer_than_other_people(descriptor, astronaut, other_people):
    ref = descriptor(astronaut)
    aligned = FaceAligner()(astronaut).image
    same = {
        "mirrored": identity_distance(ref, astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT), descriptor),
        "rescaled 0.7": identity_distance(ref, astronaut.resize((358, 358), Image.Resampling.LANCZOS), descriptor),
        "rescaled 1.5": identity_distance(ref, astronaut.resize((768, 768), Image.Resampling.LANCZOS), descriptor),
        "aligned crop": identity_distance(ref, aligned, descriptor),
        "aligned crop, known box": identity_distance(ref, aligned, descriptor, aligned=True),
    }
    others = [identity_distance(ref, face) for face in other_people]
    assert max(same.values()) < min(others), (same, others)
    assert max(same.values()) < SAME_PERSON_THRESHOLD, same


def test_landmarks_from_the_aligner_skip_detection(descriptor, astronaut):
    lm = FaceAligner()(astronaut).landmarks
    from_landmarks = descriptor(astronaut, lm)
    assert identity_distance(from_landmarks, descriptor(astronaut)) < SAME_PERSON_THRESHOLD
    with pytest.raises(ValueError, match="landmarks"):
        descriptor(astronaut, lm[:10])


def test_no_face_gives_none_and_nan(descriptor, astronaut):
    from skimage import data

    assert descriptor(data.coffee()) is None
    assert math.isnan(identity_distance(astronaut, data.coffee(), descriptor))


def test_descriptor_first_calling_form(descriptor, astronaut):
    flipped = astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert identity_distance(descriptor, astronaut, flipped) == identity_distance(astronaut, flipped, descriptor)
