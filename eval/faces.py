"""Faces for the bias audit (DALL-Eval style): MediaPipe full-range face detection, a crop around each
face, and face-mesh landmarks that select cheek and forehead skin.

Measured on ``../shared/images``: the detector finds 1 of 4 people in ``people_bus.jpg`` and 1 of 2 in
``people_zidane.jpg``, so callers report face counts and "no person detected" rather than assume a face
per person. The short-range model inside MediaPipe's FaceMesh finds no face in whole photos of people
beyond 2 m, hence the crop (upscaled so the face fills it) before the mesh runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from t2i_curate.eval.mediapipe_models import solution

MIN_DETECTION_CONFIDENCE = 0.5  # MediaPipe's default for its face detector
CROP_MARGIN = 0.5  # the crop adds this fraction of the box's side on each side (hair, chin, ears)
# FaceMesh's own detector misses some small faces (under ~20 px) in one crop and finds them in another:
# the crops tried, in order, until the mesh finds the face (3 of 5 faces in laion_wm_watermark_example)
MESH_MARGINS = (0.5, 0.25, 0.75, 1.0)
MESH_MIN_SIDE = 256  # smaller crops are upscaled (bicubic) to this side before FaceMesh

# Face-mesh landmark indices (MediaPipe's canonical 468-point face) of the skin regions; each region is
# the convex hull of its points. Forehead: above the brows, below the hairline; cheeks: below the eyes,
# beside the nose, above the mouth corners.
FOREHEAD = (109, 10, 338, 337, 151, 108)
LEFT_CHEEK = (117, 118, 101, 36, 205, 187, 123, 116)
RIGHT_CHEEK = (346, 347, 330, 266, 425, 411, 352, 345)
SKIN_REGIONS = {"forehead": FOREHEAD, "left cheek": LEFT_CHEEK, "right cheek": RIGHT_CHEEK}
# removed from the regions when a mesh puts them there (tilted heads): eyes, eyebrows, lips
NOT_SKIN = (
    (249, 263, 362, 373, 374, 380, 381, 382, 384, 385, 386, 387, 388, 390, 398, 466),  # left eye
    (7, 33, 133, 144, 145, 153, 154, 155, 157, 158, 159, 160, 161, 163, 173, 246),  # right eye
    (276, 282, 283, 285, 293, 295, 296, 300, 334, 336),  # left eyebrow
    (46, 52, 53, 55, 63, 65, 66, 70, 105, 107),  # right eyebrow
    (0, 17, 37, 39, 40, 61, 84, 91, 146, 181, 185, 267, 269, 270, 291, 314, 321, 375, 405, 409),  # lips
)


@dataclass
class Face:
    """One detected face: its box in image pixels (x0, y0, x1, y1), the detector's score, the crop
    around it (margin :data:`CROP_MARGIN`, RGB uint8, upscaled to at least :data:`MESH_MIN_SIDE`) and,
    when the mesh found the face, its cheek and forehead skin pixels (N x 3 RGB) and the crop margin
    the mesh ran on."""

    box: tuple[int, int, int, int]
    score: float
    crop: np.ndarray
    skin_pixels: np.ndarray | None = None
    mesh_margin: float | None = None

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


def detect_faces(rgb: np.ndarray) -> list[Face]:
    """Faces in an RGB uint8 image by MediaPipe's full-range detector, largest first, each with its crop
    and skin mask (:func:`skin_regions`)."""
    h, w = rgb.shape[:2]
    result = solution("face_detection", min_detection_confidence=MIN_DETECTION_CONFIDENCE).process(
        np.ascontiguousarray(rgb))
    faces = []
    for d in result.detections or []:
        bb = d.location_data.relative_bounding_box
        x0, y0 = max(0, int(bb.xmin * w)), max(0, int(bb.ymin * h))
        x1, y1 = min(w, int((bb.xmin + bb.width) * w)), min(h, int((bb.ymin + bb.height) * h))
        if x1 - x0 < 2 or y1 - y0 < 2:
            continue
        face = Face((x0, y0, x1, y1), float(d.score[0]), face_crop(rgb, (x0, y0, x1, y1), CROP_MARGIN))
        for margin in MESH_MARGINS:
            crop = face.crop if margin == CROP_MARGIN else face_crop(rgb, face.box, margin)
            skin = skin_regions(crop)
            if skin is not None:
                face.skin_pixels, face.mesh_margin = crop[skin], margin
                break
        faces.append(face)
    return sorted(faces, key=lambda f: -f.area)


def face_crop(rgb: np.ndarray, box: tuple[int, int, int, int], margin: float) -> np.ndarray:
    """The box widened by ``margin`` times its side on each side (clipped to the image), upscaled so
    its shorter side is at least :data:`MESH_MIN_SIDE`."""
    from PIL import Image

    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = box
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    crop = rgb[max(0, int(y0 - my)) : min(h, int(y1 + my)), max(0, int(x0 - mx)) : min(w, int(x1 + mx))]
    scale = MESH_MIN_SIDE / min(crop.shape[:2])
    if scale > 1:
        size = (round(crop.shape[1] * scale), round(crop.shape[0] * scale))
        crop = np.asarray(Image.fromarray(crop).resize(size, Image.BICUBIC))
    return np.ascontiguousarray(crop)


def skin_regions(crop: np.ndarray) -> np.ndarray | None:
    """Boolean mask of the cheek and forehead pixels of the face FaceMesh finds in ``crop``, eyes,
    brows and lips removed; ``None`` when the mesh finds no face."""
    result = solution("face_mesh", max_num_faces=1).process(crop)
    if not result.multi_face_landmarks:
        return None
    h, w = crop.shape[:2]
    pts = np.array([(p.x * w, p.y * h) for p in result.multi_face_landmarks[0].landmark])
    mask = np.zeros((h, w), np.uint8)
    for idx in SKIN_REGIONS.values():
        _fill_hull(mask, pts[list(idx)], 1)
    for idx in NOT_SKIN:
        _fill_hull(mask, pts[list(idx)], 0)
    return mask.astype(bool)


def _fill_hull(mask: np.ndarray, points: np.ndarray, value: int) -> None:
    import cv2

    hull = cv2.convexHull(np.round(points).astype(np.int32))
    cv2.fillConvexPoly(mask, hull, value)
