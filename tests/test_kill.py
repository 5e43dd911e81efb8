"""SIGKILL each stage at several points, rerun, and require the uninterrupted run's exact outputs."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from conftest import ROOT, curate

from t2i_curate.pipeline.core.io import sha256_file

N = 40

# the kill matrix and the Ray instance take minutes: `make test-all` and .ci/run run them
pytestmark = pytest.mark.slow


def _args(runs, name):
    return ["--set", f"runs_dir={runs}", "--set", f"name={name}", "--set", f"input.demo_size={N}",
            "--set", "download.samples_per_shard=8", "--set", "write.samples_per_shard=6",
            "--set", "download.processes=1", "--set", "download.threads=4", "--set", "workers=1"]


def _snapshot(run):
    dec = pq.read_table(run / "selected" / "decisions.parquet").to_pylist()
    scores = {}
    for p in sorted((run / "scores").glob("0*.parquet")):
        for r in pq.read_table(p).to_pylist():
            scores[r["key"]] = r
    shards = {p.name: sha256_file(p) for p in sorted((run / "selected").glob("0*.tar"))}
    return dec, scores, shards


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    runs = tmp_path_factory.mktemp("kill")
    curate("run", *_args(runs, "ref"))
    return runs, _snapshot(runs / "ref")


def _kill_when(cmd, ready, timeout=120):
    """Start ``cmd`` in its own process group; SIGKILL the group once ``ready()``; return True if killed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    p = subprocess.Popen([sys.executable, "-m", "t2i_curate.pipeline.cli", *map(str, cmd)], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    while p.poll() is None and time.time() - t0 < timeout:
        if ready():
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return True
        time.sleep(0.02)
    p.wait()
    return False


def _count(folder, pattern):
    return lambda: len(list(folder.glob(pattern))) if folder.exists() else 0


def _copy_run(runs, name, keep):
    src, dst = runs / "ref", runs / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    for sub in ("download", "scores", "selected"):
        if sub not in keep:
            shutil.rmtree(dst / sub, ignore_errors=True)
    (dst / "config.yaml").unlink()
    return dst


POINTS = {
    # stage -> list of (label, folder, glob, count) : kill once that many files match
    "download": [("first temp", "download", "_tmp/*.feather", 1), ("2 shards", "download", "*_stats.json", 2),
                 ("4 shards", "download", "*_stats.json", 4)],
    "score": [("first temp", "scores", ".tmp-*", 1), ("2 shards", "scores", "0*.parquet", 2),
              ("4 shards", "scores", "0*.parquet", 4)],
    "write": [("first temp", "selected", ".tmp-*", 1), ("1 shard", "selected", "0*.parquet", 1),
              ("3 shards", "selected", "0*.parquet", 3)],
}
KEEP = {"download": (), "score": ("download",), "write": ("download", "scores", "selected")}


@pytest.mark.parametrize("stage,point", [(s, i) for s in POINTS for i in range(3)],
                         ids=[f"{s}-{p[0]}" for s in POINTS for p in POINTS[s]])
def test_kill_and_rerun_gives_identical_outputs(reference, stage, point):
    runs, (ref_dec, ref_scores, ref_shards) = reference
    name = f"k-{stage}-{point}"
    run = _copy_run(runs, name, KEEP[stage])
    if stage == "write":
        for p in (run / "selected").glob("0*"):
            p.unlink()
        (run / "selected" / "manifest.json").unlink()
    label, folder, pattern, count = POINTS[stage][point]
    ready = _count(run / folder, pattern)
    _kill_when([stage, *_args(runs, name)], lambda: ready() >= count)
    curate("run", *_args(runs, name))
    curate("verify", run)
    dec, scores, shards = _snapshot(run)
    assert dec == ref_dec
    assert scores.keys() == ref_scores.keys()
    for k, r in ref_scores.items():
        assert {c: v for c, v in scores[k].items()} == r, k
    assert shards == ref_shards
    assert not list(run.rglob(".tmp-*"))
