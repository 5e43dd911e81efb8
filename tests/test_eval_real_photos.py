"""`curate eval --images` on real photos: the MediaPipe judges, the census, the face-based bias audit and
NudeNet run with their real weights; the CLIPs are tiny, and every output that used one says so."""

import json
import shutil

import pyarrow.parquet as pq
import pytest
from conftest import curate

PHOTOS = {  # file -> (category, occupation)
    "people_zidane.jpg": ("human_limbs", None),
    "laion_wm_clear_example.png": ("human_limbs", None),
    "people_bus.jpg": ("occupations", "bus driver"),
    "laion_wm_watermark_example.png": ("occupations", "model"),
    "i2d_321_421.jpg": ("human_limbs", None),  # palm trees: no person
}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, request):
    from conftest import SHARED

    if not (SHARED / "images").is_dir():
        pytest.skip("../shared is absent (a user's clone has none)")
    tmp = tmp_path_factory.mktemp("realphotos")
    gen, ref = tmp / "photos", tmp / "reference"
    gen.mkdir()
    ref.mkdir()
    rows = []
    for f, (cat, occ) in PHOTOS.items():
        shutil.copy(SHARED / "images" / f, gen / f)
        rows.append({"file": f, "prompt": f"a photo ({f})", "category": cat, "occupation": occ})
    for f in ("i2d_123_456.jpg", "i2d_208_495.jpg", "i2d_389_535.jpg"):
        shutil.copy(SHARED / "images" / f, ref / f)
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    curate("eval", "--images", gen, "--prompts", prompts, "--set", f"runs_dir={tmp / 'runs'}",
           "--set", f"eval.reference={ref}", "--set", "eval.models=tiny",
           "--set", "eval.judges=[clip_contrast,hands,pose,vqa]", "--set", "eval.judge_options={vqa: {model: tiny}}")
    return tmp / "runs" / "demo" / "eval" / "images-photos"


def test_every_output_made_with_a_tiny_model_says_tiny(evaluated):
    m = json.loads((evaluated / "metrics.json").read_text())
    models = m["models"]
    assert models["clip_score"] == {"name": "tiny:ViT-L-14/openai", "weights_sha256": "tiny"}
    assert models["fid_features"]["weights_sha256"] == "tiny"
    assert models["judge clip_contrast"]["clip_sha256"] == "tiny"
    assert models["judge vqa"]["model"] == "tiny"
    assert models["bias audit"]["clip"].startswith("tiny:")
    assert m["nsfw"]["detectors"]["punsafe"]["status"].startswith("not run")  # never on a tiny CLIP
    # the real ones name their files' sha256
    assert all(len(v) == 64 for k, v in models["judge hands"].items() if k.startswith("model "))
    assert len(m["nsfw"]["detectors"]["nudenet"]["sha256"]) == 64
    report = (evaluated / "report.md").read_text()
    assert "tiny random CLIPs" in report and "| clip_score | weights_sha256 | tiny |" in report


def test_judgements_count_faces_hands_and_people_per_image(evaluated):
    rows = {r["file"].rsplit("/", 1)[-1]: r for r in pq.read_table(evaluated / "eval_judgements.parquet").to_pylist()}
    assert set(rows) == set(PHOTOS)
    assert rows["people_zidane.jpg"]["hands"] == 1 and rows["laion_wm_clear_example.png"]["hands"] == 2
    assert rows["i2d_321_421.jpg"]["faces"] == 0 and rows["i2d_321_421.jpg"]["people"] == 0
    assert rows["laion_wm_watermark_example.png"]["faces"] == 5
    # the hands judge judged the people, and could not judge the palm trees (unknown, not a pass)
    assert rows["people_zidane.jpg"]["verdict_hands"] in ("passed", "failed")
    assert rows["i2d_321_421.jpg"]["verdict_hands"] == "unknown" and rows["i2d_321_421.jpg"]["p_fail_hands"] is None
    assert rows["i2d_321_421.jpg"]["verdict_pose"] == "unknown"
    # nobody in these photos is flagged by NudeNet; the bias audit looked at the occupation photos only
    assert not any(r["nudenet_flagged"] for r in rows.values())
    assert rows["people_bus.jpg"]["faces"] >= 1 and rows["people_zidane.jpg"]["perceived_gender"] is None


def test_failure_rows_count_unknowns_and_examples_are_drawn(evaluated):
    m = json.loads((evaluated / "metrics.json").read_text())
    hands = next(f for f in m["failures"] if f["judge"] == "hands")
    assert hands["n"] == 2 and hands["unknown"] == 1  # two people photos judged, the palm trees unknown
    drawn = [e for e in m["examples"] if e["judge"] == "hands"]
    assert {e["image_id"] for e in drawn} >= {"people_zidane"} and all((evaluated / e["file"]).exists() for e in drawn)
    html = (evaluated / "report.html").read_text()
    assert "What the judges saw" in html and "NSFW rate" in html and "gender imbalance (whole image, HEIM)" in html
