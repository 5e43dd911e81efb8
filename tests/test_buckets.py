"""Aspect buckets (pipeline/buckets.py): bucket lists, the nearest-bucket rule, bucket-grouped shards,
and README's webdataset loader run on them."""

import io
import json
import re
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, curate
from PIL import Image

from t2i_curate.pipeline.core.buckets import SD1, SDXL, assign, resolve_buckets, shard_slices, with_buckets
from t2i_curate.pipeline.core.config import ConfigError, load_config
from t2i_curate.pipeline.download.demo import serve_folder


def test_sdxl_list_is_the_published_table():
    assert len(SDXL) == 40 and len(set(SDXL)) == 40
    assert (2048, 512) in SDXL and (512, 2048) in SDXL and (1024, 1024) in SDXL
    assert (1344, 704) in SDXL and (704, 1344) not in SDXL  # the table is not symmetric there
    assert all(w % 64 == 0 and h % 64 == 0 and 512 <= min(w, h) and max(w, h) <= 2048 for w, h in SDXL)
    assert all(0.9 * 1024**2 <= w * h <= 1024**2 for w, h in SDXL)


def test_sd1_list():
    assert len(SD1) == 17 and (512, 512) in SD1 and (256, 1024) in SD1 and (1024, 256) in SD1
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) for w, h in SD1)
    assert sorted(SD1) == sorted((h, w) for w, h in SD1)  # every bucket transposed too


def test_nearest_by_log_ratio():
    # 1.8:1 is nearer 3:1 than 1:1 by log-ratio (0.51 vs 0.59); a plain ratio difference says 1:1 (1.2 vs 0.8)
    assert assign([180], [100], resolve_buckets([[100, 100], [300, 100]])) == ([300], [100])
    # 2:1 lies exactly between 1:1 and 4:1 in log-ratio: the first in (aspect, area) order wins
    assert assign([200], [100], resolve_buckets([[400, 100], [100, 100]])) == ([100], [100])
    b = resolve_buckets("sdxl")
    assert assign([512, 300, 600, 800, 5000], [512, 600, 300, 200, 100], b) == (
        [1024, 704, 1408, 2048, 2048], [1024, 1408, 704, 512, 512])
    assert assign([None, 0, 10], [10, 10, None], b) == ([None, None, None], [None, None, None])
    # symmetric: a portrait image gets the transposed bucket of its landscape twin (where the list has it)
    w, h = assign([1000, 700], [700, 1000], resolve_buckets("sd1"))
    assert (w[0], h[0]) == (h[1], w[1])


def test_bucket_config_is_checked():
    assert load_config("demo", ["write.buckets=sd1"]).write.buckets == "sd1"
    assert load_config("demo", ["write.buckets=[[512, 512], [768, 512]]"]).write.buckets == [(512, 512), (768, 512)]
    with pytest.raises(ConfigError, match="unknown bucket list 'sd3'.*'sd1', 'sdxl'"):
        load_config("demo", ["write.buckets=sd3"])
    with pytest.raises(ConfigError, match="positive integer sides"):
        load_config("demo", ["write.buckets=[[512, 0]]"])
    with pytest.raises(ConfigError, match="group_by_bucket needs a bucket list"):
        load_config("demo", ["write.group_by_bucket=true"])
    for preset in (ROOT / "configs").glob("*.yaml"):  # off by default: written shards unchanged
        assert load_config(str(preset)).write.buckets is None, preset.name


def test_shards_cut_per_bucket():
    meta = pa.table({"key": [f"{i:03d}" for i in range(7)], "width": [512, 600, 512, 300, 512, 600, 512],
                     "height": [512, 300, 512, 600, 512, 300, 512]})
    wcfg = load_config("demo", ["write.buckets=sdxl", "write.group_by_bucket=true"]).write
    grouped = with_buckets(meta, wcfg)
    assert grouped["key"].to_pylist() == ["003", "000", "002", "004", "006", "001", "005"]  # (bucket, key)
    assert shard_slices(grouped, 3, True) == [(0, 1), (1, 3), (4, 1), (5, 2)]
    assert shard_slices(grouped, 3, False) == [(0, 3), (3, 3), (6, 1)]
    plain = with_buckets(meta, load_config("demo", ["write.buckets=sdxl"]).write)
    assert plain["key"].to_pylist() == meta["key"].to_pylist()  # not grouped: key order kept
    assert with_buckets(meta, load_config("demo").write) is meta  # no buckets: no columns


def test_plan_file_for_other_processes_holds_the_bucket_shards(tmp_path):
    from t2i_curate.pipeline.core.layout import RunLayout
    from t2i_curate.pipeline.write.stage import _plan_rows, write_plan

    meta = pa.table({"key": [f"{i:03d}" for i in range(5)], "width": [512, 600, 512, 600, 512],
                     "height": [512, 300, 512, 300, 512]})
    grouped = with_buckets(meta, load_config("demo", ["write.buckets=sdxl", "write.group_by_bucket=true"]).write)
    slices = shard_slices(grouped, 2, True)
    lay = RunLayout(tmp_path)
    lay.selected.mkdir(parents=True)
    write_plan(lay, grouped, 2, slices)
    got = [[r["key"] for r in _plan_rows(lay, i)] for i in range(len(slices))]
    assert got == [["000", "002"], ["004"], ["001", "003"]]


# ---- a small run: bucket columns in json and parquet, shards per bucket, README's loader -----------------

# image size -> expected SDXL bucket
SIZES = {(300, 300): (1024, 1024), (310, 310): (1024, 1024), (320, 320): (1024, 1024), (600, 300): (1408, 704),
         (610, 300): (1408, 704), (300, 600): (704, 1408), (800, 200): (2048, 512)}


def _jpeg(i: int, size) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(size, Image.BICUBIC).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bucket_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("buckets")
    (tmp / "site" / "img").mkdir(parents=True)
    for i, size in enumerate(SIZES):
        (tmp / "site" / "img" / f"{i}.jpg").write_bytes(_jpeg(i, size))
    with serve_folder(tmp / "site") as base:
        rows = [{"URL": f"{base}/img/{i}.jpg", "TEXT": f"a picture of size {w}x{h}"} for i, (w, h) in enumerate(SIZES)]
        (tmp / "urls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        args = ["--urls", tmp / "urls.jsonl", "--set", f"runs_dir={tmp / 'runs'}", "--set", "name=k",
                "--set", "download.processes=1", "--set", "workers=1", "--set", "select.rules=[]",
                "--set", "score.scorers=[resolution]", "--set", "write.samples_per_shard=2",
                "--set", "write.buckets=sdxl", "--set", "write.group_by_bucket=true"]
        curate("run", *args)
    return tmp / "runs" / "k", args


def _tar_json(path):
    with tarfile.open(path) as tf:
        return {m.name[:-5]: json.load(tf.extractfile(m)) for m in tf.getmembers() if m.name.endswith(".json")}


def test_each_sample_carries_its_bucket_and_each_shard_holds_one(bucket_run):
    run, _ = bucket_run
    manifest = json.loads((run / "selected" / "manifest.json").read_text())
    assert manifest["samples"] == len(SIZES) and manifest["buckets"]["list"] == "sdxl"
    assert manifest["buckets"]["samples"] == {"1024x1024": 3, "1408x704": 2, "2048x512": 1, "704x1408": 1}
    assert [s["bucket"] for s in manifest["shards"]] == ["704x1408", "1024x1024", "1024x1024", "1408x704", "2048x512"]
    for shard in manifest["shards"]:
        rows = pq.read_table(run / "selected" / f"{shard['shard']}.parquet").to_pylist()
        inside = _tar_json(run / "selected" / f"{shard['shard']}.tar")
        assert {f"{r['bucket_width']}x{r['bucket_height']}" for r in rows} == {shard["bucket"]}
        for r in rows:
            size = tuple(int(x) for x in re.search(r"(\d+)x(\d+)", r["caption"]).groups())
            assert (r["bucket_width"], r["bucket_height"]) == SIZES[size]
            assert (inside[r["key"]]["bucket_width"], inside[r["key"]]["bucket_height"]) == SIZES[size]
    curate("verify", run)


def test_bucketed_writes_resume(bucket_run):
    run, args = bucket_run
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (run / "selected").glob("0*.tar")}
    curate("write", *args)  # the same config: nothing to redo
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (run / "selected").glob("0*.tar")}
    assert after == before  # every shard was current: none rewritten


def test_readme_loader_batches_one_bucket_at_a_time(bucket_run):
    run, _ = bucket_run
    text = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- bucket-loader -->\n```python\n(.*?)```", text, re.S).group(1)
    assert 'run = "runs/demo/selected"' in code
    scope: dict = {}
    exec(code.replace('run = "runs/demo/selected"', f"run = {str(run / 'selected')!r}"), scope)  # noqa: S102
    seen = 0
    for bucket, loader in scope["loaders"].items():
        w, h = map(int, bucket.split("x"))
        for pixel_values, captions in loader:
            assert tuple(pixel_values.shape[1:]) == (3, h, w) and len(captions) == pixel_values.shape[0]
            assert -1.0 <= float(pixel_values.min()) and float(pixel_values.max()) <= 1.0
            assert all(SIZES[tuple(map(int, re.search(r"(\d+)x(\d+)", c).groups()))] == (w, h) for c in captions)
            seen += len(captions)
    assert seen == len(SIZES)
    assert len(scope["shards_by_bucket"]["1024x1024"]) == 2
