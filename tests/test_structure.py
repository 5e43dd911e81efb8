"""The restructure's promises: a scorer is one file, the core imports no stage, the wheel works alone."""

import ast
import gc
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT

from t2i_curate.filters.base import Batch, Scorer
from t2i_curate.filters.registry import column_providers, scorer_classes
from t2i_curate.pipeline.config import load_config

CORE = ("config", "layout", "io", "tars", "errors", "executors", "ray_executor", "weights", "catalog", "devices",
        "buckets")


def _fake_download(run: Path, captions: list[str]) -> None:
    """One download shard as img2dataset writes it, and the normalised input beside it."""
    from PIL import Image

    d = run / "download"
    d.mkdir(parents=True)
    rows = []
    with tarfile.open(d / "00000.tar", "w") as tf:
        for i, caption in enumerate(captions):
            buf = io.BytesIO()
            Image.new("RGB", (300, 300), (i * 40, 90, 20)).save(buf, "JPEG")
            info = tarfile.TarInfo(f"00000000{i}.jpg")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
            rows.append({"key": f"00000000{i}", "url": f"http://example.invalid/{i}.jpg", "caption": caption,
                         "status": "success", "error_message": None, "original_width": 300,
                         "original_height": 300, "input_row": i})
    pq.write_table(pa.Table.from_pylist(rows), d / "00000.parquet")
    (d / "00000_stats.json").write_text("{}")
    pq.write_table(pa.Table.from_pylist([{"url": r["url"], "caption": r["caption"], "input_row": r["input_row"]}
                                         for r in rows]), d / "_input.parquet")


def test_a_scorer_defined_anywhere_is_usable_by_rules(tmp_path):
    """A throwaway scorer, declared in this test file alone: config, rules and funnel pick it up."""
    from t2i_curate.filters.rules import RuleError
    from t2i_curate.pipeline.score import score_stage
    from t2i_curate.pipeline.selection import select_stage

    class CaptionLength(Scorer):
        name = "caption_length_test"
        columns = {"caption_chars": "BIGINT"}

        def score(self, batch: Batch):
            return {"caption_chars": [len(r.get("caption") or "") for r in batch.rows]}

    try:
        assert scorer_classes()["caption_length_test"] is CaptionLength
        assert column_providers()["caption_chars"] == "caption_length_test"
        _fake_download(tmp_path / "t", ["a cat", "a horse galloping on the beach"])
        rule = "select.rules=[{name: long_caption, keep: 'caption_chars > 10'}]"
        base = [f"runs_dir={tmp_path}", "name=t", "workers=1", rule]
        with pytest.raises(RuleError, match="needs the caption_length_test scorer"):
            score_stage(load_config("demo", [*base, "score.scorers=[resolution]"]), tmp_path / "t", [0])
            select_stage(load_config("demo", [*base, "score.scorers=[resolution]"]), tmp_path / "t")
        cfg = load_config("demo", [*base, "score.scorers=[resolution, caption_length_test]"])
        score_stage(cfg, tmp_path / "t", [0])
        assert select_stage(cfg, tmp_path / "t") == {"selected": 1, "dropped": 1, "failed": 0}
        dec = pq.read_table(tmp_path / "t" / "selected" / "decisions.parquet").to_pylist()
        assert [(d["key"], d["rule"]) for d in dec] == [("000000000", "long_caption"), ("000000001", None)]
    finally:
        from t2i_curate.pipeline import shard_scoring

        shard_scoring._CACHE.clear()  # the per-process scorer cache holds an instance
        del CaptionLength
        gc.collect()
    assert "caption_length_test" not in scorer_classes()


def test_unknown_scorer_is_refused_before_any_work(tmp_path):
    from conftest import curate

    r = curate("run", "--set", "score.scorers=[resolution, bogus]", "--set", f"runs_dir={tmp_path}", check=False)
    assert r.returncode == 2 and "unknown scorer 'bogus'" in r.stderr and "aesthetic" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "demo").exists()


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_core_imports_no_stage_filter_or_eval_module():
    core = {f"t2i_curate.pipeline.{m}" for m in CORE}
    for m in CORE:
        ours = {i for i in _imports(ROOT / "pipeline" / f"{m}.py") if i.startswith("t2i_curate")}
        assert ours <= core, f"pipeline/{m}.py imports {sorted(ours - core)}"


@pytest.mark.slow
def test_wheel_installs_alone_and_runs_the_demo_from_another_folder(tmp_path):
    """Presets and prompt suites ship in the wheel; nothing is read from the repository."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True)
    [wheel] = list(wheels.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "t2i_curate/configs/demo.yaml" in names and "t2i_curate/eval/prompts/horses.jsonl" in names
    assert not any(n.startswith(("pipeline/", "filters/", "eval/")) for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "eval.py").write_text("raise SystemExit('a user eval.py was imported')\n")
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    probe = subprocess.run([sys.executable, "-c", "import t2i_curate.pipeline.cli as c; print(c.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip().startswith(str(target))
    r = subprocess.run([sys.executable, "-m", "t2i_curate.pipeline.cli", "run", "--config", "demo",
                        "--set", "runs_dir=runs", "--set", "input.demo_size=20", "--set", "workers=1"],
                       cwd=elsewhere, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (elsewhere / "runs" / "demo" / "selected" / "manifest.json").exists()


def test_a_judge_defined_anywhere_is_used_by_eval(tmp_path):
    """A throwaway failure judge, declared in this test alone, gets its rates and per-image column."""
    import torch

    from t2i_curate.eval.judge import Judge, configured_judges, judge_classes
    from t2i_curate.eval.judging import run_judges
    from t2i_curate.pipeline.errors import UserError

    class AlwaysFails(Judge):
        name = "always_fails_test"
        categories = ("horses",)
        description = "says every horse failed"

        def p_fail(self, category, rows, emb):
            return [1.0] * len(rows), None

    try:
        assert {"clip_contrast", "probe", "vqa", "always_fails_test"} <= set(judge_classes())
        with pytest.raises(UserError, match="unknown judge"):
            configured_judges(["nope"], None, {})
        rows = [{"image_id": f"h{i}", "category": "horses"} for i in range(3)]
        rows.append({"image_id": "p0", "category": "human_limbs"})
        cfg = load_config("demo", ["eval.judges=[always_fails_test]"])
        out, per_image, info = run_judges(cfg, rows, torch.randn(4, 8), None, tmp_path)
        assert [(r["category"], r["judge"], r["n"], r["rate"]) for r in out] == [("horses", "always_fails_test", 3, 1.0)]
        assert per_image == {"p_fail_always_fails_test": [1.0, 1.0, 1.0, None],
                             "verdict_always_fails_test": ["failed", "failed", "failed", None]}
        assert info["always_fails_test"]["description"] == "says every horse failed"
    finally:
        del AlwaysFails
        gc.collect()
