"""Eval integrity: the FID reference cache follows the reference's content, hostile `--images` prompt
files and file names are listed (never a traceback), and a rerun removes what an interrupted eval left.

The CLI runs are cheap: tiny eval models, a few small images, a folder as the reference (no curated run)."""

import json
import os
import time

import numpy as np
import pytest
from conftest import curate
from PIL import Image

from t2i_curate.pipeline.core.config import EvalConfig
from t2i_curate.pipeline.core.errors import UserError

TAG = "images-generated"


def _png(path, seed, size=(64, 48), shift=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 200, (size[1], size[0], 3)) + shift
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path)


def _tmp_files(*roots):
    return sorted(str(p) for r in roots if r.exists() for p in r.rglob(".tmp-*"))


def _eval(root, prompts, images="generated"):
    """`curate eval --images` against the reference folder; (process, metrics.json or None)."""
    r = curate("eval", "--images", root / images, "--prompts", prompts, "--set", f"runs_dir={root / 'runs'}",
               "--set", f"eval.reference={root / 'reference'}", "--set", "eval.models=tiny",
               "--set", "eval.census=false", check=False)
    metrics = root / "runs" / "demo" / "eval" / TAG / "metrics.json"
    return r, (json.loads(metrics.read_text()) if r.returncode == 0 and metrics.exists() else None)


@pytest.fixture(scope="module")
def reruns(tmp_path_factory):
    """Three evals against one reference folder: the first, a rerun of the same (after leftovers of an
    interrupted eval were put where eval's writers put their temporaries), and one after every reference
    image was replaced (same names, same count, other content)."""
    root = tmp_path_factory.mktemp("integrity")
    cache = root / "cache"
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(cache)  # the subprocesses' cache folder, checked for leftovers too
    try:
        (root / "generated").mkdir()
        (root / "reference").mkdir()
        for i in range(3):
            _png(root / "generated" / f"g{i}.png", i)
        for i in range(4):
            _png(root / "reference" / f"r{i}.png", 100 + i)
        prompts = root / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"file": f"g{i}.png", "prompt": f"a horse {i}"}) + "\n"
                                   for i in range(3)))
        first = _eval(root, prompts)
        run = root / "runs" / "demo"
        planted = [run / "eval" / TAG / ".tmp-0badf00d-eval_images.parquet",
                   run / "eval" / TAG / ".tmp-0badf00d-metrics.json",
                   run / "eval" / "_reference" / ".tmp-0badf00d-reference-0123456789abcdef.pt",
                   run / "eval" / "tiny" / "images" / ".tmp-0badf00d-people-000_0.png",
                   run / ".tmp-0badf00d-catalog.duckdb"]
        for p in planted:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"left by a killed eval")
        same = _eval(root, prompts)
        leftovers = _tmp_files(root / "runs", cache)
        time.sleep(0.05)
        for i in range(4):  # same names and count, other content: bright flat-ish fields
            _png(root / "reference" / f"r{i}.png", 500 + i, shift=120)
        replaced = _eval(root, prompts)
        yield {"root": root, "first": first, "same": same, "replaced": replaced, "leftovers": leftovers,
               "planted": planted, "cache_dir": run / "eval" / "_reference"}
    finally:
        if saved is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = saved


def _ok(result):
    r, m = result
    assert r.returncode == 0 and m is not None, r.stderr[-3000:]
    return r, m


@pytest.mark.slow  # reruns a stage: in `make test-slow` and CI
def test_unchanged_reference_folder_hits_the_cache(reruns):
    _, m1 = _ok(reruns["first"])
    r2, m2 = _ok(reruns["same"])
    assert "reference statistics from cache" in r2.stderr
    assert m2["fid"] == m1["fid"] and m2["fid_protocol"]["n_reference"] == 4


@pytest.mark.slow  # reruns a stage: in `make test-slow` and CI
def test_replaced_reference_images_are_recomputed(reruns):
    r1, m1 = _ok(reruns["first"])
    r3, m3 = _ok(reruns["replaced"])
    assert "from cache" not in r3.stderr
    assert "reference statistics: computing (key" in r3.stderr and "reference statistics: computing" in r1.stderr
    assert m3["fid_protocol"]["n_reference"] == 4 and abs(m3["fid"] - m1["fid"]) > 1e-3
    caches = sorted(reruns["cache_dir"].glob("reference-*.pt"))
    assert len(caches) == 2  # one per content of the folder
    key = caches[0].stem.removeprefix("reference-")
    assert f"key {key}" in r1.stderr + r3.stderr  # the hit and the miss name the key


@pytest.mark.slow  # reruns a stage: in `make test-slow` and CI
def test_rerun_removes_leftovers_of_an_interrupted_eval(reruns):
    _ok(reruns["same"])
    assert all(not p.exists() for p in reruns["planted"])
    assert reruns["leftovers"] == []
    _ok(reruns["replaced"])  # a normal eval leaves no temporary file anywhere (run folder, cache folder)
    assert _tmp_files(reruns["root"] / "runs", reruns["root"] / "cache") == []


def test_reference_cache_key_covers_files_weights_n_and_protocol(tmp_path):
    from t2i_curate.eval import fid

    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(3):
        (ref / f"r{i}.png").write_bytes(bytes([i]) * 100)
    spec = fid.feature_spec(EvalConfig(), True)

    def key(source=str(ref), limit=10, weights="tiny", s=spec):
        return fid.reference_cache_key(source, tmp_path, s, limit, weights)

    k0 = key()
    assert key() == k0
    assert len({k0, key(limit=2), key(weights="0" * 64), key(s=fid.feature_spec(EvalConfig(fid_protocol="clean"),
                                                                                  True))}) == 4
    st = (ref / "r1.png").stat()
    time.sleep(0.05)
    (ref / "r1.png").write_bytes(b"\xff" * 100)  # same size, then the old mtime put back (cp -p, rsync -t)
    os.utime(ref / "r1.png", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert key() != k0  # the ctime moved
    k1 = key()
    (ref / "r3.png").write_bytes(b"x")  # a new image
    assert key() != k1
    # the curated run: each tar's stamp and the manifest's sha256
    run = tmp_path / "run"
    (run / "selected").mkdir(parents=True)
    (run / "selected" / "00000.tar").write_bytes(b"t" * 512)
    manifest = run / "selected" / "manifest.json"
    manifest.write_text(json.dumps({"shards": [{"shard": "00000", "sha256": "a" * 64}]}))
    r0 = fid.reference_cache_key("run", run, spec, 10, "tiny")
    assert fid.reference_cache_key("run", run, spec, 10, "tiny") == r0
    manifest.write_text(json.dumps({"shards": [{"shard": "00000", "sha256": "b" * 64}]}))
    assert fid.reference_cache_key("run", run, spec, 10, "tiny") != r0


def test_undecodable_reference_images_are_left_out(tmp_path):
    from t2i_curate.eval.fid import iter_reference_images

    for i in range(3):
        _png(tmp_path / f"r{i}.png", i)
    (tmp_path / "r1.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    assert [k for k, _ in iter_reference_images(str(tmp_path), None, 10)] == ["r0.png", "r2.png"]


HOSTILE = [
    b'{"file": "a.png", "prompt": "a horse on a beach"}',
    b'{"file": "b.png", "prompt": "a photo of a nurse", "id": 7, "category": "occupations", "occupation": "nurse"}',
    b'{"file": "c.png", "prompt": "a red cube", "expected_hands": "2"}',
    b'["a.png", "a list"]',  # 4
    b'{"file": ["b.png"], "prompt": "file is a list"}',  # 5
    b"5",  # 6
    b"null",  # 7
    b'"just a string"',  # 8
    b'{"file": "c.png", "prompt": {"text": "nested"}}',  # 9
    b'{"file": "caf\xe9.png", "prompt": "latin-1 bytes"}',  # 10
    b'{"file": "caf\\udce9.png", "prompt": "an escaped lone surrogate"}',  # 11
    b'{"file": "a.png", "prompt": "mapped twice"}',  # 12
    b'{"file": "b.png", "prompt": "x", "expected_hands": "two"}',  # 13
    b'{"file": "c.png", "prompt": 3}',  # 14
    b'{"file": "a.png"}',  # 15
    b"{not json",  # 16
    b'{"file": "b.png", "prompt": "x", "category": ["a"]}',  # 17
]


def test_hostile_prompt_rows_and_file_names_are_listed_not_fatal(tmp_path):
    gen = tmp_path / "generated"
    gen.mkdir()
    (tmp_path / "reference").mkdir()
    for i in range(3):
        _png(tmp_path / "reference" / f"r{i}.png", 100 + i)
    for i, name in enumerate("abc"):
        _png(gen / f"{name}.png", i)
    _png(os.fsdecode(os.fsencode(str(gen)) + b"/caf\xe9.png"), 9)  # a file name that is not UTF-8
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b"\n".join(HOSTILE) + b"\n")
    r, m = _eval(tmp_path, prompts)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert m["n_images"] == 3
    problems = json.loads((tmp_path / "runs" / "demo" / "eval" / TAG / "input_problems.json").read_text())
    assert problems == {**problems, "measured": 3, "no_prompt": 0, "no_image": 0, "unreadable": 0,
                        "bad_row": 14, "bad_name": 1}
    bad = {b["line"]: b["problem"] for b in problems["details"]["bad_row"]}
    assert sorted(bad) == list(range(4, 18))
    assert "got array" in bad[4] and "'file': expected text, got array" in bad[5]
    assert "got number" in bad[6] and "got null" in bad[7] and "got string" in bad[8]
    assert "'prompt': expected text, got object" in bad[9] and "not UTF-8" in bad[10] and "not UTF-8" in bad[11]
    assert "mapped already on line 1" in bad[12] and "expected_hands" in bad[13] and "'prompt'" in bad[14]
    assert "expected 'file' and 'prompt'" in bad[15] and "not JSON" in bad[16] and "'category'" in bad[17]
    assert problems["details"]["bad_name"] == ["caf\\xe9.png"]
    import pyarrow.parquet as pq

    rows = {x["image_id"]: x for x in pq.read_table(tmp_path / "runs" / "demo" / "eval" / TAG /
                                                    "eval_images.parquet").to_pylist()}
    assert set(rows) == {"a", "7", "c"} and rows["c"]["expected_hands"] == 2 and rows["7"]["occupation"] == "nurse"
    report = (tmp_path / "runs" / "demo" / "eval" / TAG / "report.html").read_text()
    assert "14 prompt rows that cannot be used" in report and "1 image file names that are not UTF-8" in report


def test_mapping_strict_mode_and_csv_refuse_with_one_line(tmp_path):
    from t2i_curate.eval.external import read_mapping

    p = tmp_path / "m.jsonl"
    for bad, match in ((b'["a.png"]\n', "got array"), (b"null\n", "got null"),
                       (b'{"file": ["a.png"], "prompt": "x"}\n', "expected text"),
                       (b'{"file": "caf\xe9.png", "prompt": "x"}\n', "not UTF-8")):
        p.write_bytes(bad)
        with pytest.raises(UserError, match=match):
            read_mapping(p)
    c = tmp_path / "m.csv"
    c.write_bytes(b"\xef\xbb\xbffile,prompt\na.png,ok\ncaf\xe9.png,latin-1\nb.png,\n")
    problems: list = []
    rows = read_mapping(c, problems)
    assert [r["file"] for r in rows] == ["a.png"]
    assert [(x["line"], "not UTF-8" in x["problem"] or "expected 'file'" in x["problem"]) for x in problems] == \
        [(3, True), (4, True)]


@pytest.mark.parametrize("line, match", [
    (b'["a list"]', "got array"), (b"5", "got number"), (b"null", "got null"),
    (b'{"prompt": {"text": "nested"}}', "'prompt': expected text, got object"),
    (b'{"prompt": "x", "category": ["a"]}', "'category': expected text"),
    (b'{"prompt": "caf\xe9"}', "not UTF-8"), (b'{"prompt": ""}', "empty prompt"),
])
def test_suite_lines_of_the_wrong_type_are_refused_with_file_and_line(tmp_path, line, match):
    from t2i_curate.eval.suites import SuiteError, load_suite

    p = tmp_path / "suite.jsonl"
    p.write_bytes(b'{"prompt": "fine", "id": 3}\n' + line + b"\n")
    with pytest.raises(SuiteError, match=match) as e:
        load_suite(str(p))
    assert f"{p}:2" in str(e.value)
    p.write_bytes(b'{"prompt": "fine", "id": 3}\n')
    assert load_suite(str(p))[0]["id"] == "3"
    drawbench = tmp_path / "d.csv"
    drawbench.write_bytes(b"Prompts,Category\nA caf\xe9,Colors\n")
    with pytest.raises(SuiteError, match="not UTF-8"):
        load_suite(str(drawbench))


def test_clean_eval_tmp_on_a_store(tmp_path, monkeypatch):
    """A run on an object store (fsspec's memory filesystem): this machine's staging folder, the tag's remote
    eval folder and the run folder's own temporaries are cleaned; nothing else is touched."""
    import fsspec

    from t2i_curate.eval.evaluate import clean_eval_tmp, staging_root
    from t2i_curate.pipeline.core.config import load_config
    from t2i_curate.pipeline.core.io import as_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = load_config("demo", ["runs_dir=memory://integrity/runs", "eval.tag=t"])
    fs = fsspec.filesystem("memory")
    run = "/integrity/runs/demo"
    for key in (f"{run}/.tmp-1-catalog.duckdb", f"{run}/eval/t/.tmp-2-metrics.json", f"{run}/eval/t/keep.json",
                f"{run}/selected/keep.tar", f"{run}/catalog.duckdb"):
        fs.pipe(key, b"x")
    local = staging_root(as_path(cfg.run_dir))
    for p in (local / "t" / ".tmp-3-report.html", local / "_reference" / ".tmp-4-reference-x.pt", local / "t" / "a"):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    assert clean_eval_tmp(cfg) == 4
    assert sorted(fs.find("/integrity")) == [f"{run}/catalog.duckdb", f"{run}/eval/t/keep.json",
                                             f"{run}/selected/keep.tar"]
    assert [p.name for p in local.rglob("*") if p.is_file()] == ["a"]
