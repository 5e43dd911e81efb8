"""The VQA judge on a tiny, randomly initialised Llava built from configs (diffusers' test-pipeline recipe),
saved with save_pretrained and loaded back through AutoProcessor / AutoModelForImageTextToText, offline."""

import hashlib
import json
import re
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from t2i_curate.eval.judge import configured_judges, judge_options
from t2i_curate.eval.judge_vqa import (
    CONFIG_KEY,
    TINY_MARKER,
    VQA_QUESTIONS,
    VQAJudge,
    _prompt,
    parse_yes_no,
    save_tiny_vqa_model,
)
from t2i_curate.pipeline.core.config import load_config
from t2i_curate.pipeline.core.errors import UserError

VERDICT = {True: 1.0, False: 0.0, None: None}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_vqa_model(tmp_path_factory.mktemp("tiny_vqa"))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Three small images of different sizes and content, and one file that is not an image."""
    d = tmp_path_factory.mktemp("vqa_images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(d / "noise.png")
    Image.fromarray(np.tile(np.array([200, 30, 30], np.uint8), (40, 30, 1))).save(d / "red.png")
    Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8)[:, None, None], (1, 80, 3))).save(d / "ramp.jpg")
    (d / "broken.png").write_bytes(b"not an image")
    return d


ROWS = [{"file": "noise.png"}, {"file": "red.png"}, {"file": "ramp.jpg"}]


def _judge(model, **opts) -> VQAJudge:
    return VQAJudge(options=VQAJudge.Options(model=str(model), **opts))


@pytest.mark.parametrize("answer, verdict", [
    ("Yes.", True), ("yes", True), ("  YES! six fingers", True), ("**Yes**", True),
    ("no, it's fine", False), ("No", False), ('"no"', False),
    ("Maybe", None), ("", None), (None, None), ("yesterday", None), ("nope", None), ("yes/no", None),
    ("yes-ish", None), ("Answer: yes", None), ("I think yes", None),
])
def test_answers_are_parsed_strictly(answer, verdict):
    assert parse_yes_no(answer) is verdict


def test_yes_is_failed_no_is_passed_anything_else_unknown(tiny_folder, image_dir, monkeypatch):
    judge = _judge(tiny_folder, questions={"horses": "Is a leg of the horse malformed?"})
    judge.image_dir = image_dir
    asked = []
    monkeypatch.setattr(judge, "answers", lambda paths, q: asked.append((paths, q)) or
                        ["Yes.", "no, it's fine", "Maybe", None])
    rows = [*ROWS, {"file": "broken.png"}]
    assert judge.p_fail("horses", rows, None) == ([1.0, 0.0, None, None], None)
    assert judge.observations() == {"vqa_answer": ["Yes.", "no, it's fine", "Maybe", None]}
    assert asked[0][1] == "Is a leg of the horse malformed?"
    assert [p.name for p in asked[0][0]] == ["noise.png", "red.png", "ramp.jpg", "broken.png"]
    judge.p_fail("human_limbs", ROWS[:1] * 4, None)
    assert asked[1][1] == VQA_QUESTIONS["human_limbs"]


def test_runs_end_to_end_on_the_tiny_model(tiny_folder, image_dir):
    judge = _judge(tiny_folder, batch_size=2, max_new_tokens=6)
    judge.image_dir = image_dir
    p, oof = judge.p_fail("quadrupeds", [*ROWS, {"file": "broken.png"}], None)
    answers = judge.observations()["vqa_answer"]
    assert oof is None and len(p) == len(answers) == 4
    assert all(isinstance(a, str) and a for a in answers[:3]) and answers[3] is None
    assert p == [VERDICT[parse_yes_no(a)] for a in answers]  # raw answers kept; verdicts follow them
    processor, model = judge._loaded
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert processor.tokenizer.padding_side == "left"
    assert re.fullmatch(r"USER: <image>\n.*legs\? Answer yes or no\. ASSISTANT:", _prompt(
        processor, VQA_QUESTIONS["quadrupeds"]), re.S)  # the chat template saved with the processor
    prov = judge.provenance()
    assert prov["model"] == "tiny" and prov["models"] == {"random weights": "tiny"}
    assert prov["library"].startswith("transformers ") and prov["architecture"] == "LlavaForConditionalGeneration"


def test_batching_gives_the_same_answers(tiny_folder, image_dir):
    got = {}
    for bs in (1, 3):
        judge = _judge(tiny_folder, batch_size=bs, max_new_tokens=6)
        judge.image_dir = image_dir
        got[bs] = (judge.p_fail("horses", ROWS, None), judge.observations()["vqa_answer"])
    assert got[1] == got[3]


def test_no_model_is_refused_when_eval_starts():
    cfg = load_config("demo", ["eval.judges=[vqa]", "eval.judge_options={}"])  # the demo gives it a tiny one
    with pytest.raises(UserError, match=re.escape(CONFIG_KEY)):
        configured_judges(cfg.eval.judges, None, {}, cfg.eval.judge_options)


def test_a_model_that_is_not_here_fails_fast_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model in (str(tmp_path / "no_such_folder"), "nobody/no-such-vlm"):
        t0 = time.perf_counter()
        with pytest.raises(UserError) as e:
            _judge(model)
        assert time.perf_counter() - t0 < 10
        assert model in str(e.value) and CONFIG_KEY in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="image-text-to-text"):
        _judge(tmp_path / "bert")


def test_options_are_validated():
    with pytest.raises(UserError, match="eval.judge_options.vqa.*temperature"):
        judge_options(VQAJudge, {"model": "x/y", "temperature": 0.7})
    with pytest.raises(UserError, match="unknown categories.*cats"):
        judge_options(VQAJudge, {"model": "x/y", "questions": {"cats": "Is the cat malformed?"}})
    with pytest.raises(UserError, match="batch_size"):
        judge_options(VQAJudge, {"model": "x/y", "batch_size": 0})


def test_a_tiny_model_is_never_reported_under_a_real_name(tiny_folder, tmp_path):
    fake = tmp_path / "llava-1.5-7b-hf"  # a real model's name on a folder holding the tiny one
    shutil.copytree(tiny_folder, fake)
    prov = _judge(fake).provenance()
    assert prov["model"] == "tiny" and set(prov["models"].values()) == {"tiny"}
    assert _judge("tiny").provenance()["model"] == "tiny"
    # without the marker it is any saved model: named by its folder, each weight file by its sha256
    cfg = json.loads((fake / "config.json").read_text())
    del cfg[TINY_MARKER]
    (fake / "config.json").write_text(json.dumps(cfg))
    prov = _judge(fake).provenance()
    sha = hashlib.sha256((fake / "model.safetensors").read_bytes()).hexdigest()
    assert prov["model"] == str(fake) and prov["models"] == {"model.safetensors": sha}
