"""Exposed nudity (``pnudity``, ``nudity_boxes``): NudeNet 3.4.2's detector (YOLOv8n, ``320n.onnx``).

The model is real even with ``models.preset: tiny``: ``nudenet==3.4.2`` ships ``320n.onnx`` inside
its wheel, so it runs offline on CPU (onnxruntime). We run the session ourselves on the image the
scoring pass already decoded (no second decode, and batched), with NudeNet's own pre- and
post-processing reproduced step for step (``nudenet/nudenet.py``: ``_read_image``, ``_postprocess``;
``tests/test_nudity.py`` checks both against NudeNet's functions):

- the image, in OpenCV's BGR order, is padded with black at the right and bottom to a square, resized
  to 320x320 (``cv2.INTER_LINEAR``) and scaled by 1/255. NudeNet's ``cvtColor(RGBA2BGR)`` followed by
  ``blobFromImage(swapRB=True)`` are two channel swaps, so the network sees BGR planes, as it does when
  NudeNet reads a file;
- each of the 2100 anchors takes its best class (of 18) when that score is >= 0.2; boxes go back to
  image pixels, are clipped to the image, and OpenCV's NMS (score 0.25, IoU 0.45) keeps the detections.

``pnudity`` is the highest detection score among :data:`CLASSES` (0.0 when none), ``nudity_boxes`` the
number of such detections scoring >= :data:`THRESHOLD`. The classes are the exposed sexual ones.
Left out on purpose: ``MALE_BREAST_EXPOSED``, ``BELLY_EXPOSED``, ``ARMPITS_EXPOSED``, ``FEET_EXPOSED``
(ordinary beach, sport and street photos), every ``*_COVERED`` class and the faces. The threshold is
above NudeNet's gender confusion: a man's bare chest can score about 0.45 as
``FEMALE_BREAST_EXPOSED`` (MODELS.md), so 0.6 leaves a margin; on the real photos of
``../shared/images`` (people, street, sport, landscapes) nothing is flagged.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from t2i_curate.filters.base import Batch, Scorer
from t2i_curate.pipeline.core.config import ModelsConfig
from t2i_curate.pipeline.core.errors import UserError

MODEL_FILE = "320n.onnx"
SIDE = 320  # the network's input size (NudeDetector's inference_resolution)
INPUT = "nudity:blob"
LABELS = (  # nudenet 3.4.2's class order (nudenet.nudenet.__labels)
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
    "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
)
CLASSES = ("FEMALE_BREAST_EXPOSED", "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED",
           "BUTTOCKS_EXPOSED", "ANUS_EXPOSED")
THRESHOLD = 0.6
MIN_SCORE, NMS_SCORE, NMS_IOU = 0.2, 0.25, 0.45  # NudeNet's _postprocess constants
BATCH = 1  # images per onnxruntime call: on CPU, batches of 4 and 16 ran 10% and 25% slower than 1


def _package():
    try:
        import nudenet
    except ImportError as e:  # `make setup` installs it
        raise UserError("the nudity scorer needs nudenet==3.4.2 (its 320n.onnx ships in the wheel): "
                        "pip install 'nudenet==3.4.2'") from e
    return nudenet


def model_path() -> Path:
    """``320n.onnx`` inside the installed nudenet wheel."""
    return Path(_package().__file__).parent / MODEL_FILE


def file_sha256(path: Path) -> str:
    """The model file's sha256, hashed once per process while it is unchanged (pipeline/weights.py)."""
    from t2i_curate.pipeline.core.weights import weight_digest

    return weight_digest(path)


def nudenet_version() -> str:
    from importlib.metadata import version

    return version("nudenet")


def load_session(threads: int | None = None):
    """An onnxruntime CPU session of ``320n.onnx``; ``threads`` intra-op threads (default: the scoring
    process's share of the cores, as torch's), one inter-op thread."""
    import onnxruntime as ort

    if threads is None:
        import torch

        threads = torch.get_num_threads()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(model_path()), sess_options=opts, providers=["CPUExecutionProvider"])


def letterbox(img) -> tuple[Any, int, int]:
    """PIL image (or RGB uint8 array) -> (uint8 320x320x3 BGR, width, height): NudeNet's square padding
    and resize, before it scales to float. On the Ray actor path this is what decode tasks ship (300 KB
    an image instead of the blob's 1.2 MB); :func:`finish_batch` makes the blobs on the model actor."""
    import cv2
    import numpy as np

    rgb = np.asarray(img.convert("RGB") if hasattr(img, "convert") else img, dtype=np.uint8)
    h, w = rgb.shape[:2]
    side = max(h, w)
    square = np.zeros((side, side, 3), np.uint8)
    square[:h, :w] = rgb[:, :, ::-1]  # BGR, black padding right and bottom
    return cv2.resize(square, (SIDE, SIDE), interpolation=cv2.INTER_LINEAR), w, h


def to_blob(small) -> Any:
    """uint8 320x320x3 -> NudeNet's float32 3x320x320 input, scaled by 1/255."""
    import numpy as np

    return np.ascontiguousarray(small.transpose(2, 0, 1).astype(np.float32) * np.float32(1 / 255.0))


def preprocess(img) -> tuple[Any, int, int]:
    """PIL image (or RGB uint8 array) -> (float32 3x320x320 BGR blob, width, height), as NudeNet's
    ``_read_image`` makes it from a file."""
    small, w, h = letterbox(img)
    return to_blob(small), w, h


def finish_batch(items: list) -> list[tuple[Any, int, int]]:
    """A batch of :func:`letterbox` outputs -> :func:`preprocess`'s, element for element."""
    return [(to_blob(small), w, h) for small, w, h in items]


# (decode side, model side) for pipeline/score/ray_actors.split_for_transport
preprocess.transport = (letterbox, finish_batch)


def postprocess(output, width: int, height: int) -> list[dict[str, Any]]:
    """One image's raw output (22 x anchors) -> NudeNet's detections ``{class, score, box}``."""
    import cv2
    import numpy as np

    rows = np.asarray(output).T  # anchors x (cx, cy, w, h, 18 scores)
    scores = rows[:, 4:].max(axis=1)
    keep = scores >= MIN_SCORE
    rows, scores = rows[keep], scores[keep]
    if not len(rows):
        return []
    class_ids = rows[:, 4:].argmax(axis=1)
    side = max(width, height)  # the padded square, as (original + pad) / model size
    x = (rows[:, 0] - rows[:, 2] / 2) * side / SIDE
    y = (rows[:, 1] - rows[:, 3] / 2) * side / SIDE
    bw, bh = rows[:, 2] * side / SIDE, rows[:, 3] * side / SIDE
    x, y = np.clip(x, 0, width), np.clip(y, 0, height)
    bw, bh = np.minimum(bw, width - x), np.minimum(bh, height - y)
    boxes = np.stack([x, y, bw, bh], axis=1).astype(np.float32)
    idx = cv2.dnn.NMSBoxes(boxes.tolist(), scores.astype(np.float32).tolist(), NMS_SCORE, NMS_IOU)
    return [{"class": LABELS[int(class_ids[i])], "score": float(scores[i]),
             "box": [int(v) for v in boxes[i]]} for i in np.asarray(idx).reshape(-1)]


def detect(session, blobs: list[tuple[Any, int, int]], batch_size: int = BATCH) -> list[list[dict]]:
    """NudeNet's detections for preprocessed images, ``batch_size`` per onnxruntime call."""
    import numpy as np

    name = session.get_inputs()[0].name
    out: list[list[dict]] = []
    for i in range(0, len(blobs), batch_size):
        chunk = blobs[i : i + batch_size]
        raw = session.run(None, {name: np.stack([b for b, _, _ in chunk])})[0]
        out += [postprocess(raw[j], w, h) for j, (_, w, h) in enumerate(chunk)]
    return out


def summarise(detections: list[dict], classes=CLASSES, threshold: float = THRESHOLD) -> tuple[float, int]:
    """(highest score among ``classes``, 0.0 when none; how many of them score >= ``threshold``)."""
    scores = [d["score"] for d in detections if d["class"] in classes]
    return max(scores, default=0.0), sum(s >= threshold for s in scores)


def provenance_record() -> dict[str, str]:
    """What made ``pnudity``: model, file sha256, classes, threshold (also eval's NSFW audit)."""
    return {"model": f"NudeNet NudeDetector (nudenet {nudenet_version()}, YOLOv8n, {SIDE} px input)",
            "weights": f"{MODEL_FILE} sha256 {file_sha256(model_path())}",
            "classes": ",".join(CLASSES), "threshold": str(THRESHOLD),
            "pnudity": "highest detection score among the classes (0 when none)",
            "nudity_boxes": f"detections of the classes scoring >= {THRESHOLD}", "tiny": "false"}


class NudityScorer(Scorer):
    name = "nudity"
    columns = {"pnudity": "DOUBLE", "nudity_boxes": "BIGINT"}
    uses_models = True
    description = (f"NudeNet 3.4.2 exposed-nudity detector: highest score among {', '.join(CLASSES)}; "
                   f"count of those detections >= {THRESHOLD}")

    @classmethod
    def image_inputs(cls, mcfg: ModelsConfig) -> dict[str, int]:
        return {INPUT: SIDE}

    def __init__(self, bank=None):
        super().__init__(bank)
        self.session = load_session()

    def transforms(self) -> dict[str, Callable]:
        return {INPUT: preprocess}

    def score(self, batch: Batch) -> dict[str, list[Any]]:
        found = [summarise(d) for d in detect(self.session, list(batch.inputs[INPUT]))]
        return {"pnudity": [p for p, _ in found], "nudity_boxes": [n for _, n in found]}

    def provenance(self) -> dict[str, str]:
        return provenance_record()
