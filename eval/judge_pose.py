"""Body pose judge (``human_limbs``): MediaPipe Pose's real models, gated on a detected person.

Gate: the full-range face detector finds a face (score >= ``min_face_score``) and the pose's head
landmarks fall in a face box (``vision.pose_on_face``). The pose model alone is not enough: it returns a
body with mean visibility 0.64 on a photo of palm trees (``i2d_321_421.jpg``). Gate closed -> unknown.

Two PROXY failure signals, neither validated against human labels here:
(a) PROXY, missing limbs: the prompt says a limb should be visible ("full body" -> arms and legs,
    "arms" -> arms, "legs" -> legs; ``LIMB_CUES``), and one of that limb's joints (shoulder/elbow/wrist,
    hip/knee/ankle) has visibility < ``min_visibility`` or lies outside the image.
(b) PROXY, left/right asymmetry: for each bone pair (upper arm, forearm, thigh, shin) whose four joints
    are all visible, the longer / shorter length on the model's 3D world landmarks; flagged above
    ``max_asymmetry`` (default 1.5: real adults differ by a few percent, our real photos by at most
    1.11; the rest of the margin absorbs the model's depth errors on foreshortened limbs).

P(fail) is 1.0 when a proxy fires, else 0.0; None (unknown) when the gate is closed or neither signal
could be measured (no limb cue in the prompt and no bone pair fully visible).
"""

from __future__ import annotations

import re

import numpy as np
from pydantic import Field

from t2i_curate.eval.judge import Judge
from t2i_curate.eval.vision import Observation, Pose, mediapipe_provenance, observe_rows

# MediaPipe Pose joint chains (left, right)
LIMBS = {"left_arm": (11, 13, 15), "right_arm": (12, 14, 16), "left_leg": (23, 25, 27),
         "right_leg": (24, 26, 28)}
# (name, left bone, right bone)
BONE_PAIRS = (("upper_arm", (11, 13), (12, 14)), ("forearm", (13, 15), (14, 16)),
              ("thigh", (23, 25), (24, 26)), ("shin", (25, 27), (26, 28)))
# prompt wording -> the limbs it implies are visible
LIMB_CUES = (
    (re.compile(r"\bfull[- ]body\b", re.I), ("left_arm", "right_arm", "left_leg", "right_leg")),
    (re.compile(r"\barms\b", re.I), ("left_arm", "right_arm")),
    (re.compile(r"\blegs\b", re.I), ("left_leg", "right_leg")),
)


def expected_limbs(prompt: str) -> set[str]:
    """The limbs the prompt's wording implies are visible (``LIMB_CUES``)."""
    return {limb for pat, limbs in LIMB_CUES if pat.search(prompt or "") for limb in limbs}


def limb_found(pose: Pose, joints: tuple[int, ...], width: int, height: int, min_visibility: float) -> bool:
    """All of the limb's joints are visible enough and inside the image."""
    xy = pose.landmarks[list(joints), :2]
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)
    return bool(inside.all() and (pose.visibility[list(joints)] >= min_visibility).all())


def asymmetry(pose: Pose, min_visibility: float) -> float | None:
    """The largest longer/shorter ratio over left/right bone pairs whose joints are all visible (3D world
    landmarks, pixel landmarks when absent); None when no pair is fully visible."""
    pts = pose.world if pose.world is not None else pose.landmarks
    worst = None
    for _, (a, b), (c, d) in BONE_PAIRS:
        if (pose.visibility[[a, b, c, d]] < min_visibility).any():
            continue
        left, right = np.linalg.norm(pts[a] - pts[b]), np.linalg.norm(pts[c] - pts[d])
        ratio = max(left, right) / max(min(left, right), 1e-9)
        worst = ratio if worst is None else max(worst, ratio)
    return None if worst is None else float(worst)


class PoseJudge(Judge):
    name = "pose"
    categories = ("human_limbs",)
    validated = False
    description = (
        "MediaPipe Pose (full landmark model, real weights), judged only where the full-range face "
        "detector finds a person whose face the pose's head lies in. Flags an image when a PROXY fires: "
        "(a) a limb the prompt implies is visible ('full body', 'arms', 'legs') has a joint with "
        "visibility < min_visibility or outside the image; (b) a left/right bone pair (upper arm, forearm, "
        "thigh, shin) with all joints visible differs in 3D length by more than max_asymmetry (longer / "
        "shorter). P(fail) 1 or 0; unknown without a person or when neither could be measured. Not "
        "validated against human labels.")

    class Options(Judge.Options):
        min_visibility: float = Field(0.5, ge=0, le=1)
        max_asymmetry: float = Field(1.5, gt=1)
        min_face_score: float = Field(0.5, ge=0, le=1)

    def __init__(self, bundle=None, labels=None, options=None, device="cpu"):
        super().__init__(bundle, labels, options, device)
        self.last_observations: list[Observation | None] = []
        self._columns: dict[str, list] = {}

    def verdict(self, obs: Observation | None, prompt: str) -> tuple[float | None, dict]:
        """P(fail) of one image and its observation columns."""
        o = self.options
        if obs is None:
            return None, {}
        person = obs.person and obs.pose is not None and obs.pose_on_face
        cols = {"person": int(person), "faces": len(obs.faces),
                "mean_visibility": None if obs.pose is None else float(obs.pose.visibility.mean())}
        if not person:
            return None, cols
        want = expected_limbs(prompt)
        missing = sorted(limb for limb in want
                         if not limb_found(obs.pose, LIMBS[limb], obs.width, obs.height, o.min_visibility))
        asym = asymmetry(obs.pose, o.min_visibility)
        cols.update(limbs_expected=len(want), limbs_missing=len(missing), asymmetry=asym,
                    asymmetric=None if asym is None else int(asym > o.max_asymmetry))
        if not want and asym is None:
            return None, cols
        return (1.0 if missing or (asym is not None and asym > o.max_asymmetry) else 0.0), cols

    def p_fail(self, category, rows, emb):
        self.last_observations = observe_rows(self.image_dir, rows, hands=False,
                                              min_face_score=self.options.min_face_score)
        p, cols = [], []
        for obs, row in zip(self.last_observations, rows, strict=True):
            v, c = self.verdict(obs, row.get("prompt", ""))
            p.append(v)
            cols.append(c)
        names = ("person", "faces", "mean_visibility", "limbs_expected", "limbs_missing", "asymmetry",
                 "asymmetric")
        self._columns = {f"pose_{n}": [c.get(n) for c in cols] for n in names}
        return p, None

    def observations(self) -> dict[str, list]:
        return self._columns

    def provenance(self) -> dict[str, str]:
        return mediapipe_provenance("pose", "face_detection")
