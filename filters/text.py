"""Text in images (``text_area``, ``text_boxes``, ``text``): the PP-OCRv4 detector of RapidOCR.

T-MARS (Maini et al. 2023) observed that a large share of LAION images are mostly
text (captions rendered into the image, stock-photo watermarks, posters) and that
dropping them helps CLIP-style training. This scorer measures how much of the image
text covers: the detector's boxes are filled into a mask and ``text_area`` is the
masked fraction of the image (the union of the boxes, 0..1), size-invariant.

The model is real even with ``models.preset: tiny``: ``rapidocr-onnxruntime==1.4.4``
ships ``ch_PP-OCRv4_det_infer.onnx`` (and the recogniser) inside its wheel, so it runs
offline on CPU (onnxruntime). The image is resized (up or down) so its longer side
is ``models.text_side`` px: the detector's cost grows with the area, small text in
small images is found more often when they are upscaled a little, and the area
fraction does not depend on the size.

``text`` (the recognised text, boxes top to bottom joined by spaces) is always a
column, NULL unless ``models.text_recognition: true`` (the recogniser roughly doubles
the cost per image with text).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from t2i_curate.filters.base import Batch, Scorer
from t2i_curate.pipeline.core.config import ModelsConfig
from t2i_curate.pipeline.core.errors import UserError

DET_FILE = "ch_PP-OCRv4_det_infer.onnx"
REC_FILE = "ch_PP-OCRv4_rec_infer.onnx"
INPUT = "text:rgb"
TEXT_SCORE = 0.5  # RapidOCR's default: recognised strings below this confidence are left out
DET_PARAMS = {  # RapidOCR 1.4.4's defaults (config.yaml, Det), except the resize (ours)
    "thresh": 0.3, "box_thresh": 0.5, "max_candidates": 1000, "unclip_ratio": 1.6,
    "use_dilation": True, "score_mode": "fast",
}


def _package():
    try:
        import rapidocr_onnxruntime
    except ImportError as e:  # `make setup` installs it
        raise UserError("the text scorer needs rapidocr-onnxruntime==1.4.4: pip install --no-deps "
                        "'rapidocr-onnxruntime==1.4.4' (its other dependencies come with t2i-curate; --no-deps "
                        "keeps its opencv-python from shadowing opencv-python-headless)") from e
    return rapidocr_onnxruntime


def model_path(filename: str) -> Path:
    """A model file inside the installed rapidocr-onnxruntime wheel."""
    return Path(_package().__file__).parent / "models" / filename


def file_sha256(path: Path) -> str:
    """The model file's sha256, hashed once per process while it is unchanged (pipeline/weights.py)."""
    from t2i_curate.pipeline.core.weights import weight_digest

    return weight_digest(path)


def _threads() -> dict[str, int]:
    """onnxruntime threads: the scoring process's share of the cores (as torch's)."""
    import torch

    return {"intra_op_num_threads": max(1, torch.get_num_threads()), "inter_op_num_threads": 1}


def load_detector():
    from rapidocr_onnxruntime.ch_ppocr_det import TextDetector

    # "max" with a huge limit: RapidOCR only rounds the sides to multiples of 32; our transform sized it
    return TextDetector({"model_path": str(model_path(DET_FILE)), "limit_side_len": 100_000,
                         "limit_type": "max", **DET_PARAMS, **_threads()})


def load_recognizer():
    from rapidocr_onnxruntime.ch_ppocr_rec import TextRecognizer

    return TextRecognizer({"model_path": str(model_path(REC_FILE)), "rec_img_shape": [3, 48, 320],
                           "rec_batch_num": 6, **_threads()})


def resize_rgb(img, side: int):
    """PIL image -> RGB uint8 array whose longer side is ``side`` px (up or down)."""
    import numpy as np
    from PIL import Image

    s = side / max(img.width, img.height)
    size = (max(1, round(img.width * s)), max(1, round(img.height * s)))
    if size != img.size:
        img = img.resize(size, Image.BILINEAR)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def detect(detector, rgb) -> list:
    """Text boxes (4x2 float arrays, pixel coordinates of ``rgb``) found in an RGB array."""
    import numpy as np

    bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # PaddleOCR's models take OpenCV's BGR
    boxes, _ = detector(bgr)
    return [] if boxes is None else list(boxes)


def box_area_fraction(boxes: list, shape: tuple[int, ...]) -> float:
    """Fraction of the ``shape[:2]`` image covered by the union of the boxes."""
    import cv2
    import numpy as np

    if not boxes:
        return 0.0
    mask = np.zeros(shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(b).astype(np.int32) for b in boxes], 1)
    return float(mask.mean())


def _crop(bgr, box):
    """The box's quadrilateral, straightened (PaddleOCR's crop; tall crops are rotated)."""
    import cv2
    import numpy as np

    pts = box.astype(np.float32)
    w = int(max(np.linalg.norm(pts[0] - pts[1]), np.linalg.norm(pts[2] - pts[3])))
    h = int(max(np.linalg.norm(pts[0] - pts[3]), np.linalg.norm(pts[1] - pts[2])))
    dst = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
    crop = cv2.warpPerspective(bgr, cv2.getPerspectiveTransform(pts, dst), (max(w, 1), max(h, 1)),
                               borderMode=cv2.BORDER_REPLICATE, flags=cv2.INTER_CUBIC)
    return np.rot90(crop) if crop.shape[0] >= 1.5 * crop.shape[1] else crop


def recognise(recognizer, rgb, boxes: list) -> str:
    """The recognised text of the boxes, top to bottom then left to right, joined by spaces."""
    import numpy as np

    if not boxes:
        return ""
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    boxes = sorted(boxes, key=lambda b: (round(float(b[0][1]) / 10), float(b[0][0])))
    results, _ = recognizer([_crop(bgr, b) for b in boxes])
    return " ".join(t for t, score in results if t and score >= TEXT_SCORE)


class TextScorer(Scorer):
    name = "text"
    columns = {"text_area": "DOUBLE", "text_boxes": "BIGINT", "text": "VARCHAR"}
    uses_models = True
    description = ("text in the image: area fraction and count of PP-OCRv4 text boxes; "
                   "recognised text with models.text_recognition")

    @classmethod
    def image_inputs(cls, mcfg: ModelsConfig) -> dict[str, int]:
        return {INPUT: mcfg.text_side}

    def __init__(self, bank):
        super().__init__(bank)
        self.mcfg = bank.mcfg
        self.detector = load_detector()
        self.recognizer = load_recognizer() if self.mcfg.text_recognition else None

    def transforms(self) -> dict[str, Callable]:
        return {INPUT: partial(resize_rgb, side=self.mcfg.text_side)}

    def score(self, batch: Batch) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"text_area": [], "text_boxes": [], "text": []}
        for rgb in batch.inputs[INPUT]:
            boxes = detect(self.detector, rgb)
            out["text_area"].append(box_area_fraction(boxes, rgb.shape))
            out["text_boxes"].append(len(boxes))
            out["text"].append(recognise(self.recognizer, rgb, boxes) if self.recognizer else None)
        return out

    def provenance(self) -> dict[str, str]:
        from importlib.metadata import version

        prov = {"model": f"PP-OCRv4 text detector (rapidocr-onnxruntime {version('rapidocr-onnxruntime')})",
                "weights": f"{DET_FILE} sha256 {file_sha256(model_path(DET_FILE))}",
                "input": f"longer side {self.mcfg.text_side} px", "tiny": "false"}
        if self.recognizer is not None:
            prov["recognizer"] = f"{REC_FILE} sha256 {file_sha256(model_path(REC_FILE))}"
        return prov
