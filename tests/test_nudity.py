"""The nudity scorer (NudeNet 3.4.2's 320n.onnx, real and offline) and eval's NSFW audit."""

import io
import shutil
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_scorers import _shard

from t2i_curate.eval.nsfw import PUNSAFE_THRESHOLD, nsfw_audit
from t2i_curate.filters import nudity
from t2i_curate.filters.base import Batch
from t2i_curate.filters.registry import column_providers
from t2i_curate.pipeline.core.config import ModelsConfig, ScoreConfig

PEOPLE = ("people_zidane.jpg", "people_bus.jpg", "laion_wm_clear_example.png", "laion_wm_watermark_example.png")


def _photos(shared):
    return sorted(p for p in (shared / "images").iterdir() if p.suffix in (".jpg", ".png"))


@pytest.fixture(scope="module")
def scorer():
    return nudity.NudityScorer()


def _score(scorer, *images):
    inputs = {k: [f(img) for img in images] for k, f in scorer.transforms().items()}
    return scorer.score(Batch(rows=[{"key": str(i)} for i in range(len(images))], inputs=inputs))


def test_class_list_and_labels_are_nudenets():
    from nudenet import nudenet as nn

    assert nudity.LABELS == tuple(vars(nn)["__labels"])
    assert set(nudity.CLASSES) <= set(nudity.LABELS)
    assert "MALE_BREAST_EXPOSED" not in nudity.CLASSES  # gender classes are unreliable: not a nudity flag
    assert not [c for c in nudity.CLASSES if c.endswith("_COVERED") or c.startswith("FACE_")]
    assert nudity.THRESHOLD > 0.45  # above a man's bare chest scored as FEMALE_BREAST_EXPOSED (MODELS.md)


def test_summarise_keeps_only_the_classes_above_the_threshold():
    d = [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.45}, {"class": "MALE_BREAST_EXPOSED", "score": 0.95},
         {"class": "FACE_FEMALE", "score": 0.9}]
    assert nudity.summarise(d) == (0.45, 0)
    d.append({"class": "BUTTOCKS_EXPOSED", "score": 0.7})
    assert nudity.summarise(d) == (0.7, 1)
    assert nudity.summarise([]) == (0.0, 0)


def test_preprocessing_and_detections_reproduce_nudenet(shared):
    from nudenet import NudeDetector
    from nudenet import nudenet as nn

    ref = NudeDetector()
    session = nudity.load_session(1)
    imgs = [Image.open(shared / "images" / f).convert("RGB") for f in PEOPLE]
    blobs = [nudity.preprocess(im) for im in imgs]
    batched = nudity.detect(session, blobs, batch_size=4)
    for im, blob, mine in zip(imgs, blobs, batched, strict=True):
        bgr = np.ascontiguousarray(np.asarray(im)[:, :, ::-1])  # what cv2.imread gives NudeNet
        assert np.array_equal(nn._read_image(bgr, 320)[0][0], blob[0])
        theirs = ref.detect(bgr)
        assert [d["class"] for d in mine] == [d["class"] for d in theirs]
        assert np.allclose([d["score"] for d in mine], [d["score"] for d in theirs], atol=1e-5)
    # the watermark example (a street) has detections, so the comparison is not vacuous
    assert len(batched[3]) >= 3 and {"FACE_FEMALE"} <= {d["class"] for d in batched[3]}


def test_real_photos_are_not_flagged(scorer, shared):
    out = _score(scorer, *[Image.open(p).convert("RGB") for p in _photos(shared)])
    assert len(out["pnudity"]) >= 11
    assert max(out["pnudity"]) < nudity.THRESHOLD and sum(out["nudity_boxes"]) == 0


def test_end_to_end_through_score_shard_with_provenance(tmp_path, shared):
    from t2i_curate.pipeline.core.scores import read_provenance
    from t2i_curate.pipeline.score.stage import score_shard

    def jpeg(path):
        buf = io.BytesIO()
        Image.open(path).convert("RGB").save(buf, format="JPEG", quality=92)
        return buf.getvalue()

    samples = [("0000000", jpeg(shared / "images" / "people_zidane.jpg"), "two men"),
               ("0000001", jpeg(shared / "images" / "i2d_321_421.jpg"), "palm trees"),
               ("0000002", b"not an image", "broken")]
    run = _shard(tmp_path, samples)
    scfg = ScoreConfig(scorers=["nudity"], batch_size=2, models=ModelsConfig(preset="tiny"))
    assert score_shard(str(run), scfg.model_dump_json(), 0) == {"skipped": 0, "scored": 2, "failed": 1}
    rows = {r["key"]: r for r in pq.read_table(run / "scores" / "00000.parquet").to_pylist()}
    assert rows["0000002"]["score_status"] == "failed" and rows["0000002"]["pnudity"] is None
    assert all(0.0 <= rows[k]["pnudity"] < nudity.THRESHOLD and rows[k]["nudity_boxes"] == 0
               for k in ("0000000", "0000001"))
    assert rows["0000000"]["tiny_models"] is False  # a real model, even with the tiny preset
    prov = read_provenance(run)["nudity"]
    assert prov["classes"] == ",".join(nudity.CLASSES) and prov["threshold"] == str(nudity.THRESHOLD)
    assert nudity.file_sha256(nudity.model_path()) in prov["weights"] and "nudenet 3.4.2" in prov["model"]
    assert column_providers()["pnudity"] == "nudity"


@dataclass
class _Bundle:  # what the audit reads of the eval CLIP
    name: str
    tiny: bool


def _audit_inputs(tmp_path, shared, dim):
    files = ["people_zidane.jpg", "i2d_321_421.jpg", "laion_wm_clear_example.png"]
    paths = [shutil.copy(shared / "images" / f, tmp_path / f) for f in files]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    paths.append(tmp_path / "broken.png")
    rows = [{"category": c, "prompt": "x"} for c in ("people", "general", "people", "general")]
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(4, dim), dim=-1)
    return rows, paths, emb


def test_audit_with_tiny_clip_runs_nudenet_and_reports_punsafe_not_run(tmp_path, shared):
    rows, paths, emb = _audit_inputs(tmp_path, shared, 32)
    per, summary = nsfw_audit(rows, paths, emb, _Bundle("tiny:ViT-L-14/openai", True), ModelsConfig(preset="tiny"))
    assert per["nudenet_flagged"] == [False, False, False, None] and per["punsafe"] == [None] * 4
    assert per["nsfw_flagged"] == [False, False, False, None] and summary["unreadable"] == 1
    nd, ps = summary["detectors"]["nudenet"], summary["detectors"]["punsafe"]
    assert nd["status"] == "ran" and nd["classes"] == list(nudity.CLASSES) and len(nd["sha256"]) == 64
    assert ps["status"].startswith("not run: the eval CLIP is tiny") and ps["sha256"] is None
    by = {(r["category"], r["detector"]): r for r in summary["rates"]}
    assert {d for _, d in by} == {"nudenet", "any"}  # punsafe did not run: no rate under its name
    assert by[("all", "nudenet")]["n"] == 3 and by[("people", "nudenet")]["n"] == 2
    assert by[("general", "nudenet")]["n"] == 1 and by[("all", "any")]["flagged"] == 0
    assert by[("all", "nudenet")]["share"] == 0.0 and 0.4 < by[("all", "nudenet")]["ci_high"] < 0.6  # Wilson 0/3


def test_audit_runs_punsafe_with_the_real_b32_detector(tmp_path, shared):
    from t2i_curate.filters.nsfw import NSFW_B32, NSFW_B32_TABLES, load_nsfw_head

    rows, paths, emb = _audit_inputs(tmp_path, shared, 512)
    models = shared / "models"
    mcfg = ModelsConfig(preset="real", local_weights={w.name: str(models / w.filename)
                                                      for w in (NSFW_B32, NSFW_B32_TABLES)})
    per, summary = nsfw_audit(rows, paths, emb, _Bundle("ViT-B-32/openai", False), mcfg)
    head = load_nsfw_head(512, mcfg.model_copy(update={"nsfw_clip": "ViT-B-32/openai"}))
    with torch.inference_mode():
        want = head(emb).tolist()
    assert np.allclose(per["punsafe"], want, atol=1e-12)
    assert per["punsafe_flagged"] == [p >= PUNSAFE_THRESHOLD for p in want]
    ps = summary["detectors"]["punsafe"]
    assert ps["status"] == "ran" and NSFW_B32.sha256 in ps["sha256"] and ps["threshold"] == PUNSAFE_THRESHOLD
    assert {r["detector"] for r in summary["rates"]} == {"nudenet", "punsafe", "any"}
    # a real CLIP name without its weights on this machine: not run, with the reason
    _, s2 = nsfw_audit(rows, paths, emb, _Bundle("ViT-B-32/openai", False),
                       ModelsConfig(preset="real", cache_dir=str(tmp_path / "none")))
    assert s2["detectors"]["punsafe"]["status"].startswith("not run: weights missing")
    _, s3 = nsfw_audit(rows, paths, emb, _Bundle("ViT-B-32/laion2b_s34b_b79k", False), mcfg)
    assert "not one the detector was trained on" in s3["detectors"]["punsafe"]["status"]
