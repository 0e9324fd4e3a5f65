"""Face identity: dlib's 128-d face recognition descriptor and the distance between two faces.

dlib's ResNet face descriptor (`dlib_face_recognition_resnet_model_v1.dat`, from the
`face-recognition-models` wheel) maps a face to a 128-d vector; two photos of the same person are
usually closer than 0.6 in Euclidean distance (dlib's documented threshold, 99.38 % on LFW). The
pipeline reports it between the aligned input and the reconstruction (`--metrics`).
"""
from __future__ import annotations

import math
import os
from typing import Union

import numpy as np
from PIL import Image

from psp_core.align import _array_to_rgb, dlib_model_path, load_image

__all__ = ["FaceDescriptor", "identity_distance", "SAME_PERSON_THRESHOLD", "ALIGNED_FACE_BOX"]

#: dlib's usual decision threshold: a distance below it means "same person".
SAME_PERSON_THRESHOLD = 0.6

#: Where the HOG detector puts the face in an FFHQ-aligned crop, as fractions of the side
#: (left, top, right, bottom); measured on aligned crops at 128-1024 px. Used with aligned=True.
ALIGNED_FACE_BOX = (0.25, 0.36, 0.765, 0.885)

ImageLike = Union[Image.Image, np.ndarray, bytes, str, os.PathLike]


class FaceDescriptor:
    """dlib's 128-d face recognition model with its detector and 5-point landmark predictor.

    desc = FaceDescriptor(); v = desc(image)  # float32 [128] or None when no face is found

    detector_upsample: HOG upsamplings when the face must be found (1 finds faces down to ~40 px).
    num_jitters: dlib's test-time augmentation (0 = deterministic, single pass).
    The models are loaded once; reuse one instance per worker.
    """

    def __init__(self, detector_upsample: int = 1, num_jitters: int = 0, padding: float = 0.25):
        import dlib

        self._dlib = dlib
        self.detector_upsample = int(detector_upsample)
        self.num_jitters = int(num_jitters)
        self.padding = float(padding)
        self.detector = dlib.get_frontal_face_detector()
        self.predictor5 = dlib.shape_predictor(dlib_model_path("shape_predictor_5_face_landmarks.dat"))
        self.model = dlib.face_recognition_model_v1(dlib_model_path("dlib_face_recognition_resnet_model_v1.dat"))

    def __call__(
        self, image: ImageLike, landmarks: np.ndarray | None = None, *, aligned: bool = False
    ) -> np.ndarray | None:
        """128-d descriptor (float32 [128]) of the face in `image`, or None when no face is found.

        image: PIL image, HxW[xC] uint8 array, encoded bytes or a path (any mode; made RGB).
        landmarks: optional [68,2] or [5,2] (x, y) points of the face (e.g. AlignResult.landmarks):
        detection is then skipped. Without them the highest-scoring HOG detection is used and its 5
        landmarks predicted. aligned=True: the image is an FFHQ-aligned crop, so the face box is
        known (ALIGNED_FACE_BOX) and no detection runs; a descriptor is always returned (useful for
        reconstructions whose faces the detector may miss).
        Raises ImageDecodeError for undecodable input and ValueError for landmarks of another shape.
        """
        arr = _to_rgb_array(image)
        dlib = self._dlib
        if landmarks is not None:
            lm = np.asarray(landmarks, dtype=np.float64)
            if lm.ndim != 2 or lm.shape[1] != 2 or lm.shape[0] not in (5, 68):
                raise ValueError(f"FaceDescriptor: landmarks must be [68,2] or [5,2], got {lm.shape}")
            pts = np.rint(lm).astype(int)
            rect = dlib.rectangle(int(pts[:, 0].min()), int(pts[:, 1].min()), int(pts[:, 0].max()), int(pts[:, 1].max()))
            shape = dlib.full_object_detection(rect, [dlib.point(int(x), int(y)) for x, y in pts])
        else:
            if aligned:
                h, w = arr.shape[:2]
                left, top, right, bottom = ALIGNED_FACE_BOX
                rect = dlib.rectangle(int(left * w), int(top * h), int(right * w), int(bottom * h))
            else:
                rects, scores, _ = self.detector.run(arr, self.detector_upsample, 0.0)
                if len(rects) == 0:
                    return None
                rect = rects[int(np.argmax(scores))]
            shape = self.predictor5(arr, rect)
        desc = self.model.compute_face_descriptor(arr, shape, self.num_jitters, self.padding)
        return np.asarray(desc, dtype=np.float32)


def _to_rgb_array(image: ImageLike) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    return np.asarray(load_image(image, min_side=1))


_DEFAULT: FaceDescriptor | None = None


def _default_descriptor() -> FaceDescriptor:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = FaceDescriptor()
    return _DEFAULT


def identity_distance(
    a: ImageLike | np.ndarray,
    b: ImageLike | np.ndarray,
    descriptor: FaceDescriptor | None = None,
    *,
    aligned: bool = False,
) -> float:
    """Euclidean distance between the faces of `a` and `b` (< SAME_PERSON_THRESHOLD = 0.6: same person).

    a, b: images (see FaceDescriptor) or precomputed descriptors (float [128] arrays).
    descriptor: the FaceDescriptor to use (default: one shared instance, loaded on first use).
    aligned: both images are FFHQ-aligned crops (no detection; see FaceDescriptor).
    Returns NaN when no face is found in either image, so a metrics column stays numeric.
    The descriptor may also come first: identity_distance(descriptor, a, b).
    """
    if isinstance(a, FaceDescriptor):  # the (descriptor, a, b) calling form
        a, b, descriptor = b, descriptor, a
    va, vb = _descriptor_of(a, descriptor, aligned), _descriptor_of(b, descriptor, aligned)
    if va is None or vb is None:
        return math.nan
    return float(np.linalg.norm(va.astype(np.float64) - vb.astype(np.float64)))


def _descriptor_of(x, descriptor: FaceDescriptor | None, aligned: bool) -> np.ndarray | None:
    if isinstance(x, np.ndarray) and x.ndim == 1:
        if x.shape != (128,):
            raise ValueError(f"identity_distance: a descriptor must have shape (128,), got {x.shape}")
        return x
    return (descriptor or _default_descriptor())(x, aligned=aligned)
