"""Hands judge (``human_limbs``): MediaPipe Hands' real models, three PROXY failure signals.

Per image it finds hands (palm detector + full hand landmark model, from ``mediapipe_models``), and flags
the image when any of these proxies fires. None of them is validated against human labels here.

(a) PROXY, low hand confidence: the lowest handedness score of the hands found is below
    ``min_hand_score``. This is the landmark model's left/right classification confidence (never below
    0.5), the only per-hand score MediaPipe's legacy solution exposes: not a hand-presence score. HandRefiner (arXiv 2311.17957) and
    "Annotated Hands for Generative Models" (arXiv 2401.15075) use MediaPipe's hand confidence as a
    measure of how hand-like a generated hand is. The palm detector's own score is recorded too
    (``hands_min_palm_score``) but not used: real hands in our photos score as low as 0.41 there.
(b) PROXY, implausible joint-length ratios: the Mean Joint Ratio Difference (after 2401.15075's MJRD;
    its exact formula is not reproduced, this is our definition). On the model's 3D world landmarks, the
    20 bones (wrist-to-knuckle and the 3 finger segments of each finger, the thumb's 4 segments) are
    divided by the palm length (wrist to middle-finger knuckle): 19 ratios r. MJRD = mean_k |r_k - ref_k|
    / ref_k, with ``REFERENCE_RATIOS`` below; a hand with MJRD above ``max_mjrd`` is flagged.
(c) PROXY, missing hands: fewer hands found than the prompt's ``expected_hands`` (when the row has it).

P(fail) is 1.0 when a proxy fires, else 0.0; None (unknown, never a pass) when no hand is found and the
prompt has no ``expected_hands``, or the image cannot be read.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from t2i_curate.eval.judge import Judge
from t2i_curate.eval.vision import Observation, mediapipe_provenance, observe_rows
from t2i_curate.pipeline.core.errors import UserError

# MediaPipe hand landmark chains: wrist, then each finger's joints to its tip (thumb first)
FINGERS = ((0, 1, 2, 3, 4), (0, 5, 6, 7, 8), (0, 9, 10, 11, 12), (0, 13, 14, 15, 16), (0, 17, 18, 19, 20))
PALM_BONE = 8  # index of wrist -> middle-finger knuckle (0 -> 9) among the 20 bones, finger-major

# Reference joint ratios (the 19 bones other than 0->9, finger-major, divided by the 0->9 length) of real
# hands: the median over the 3 real hands MediaPipe finds in ../shared/images (1 in people_zidane.jpg, 2
# in laion_wm_clear_example.png; world landmarks, model_complexity=1, static images), measured 2026-11-26.
# Only 3 hands: a small sample. On those hands MJRD is 0.05-0.18 in-sample and 0.14-0.32 leave-one-out
# (also over flipped, 2x and rotated copies), hence the default max_mjrd 0.35. Not checked against
# anatomical tables: MediaPipe's tip landmark is the fingertip, not the end of the bone.
REFERENCE_RATIOS = np.array([
    0.399, 0.328, 0.323, 0.262,  # thumb: wrist-CMC, CMC-MCP, MCP-IP, IP-tip
    1.026, 0.272, 0.247, 0.275,  # index: wrist-MCP, MCP-PIP, PIP-DIP, DIP-tip
    0.272, 0.292, 0.253,  # middle: MCP-PIP, PIP-DIP, DIP-tip (wrist-MCP is the unit)
    0.972, 0.262, 0.297, 0.265,  # ring
    0.863, 0.229, 0.206, 0.138,  # little
])


def bone_lengths(points: np.ndarray) -> np.ndarray:
    """(21, 2 or 3) hand landmarks -> the 20 bone lengths, finger-major (thumb's 4, index's 4, ...)."""
    p = np.asarray(points, dtype=np.float64)
    return np.array([np.linalg.norm(p[f[k + 1]] - p[f[k]]) for f in FINGERS for k in range(4)])


def joint_ratios(points: np.ndarray) -> np.ndarray:
    """The 19 bone lengths other than the palm (0 -> 9), divided by the palm length."""
    b = bone_lengths(points)
    return np.delete(b / max(b[PALM_BONE], 1e-9), PALM_BONE)


def mjrd(points: np.ndarray, reference: np.ndarray = REFERENCE_RATIOS) -> float:
    """Mean Joint Ratio Difference of one hand's landmarks: mean relative difference of its joint ratios
    from ``reference``."""
    return float(np.mean(np.abs(joint_ratios(points) - reference) / reference))


def _expected_hands(row: dict) -> int | None:
    v = row.get("expected_hands")
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    if isinstance(v, bool) or int(v) != v or v < 0:
        raise UserError(f"prompt {row.get('id', '?')}: expected_hands must be a non-negative integer, got {v!r}")
    return int(v)


class HandsJudge(Judge):
    name = "hands"
    categories = ("human_limbs",)
    validated = False
    description = (
        "MediaPipe Hands (palm detector + full hand landmark model, real weights). Flags an image when a "
        "PROXY fires: (a) low hand confidence, the lowest handedness (left/right classification) score of the "
        "hands found < "
        "min_hand_score (after HandRefiner, arXiv 2311.17957, and Annotated Hands, arXiv 2401.15075); "
        "(b) implausible joint-length ratios, a hand's Mean Joint Ratio Difference (mean relative "
        "difference of its 19 bone/palm length ratios, on 3D world landmarks, from reference ratios "
        "measured on 3 real hands in our test photos) > max_mjrd; (c) fewer hands than the prompt's "
        "expected_hands. P(fail) 1 or 0; unknown when no hand is found and the prompt expects none. "
        "Not validated against human labels.")

    class Options(Judge.Options):
        min_hand_score: float = Field(0.8, ge=0, le=1)
        max_mjrd: float = Field(0.35, gt=0)
        max_num_hands: int = Field(4, ge=1)
        min_hand_detection: float = Field(0.3, ge=0, le=1)

    def __init__(self, bundle=None, labels=None, options=None, device="cpu"):
        super().__init__(bundle, labels, options, device)
        self.last_observations: list[Observation | None] = []
        self._columns: dict[str, list] = {}

    def verdict(self, obs: Observation | None, expected: int | None) -> tuple[float | None, dict]:
        """P(fail) of one image and its observation columns."""
        o = self.options
        if obs is None:
            return None, {}
        scores = [h.score for h in obs.hands]
        palms = [h.palm_score for h in obs.hands if h.palm_score is not None]
        mj = [mjrd(h.world) for h in obs.hands if h.world is not None]
        cols = {"found": len(obs.hands), "expected": expected, "min_score": min(scores, default=None),
                "min_palm_score": min(palms, default=None), "mjrd": max(mj, default=None),
                "faces": len(obs.faces), "person": int(obs.person)}
        low = bool(scores) and min(scores) < o.min_hand_score
        odd = bool(mj) and max(mj) > o.max_mjrd
        missing = expected is not None and len(obs.hands) < expected
        cols.update(low_score=int(low), bad_ratios=int(odd), missing=int(missing))
        if not obs.hands and expected is None:
            return None, cols
        return (1.0 if low or odd or missing else 0.0), cols

    def p_fail(self, category, rows, emb):
        expected = [_expected_hands(r) for r in rows]
        o = self.options
        self.last_observations = observe_rows(self.image_dir, rows, pose=False, max_num_hands=o.max_num_hands,
                                              min_hand_detection=o.min_hand_detection)
        p, cols = [], []
        for obs, exp in zip(self.last_observations, expected, strict=True):
            v, c = self.verdict(obs, exp)
            p.append(v)
            cols.append(c)
        names = ("found", "expected", "min_score", "min_palm_score", "mjrd", "faces", "person", "low_score",
                 "bad_ratios", "missing")
        self._columns = {f"hands_{n}": [c.get(n) for c in cols] for n in names}
        return p, None

    def observations(self) -> dict[str, list]:
        return self._columns

    def provenance(self) -> dict[str, str]:
        return mediapipe_provenance("hands", "face_detection")

