"""What MediaPipe's real models see in one RGB image: hands, body pose, faces, and whether a person is there.

:func:`observe` turns an ``(H, W, 3)`` uint8 RGB array into an :class:`Observation` with everything in
pixels, so the judges (``judge_hands``, ``judge_pose``) decide from plain numbers and ``draw`` can show a
reader what they saw. The models are the ones ``mediapipe_models`` builds (full hand landmark model with
its palm detector, full pose landmark model, full-range face detector); ``provenance()`` names their files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from t2i_curate.eval import mediapipe_models

log = logging.getLogger(__name__)

# MediaPipe Pose landmark indices of the face (nose, eyes, ears, mouth): 0..10
POSE_FACE = tuple(range(11))


@dataclass
class Hand:
    """One hand: the landmark model's handedness score (its confidence that this is a left/right hand),
    the palm detector's score for the palm it started from (None when no palm box matched), and the 21
    landmarks as (x px, y px, z) with z the relative depth in the scale of x."""

    handedness: str
    score: float
    palm_score: float | None
    landmarks: np.ndarray  # (21, 3)
    world: np.ndarray | None = None  # (21, 3) the model's 3D hand in metres, origin at the hand's centre


@dataclass
class Pose:
    """The pose model's 33 landmarks in pixels (x, y, z in the scale of x), their visibility in [0, 1],
    and its world landmarks (metres, origin at the hips; None when absent)."""

    landmarks: np.ndarray  # (33, 3)
    visibility: np.ndarray  # (33,)
    world: np.ndarray | None = None  # (33, 3)


@dataclass
class Face:
    """A full-range face detection: box (x0, y0, x1, y1) in pixels and its score."""

    box: tuple[float, float, float, float]
    score: float


@dataclass
class Observation:
    """Everything seen in one image (``width`` x ``height`` px). ``person`` is the person gate: a face
    was detected (the pose model alone "finds" bodies in palm trees; see :func:`person_gate`)."""

    width: int
    height: int
    hands: list[Hand] = field(default_factory=list)
    pose: Pose | None = None
    faces: list[Face] = field(default_factory=list)
    person: bool = False
    pose_on_face: bool = False  # the pose's head landmarks fall in a detected face box


def _palm_centres(palms, w: int, h: int) -> list[tuple[float, float, float]]:
    out = []
    for d in palms or []:
        b = d.location_data.relative_bounding_box
        out.append(((b.xmin + b.width / 2) * w, (b.ymin + b.height / 2) * h, float(d.score[0])))
    return out


def _hands(result, w: int, h: int) -> list[Hand]:
    """Hands with each one's nearest palm detection (the palm box centre nearest its palm landmarks)."""
    palms = _palm_centres(getattr(result, "palm_detections", None), w, h)
    hands = []
    worlds = list(getattr(result, "multi_hand_world_landmarks", None) or [])
    for i, (lms, cls) in enumerate(zip(result.multi_hand_landmarks or [], result.multi_handedness or [],
                                       strict=True)):
        pts = np.array([[p.x * w, p.y * h, p.z * w] for p in lms.landmark], dtype=np.float64)
        palm_centre = pts[[0, 5, 9, 13, 17], :2].mean(axis=0)
        size = np.linalg.norm(pts[9, :2] - pts[0, :2]) + 1e-6
        near = [(np.hypot(cx - palm_centre[0], cy - palm_centre[1]), s) for cx, cy, s in palms]
        best = min(near, default=None)
        palm_score = best[1] if best is not None and best[0] < 2 * size else None
        c = cls.classification[0]
        world = (np.array([[p.x, p.y, p.z] for p in worlds[i].landmark], dtype=np.float64)
                 if i < len(worlds) else None)
        hands.append(Hand(handedness=c.label, score=float(c.score), palm_score=palm_score, landmarks=pts,
                          world=world))
    return hands


def _pose(result, w: int, h: int) -> Pose | None:
    if not result.pose_landmarks:
        return None
    lm = result.pose_landmarks.landmark
    pts = np.array([[p.x * w, p.y * h, p.z * w] for p in lm], dtype=np.float64)
    vis = np.array([p.visibility for p in lm], dtype=np.float64)
    world = None
    if getattr(result, "pose_world_landmarks", None):
        world = np.array([[p.x, p.y, p.z] for p in result.pose_world_landmarks.landmark], dtype=np.float64)
    return Pose(landmarks=pts, visibility=vis, world=world)


def _faces(result, w: int, h: int) -> list[Face]:
    faces = []
    for d in result.detections or []:
        b = d.location_data.relative_bounding_box
        box = (b.xmin * w, b.ymin * h, (b.xmin + b.width) * w, (b.ymin + b.height) * h)
        faces.append(Face(box=tuple(float(v) for v in box), score=float(d.score[0])))
    return faces


def pose_on_face(pose: Pose | None, faces: list[Face], min_visibility: float = 0.5) -> bool:
    """True when the pose's visible head landmarks (nose, eyes, ears, mouth) lie inside a detected face
    box grown by half its size: the body the pose model found is the person the face detector found."""
    if pose is None or not faces:
        return False
    head = pose.landmarks[list(POSE_FACE), :2][pose.visibility[list(POSE_FACE)] >= min_visibility]
    if len(head) == 0:
        return False
    x, y = head.mean(axis=0)
    for f in faces:
        x0, y0, x1, y1 = f.box
        mx, my = (x1 - x0) / 2, (y1 - y0) / 2
        if x0 - mx <= x <= x1 + mx and y0 - my <= y <= y1 + my:
            return True
    return False


def person_gate(faces: list[Face], min_face_score: float = 0.5) -> bool:
    """The person gate: a full-range face detection scoring at least ``min_face_score``. Pose landmarks
    alone are not enough: the pose model returns a body with mean visibility 0.64 on a photo of palm
    trees (``i2d_321_421.jpg``), where the face detector finds nothing."""
    return any(f.score >= min_face_score for f in faces)


def observe(rgb: np.ndarray, *, hands: bool = True, pose: bool = True, max_num_hands: int = 4,
            min_hand_detection: float = 0.3, min_face_score: float = 0.5) -> Observation:
    """Run the face detector, and the hand and pose models when asked, on an ``(H, W, 3)`` uint8 RGB
    image; returns an :class:`Observation` in pixels. Raises :class:`mediapipe_models.MediaPipeMissingError`
    when MediaPipe is not installed."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image; got shape {rgb.shape}, dtype {rgb.dtype}")
    h, w = rgb.shape[:2]
    rgb = np.ascontiguousarray(rgb)
    faces = _faces(mediapipe_models.solution("face_detection").process(rgb), w, h)
    obs = Observation(width=w, height=h, faces=faces, person=person_gate(faces, min_face_score))
    if hands:
        found = mediapipe_models.solution("hands", max_num_hands=max_num_hands,
                                          min_detection_confidence=min_hand_detection).process(rgb)
        obs.hands = _hands(found, w, h)
    if pose:
        obs.pose = _pose(mediapipe_models.solution("pose").process(rgb), w, h)
        obs.pose_on_face = pose_on_face(obs.pose, faces)
    return obs


def load_rgb(path) -> np.ndarray:
    """An image file as an (H, W, 3) uint8 RGB array (EXIF orientation applied)."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


_SEEN: dict[tuple, Observation] = {}  # per process: (file, its size and mtime, settings) -> what was seen
_SEEN_MAX = 4096  # a few MB: the hands judge's observations, reused by measure's census of every image


def observe_path(path, **kwargs) -> Observation:
    """:func:`observe` on an image file, remembered for the same file and settings (the census asks again
    for the images the hands judge has just looked at). Raises OSError / ValueError for an unreadable file."""
    import inspect
    import os

    settings = inspect.signature(observe).bind(None, **kwargs)
    settings.apply_defaults()
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns, tuple(sorted(settings.kwargs.items())))
    if key not in _SEEN:
        if len(_SEEN) >= _SEEN_MAX:
            _SEEN.pop(next(iter(_SEEN)))
        _SEEN[key] = observe(load_rgb(path), **kwargs)
    return _SEEN[key]


def observe_rows(image_dir, rows: list[dict], **kwargs) -> list[Observation | None]:
    """:func:`observe_path` on ``image_dir / row["file"]`` for each row; None for an image that cannot be
    read (logged; the judge counts it as unknown). MediaPipe missing raises before any image is read."""
    from pathlib import Path

    mediapipe_models.solutions()
    out: list[Observation | None] = []
    for row in rows:
        path = Path(image_dir) / row["file"]
        try:
            out.append(observe_path(path, **kwargs))
        except (OSError, ValueError) as e:
            log.warning("cannot read %s (%s); its judgement is unknown", path, e)
            out.append(None)
    return out


def mediapipe_provenance(*kinds: str) -> dict[str, str]:
    """Flat provenance of MediaPipe solutions for a judge: ``library`` (name and version) and
    ``model <file>`` -> sha256 for each model file the solutions run."""
    out: dict[str, str] = {}
    for kind in kinds:
        prov = mediapipe_models.provenance(kind)
        out["library"] = prov["library"]
        out.update({f"model {f}": sha for f, sha in prov["models"].items()})
    return out
