"""The text scorer: PP-OCRv4 detector shipped in the rapidocr-onnxruntime wheel (real, offline)."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageFont
from test_scorers import _shard

from t2i_curate.filters.base import Batch
from t2i_curate.filters.modelbank import ModelBank
from t2i_curate.filters.registry import column_providers
from t2i_curate.filters.text import DET_FILE, TextScorer, file_sha256, model_path
from t2i_curate.pipeline.core.config import ModelsConfig, ScoreConfig


def _scorer(**models) -> TextScorer:
    return TextScorer(ModelBank(ScoreConfig(scorers=["text"], models=ModelsConfig(preset="tiny", **models))))


def _score(scorer: TextScorer, *images: Image.Image) -> dict:
    t = scorer.transforms()
    inputs = {k: [f(img) for img in images] for k, f in t.items()}
    return scorer.score(Batch(rows=[{"key": str(i)} for i in range(len(images))], inputs=inputs))


def _text_image(w=640, h=480, lines=("SUMMER SALE", "50% OFF", "BUY NOW")) -> Image.Image:
    img = Image.new("RGB", (w, h), (250, 250, 245))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=h // (len(lines) + 1))
    for i, line in enumerate(lines):
        draw.text((20, 10 + i * h // len(lines)), line, fill=(10, 10, 10), font=font)
    return img


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def scorer():
    return _scorer()


def test_large_rendered_text_covers_much_of_the_image_and_flat_colour_none(scorer):
    out = _score(scorer, _text_image(), Image.new("RGB", (500, 300), (90, 140, 200)))
    assert out["text_area"][0] > 0.3 and out["text_boxes"][0] >= 3
    assert out["text_area"][1] == 0.0 and out["text_boxes"][1] == 0
    assert out["text"] == [None, None]  # recognition is off by default


def test_text_area_is_size_invariant_and_bounded(scorer):
    small, big = _text_image(320, 240), _text_image(1280, 960)
    a = _score(scorer, small, big)["text_area"]
    assert 0.0 < a[0] <= 1.0 and abs(a[0] - a[1]) < 0.05


def test_watermark_example_has_text_and_palm_trees_none(scorer, shared):
    wm = Image.open(shared / "images" / "laion_wm_watermark_example.png").convert("RGB")
    palms = Image.open(shared / "images" / "i2d_321_421.jpg").convert("RGB")
    out = _score(scorer, wm, palms)
    assert out["text_area"][0] > 0.005 and out["text_boxes"][0] >= 1  # "gettyimages" across the middle
    assert out["text_area"][1] < 0.01


def test_recognition_is_opt_in():
    out = _score(_scorer(text_recognition=True, text_side=640), _text_image())
    text = out["text"][0].upper()  # the first line runs off the image: "SUMMER S..."
    assert "SUMMER" in text and "50% OFF" in text


def test_end_to_end_through_score_shard_with_provenance(tmp_path):
    from t2i_curate.pipeline.core.scores import read_provenance
    from t2i_curate.pipeline.score.stage import score_shard

    samples = [("0000000", _jpeg_bytes(_text_image()), "a poster"),
               ("0000001", _jpeg_bytes(Image.new("RGB", (400, 300), (30, 160, 60))), "a green field"),
               ("0000002", b"not an image", "broken")]
    run = _shard(tmp_path, samples)
    scfg = ScoreConfig(scorers=["resolution", "text"], batch_size=2, models=ModelsConfig(preset="tiny"))
    assert score_shard(str(run), scfg.model_dump_json(), 0) == {"skipped": 0, "scored": 2, "failed": 1}
    t = {r["key"]: r for r in pq.read_table(run / "scores" / "00000.parquet").to_pylist()}
    assert t["0000000"]["text_area"] > 0.3 and t["0000000"]["text_boxes"] >= 3
    assert t["0000001"]["text_area"] == 0.0 and t["0000001"]["text_boxes"] == 0
    assert t["0000002"]["score_status"] == "failed" and t["0000002"]["text_area"] is None
    # the detector is real even with preset tiny: no row claims tiny models, provenance says which file
    assert t["0000000"]["tiny_models"] is False
    prov = read_provenance(run)["text"]
    assert prov["tiny"] == "false" and DET_FILE in prov["weights"]
    assert file_sha256(model_path(DET_FILE)) in prov["weights"] and "rapidocr-onnxruntime 1.4.4" in prov["model"]


def test_real_detector_among_tiny_models_keeps_the_tiny_flag(tmp_path):
    from t2i_curate.pipeline.core.scores import read_provenance
    from t2i_curate.pipeline.score.stage import score_shard

    run = _shard(tmp_path, [("0000000", _jpeg_bytes(_text_image()), "a poster with big words")])
    scfg = ScoreConfig(scorers=["watermark", "text"], models=ModelsConfig(preset="tiny"), save_embeddings=False)
    score_shard(str(run), scfg.model_dump_json(), 0)
    assert pq.read_table(run / "scores" / "00000.parquet").to_pylist()[0]["tiny_models"] is True
    prov = read_provenance(run)
    assert prov["watermark"]["tiny"] == "true" and prov["text"]["tiny"] == "false"


def test_columns_bind_in_rules():
    providers = column_providers()
    assert providers["text_area"] == "text" and providers["text_boxes"] == "text" and providers["text"] == "text"
    from t2i_curate.pipeline.core.config import load_config

    rules = [r.name for r in load_config("demo").select.rules]
    assert rules[-1] == "max_text_area" and rules.index("max_text_area") > rules.index("min_shorter_side_256")
    assert "text" in load_config("demo").score.scorers


def test_resize_rgb_gives_rgb_uint8_with_the_configured_longer_side():
    from t2i_curate.filters.text import resize_rgb

    a = resize_rgb(Image.new("L", (1000, 250), 128), 320)
    assert a.dtype == np.uint8 and a.shape == (80, 320, 3)
