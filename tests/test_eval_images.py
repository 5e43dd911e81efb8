"""`curate eval --images DIR --prompts FILE`: images made elsewhere, measured as the sampler's would be."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import curate
from PIL import Image


def _png(path, seed, size=(96, 64)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _folders(tmp_path):
    gen, ref = tmp_path / "generated", tmp_path / "reference"
    gen.mkdir()
    ref.mkdir()
    for i in range(3):
        _png(ref / f"r{i}.png", 100 + i)
    _png(gen / "a.png", 1)
    (gen / "sub").mkdir()
    _png(gen / "sub" / "b.png", 2)
    _png(gen / "orphan.png", 3)  # no prompt row
    (gen / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # unreadable
    rows = [{"file": "a.png", "prompt": "a horse galloping on a beach", "category": "horses"},
            {"file": "sub/b.png", "prompt": "a photo of the face of a nurse", "category": "occupations",
             "occupation": "nurse", "id": "nurse-0"},
            {"file": "bad.png", "prompt": "a cat"},
            {"file": "missing.png", "prompt": "a dog"}]  # no image
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return gen, ref, prompts


def _args(tmp_path, ref, *extra):
    return ["--set", f"runs_dir={tmp_path / 'runs'}", "--set", f"eval.reference={ref}",
            "--set", "eval.models=tiny", *extra]


def test_images_made_elsewhere_are_measured_and_problems_counted(tmp_path):
    gen, ref, prompts = _folders(tmp_path)
    r = curate("eval", "--images", gen, "--prompts", prompts, *_args(tmp_path, ref))
    out = tmp_path / "runs" / "demo" / "eval" / "images-generated"
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_images"] == 2 and m["tiny_model"] is False and m["tiny_eval_models"] is True
    assert m["model"].startswith("images in ") and m["clip_score_model"].startswith("tiny:")
    p = m["input_problems"]
    assert (p["measured"], p["no_prompt"], p["no_image"], p["unreadable"]) == (2, 1, 1, 1)
    assert p["details"]["no_prompt"] == ["orphan.png"] and p["details"]["no_image"] == ["missing.png"]
    rows = {x["image_id"]: x for x in pq.read_table(out / "eval_images.parquet").to_pylist()}
    assert set(rows) == {"a", "nurse-0"} and rows["nurse-0"]["occupation"] == "nurse"
    assert rows["a"]["category"] == "horses"
    assert "without a prompt row" in (out / "report.html").read_text()
    assert "1 / 1 / 1" in r.stderr  # the summary line


def test_empty_folder_and_missing_prompts_are_refused(tmp_path):
    gen, ref, prompts = _folders(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    r = curate("eval", "--images", empty, "--prompts", prompts, *_args(tmp_path, ref), check=False)
    assert r.returncode == 2 and "found none" in r.stderr and "Traceback" not in r.stderr
    r = curate("eval", "--images", gen, *_args(tmp_path, ref), check=False)
    assert r.returncode == 2 and "--images needs --prompts" in r.stderr


def test_real_photos(tmp_path, shared):
    photos = sorted(p.name for p in (shared / "images").iterdir() if p.suffix in (".jpg", ".png"))
    prompts = tmp_path / "p.csv"
    prompts.write_text("file,prompt,category\n" + "".join(f"{n},a photo,general\n" for n in photos))
    _, ref, _ = _folders(tmp_path)
    curate("eval", "--images", shared / "images", "--prompts", prompts, *_args(tmp_path, ref))
    m = json.loads((tmp_path / "runs" / "demo" / "eval" / "images-images" / "metrics.json").read_text())
    assert m["n_images"] == len(photos) >= 5 and m["input_problems"]["unreadable"] == 0
    assert np.isfinite(m["fid"]) and m["clip_score"] >= 0


@pytest.mark.parametrize("bad", ["file,prompt\n,no file\n", '{"prompt": "x"}\n'])
def test_mapping_rows_need_file_and_prompt(tmp_path, bad):
    from t2i_curate.eval.external import read_mapping
    from t2i_curate.pipeline.core.errors import UserError

    p = tmp_path / ("m.csv" if bad.startswith("file") else "m.jsonl")
    p.write_text(bad)
    with pytest.raises(UserError, match="expected 'file' and 'prompt'"):
        read_mapping(p)
