"""Draw what a MediaPipe judge saw on an image, so a reader of the report can check it by eye.

:func:`draw_observation` takes a PIL image and its :class:`vision.Observation` and returns a copy with the
face boxes (with scores), the pose skeleton (visible joints only) and each hand's 21 landmarks and
skeleton (with handedness score) drawn on it.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

from t2i_curate.eval.vision import Observation

HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (5, 9), (9, 10), (10, 11),
              (11, 12), (9, 13), (13, 14), (14, 15), (15, 16), (13, 17), (0, 17), (17, 18), (18, 19), (19, 20))
POSE_EDGES = ((11, 12), (11, 13), (13, 15), (12, 14), (14, 16), (11, 23), (12, 24), (23, 24), (23, 25),
              (25, 27), (24, 26), (26, 28), (27, 31), (28, 32), (0, 2), (0, 5), (2, 7), (5, 8))
FACE, POSE, HAND, JOINT = (255, 215, 0), (0, 200, 255), (255, 40, 120), (255, 255, 255)


def _width(im: Image.Image) -> int:
    return max(1, round(min(im.size) / 200))


def _faces(d: ImageDraw.ImageDraw, obs: Observation, w: int) -> None:
    for f in obs.faces:
        d.rectangle(f.box, outline=FACE, width=w)
        d.text((f.box[0], max(0, f.box[1] - 12)), f"face {f.score:.2f}", fill=FACE)


def _pose(d: ImageDraw.ImageDraw, obs: Observation, w: int, min_visibility: float) -> None:
    if obs.pose is None:
        return
    pts, vis = obs.pose.landmarks, obs.pose.visibility
    for a, b in POSE_EDGES:
        if vis[a] >= min_visibility and vis[b] >= min_visibility:
            d.line([tuple(pts[a, :2]), tuple(pts[b, :2])], fill=POSE, width=w)


def _hands(d: ImageDraw.ImageDraw, obs: Observation, w: int) -> None:
    for h in obs.hands:
        pts = h.landmarks
        for a, b in HAND_EDGES:
            d.line([tuple(pts[a, :2]), tuple(pts[b, :2])], fill=HAND, width=w)
        r = w + 1
        for x, y in pts[:, :2]:
            d.ellipse((x - r, y - r, x + r, y + r), fill=JOINT, outline=HAND)
        d.text((pts[0, 0], pts[0, 1] + 2), f"{h.handedness} {h.score:.2f}", fill=HAND)


def draw_observation(image: Image.Image, obs: Observation, min_visibility: float = 0.5) -> Image.Image:
    """A copy of ``image`` (RGB, same size) with ``obs``'s faces, pose and hands drawn on it. ``obs``
    must come from this image (its pixel coordinates)."""
    if image.size != (obs.width, obs.height):
        raise ValueError(f"expected an image of the observed size {obs.width}x{obs.height}; got "
                         f"{image.size[0]}x{image.size[1]}")
    out = image.convert("RGB").copy()
    d = ImageDraw.Draw(out)
    w = _width(out)
    _faces(d, obs, w)
    _pose(d, obs, w, min_visibility)
    _hands(d, obs, w)
    return out
