"""Scoring on Ray with CPU decode tasks feeding model actors (score/ray_actors.py) gives the local
executor's results under the executors' guarantee, and survives a model actor killed mid-run."""

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import curate, small_demo_args

ray = pytest.importorskip("ray")
from test_ray import _scores, _shard_images, assert_rows_close  # noqa: E402 (after the importorskip)

# a Ray instance and two pipeline runs: `make test-all` and .ci/run run them
pytestmark = pytest.mark.slow

N, BATCH = 40, 8  # download shards of 20 -> 3 batches each: an actor is killed between batches
# the demo's scorers plus NudeNet, whose input travels as uint8 too and is finished on the actor by its own code
SCORERS = "score.scorers=[resolution, watermark, aesthetic, clip_similarity, nsfw, text, phash, nudity]"


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("ray_actors")
    curate("run", *small_demo_args(runs, n=N, extra=("--set", f"score.batch_size={BATCH}", "--set", SCORERS)))
    return runs


def _ray_copy(runs, name: str, extra=()):
    from t2i_curate.pipeline.core.config import load_config

    dst = runs / name
    shutil.copytree(runs / "demo", dst)
    for sub in ("scores", "selected"):
        shutil.rmtree(dst / sub)
    overrides = [f"runs_dir={runs}", f"name={name}", f"input.demo_size={N}", "download.samples_per_shard=20",
                 "write.samples_per_shard=15", f"score.batch_size={BATCH}", "executor=ray", "workers=2",
                 "ray.score_actors=true", SCORERS, *extra]
    return load_config("demo", overrides), dst


def _assert_scores_equal(local, dst) -> None:
    a, b = _scores(local), _scores(dst)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert_rows_close(a[k], b[k], k)
    for p in sorted((local / "scores").glob("0*.parquet")):  # the same metadata as the task path writes
        ma, mb = pq.read_schema(p).metadata, pq.read_schema(dst / "scores" / p.name).metadata
        assert ma[b"t2i_curate"] == mb[b"t2i_curate"], p.name
        keys = pq.read_table(dst / "scores" / p.name, columns=["key"]).column("key").to_pylist()
        assert len(keys) == len(set(keys)) == pq.read_metadata(p).num_rows, p.name  # no duplicate, none lost
    npys = sorted((local / "scores" / "embeddings").glob("*.npy"))
    assert npys  # the demo keeps image embeddings
    for p in npys:
        assert np.allclose(np.load(p), np.load(dst / "scores" / "embeddings" / p.name), rtol=1e-3, atol=1e-3), p.name


def test_actor_path_equals_local(local_run, ray_local, monkeypatch):
    from t2i_curate.pipeline.core.layout import RunLayout
    from t2i_curate.pipeline.report.verify import verify_run
    from t2i_curate.pipeline.score import ray_actors as ray_score
    from t2i_curate.pipeline.score.stage import score_stage
    from t2i_curate.pipeline.select.stage import select_stage
    from t2i_curate.pipeline.write.stage import write_stage

    cfg, dst = _ray_copy(local_run, "demo-actors")
    shards = RunLayout(dst).finished_downloads()
    stamped = []  # the stage hands the driver each shard's stamp from its one listing: no per-shard request
    monkeypatch.setattr(ray_score, "file_stamp", lambda *a, **k: stamped.append(a) or "")
    assert score_stage(cfg, dst, shards)["scored"] > 0
    assert stamped == []
    monkeypatch.undo()
    select_stage(cfg, dst)
    write_stage(cfg, dst)
    local = local_run / "demo"
    assert all("pnudity" in r for r in _scores(dst).values())
    _assert_scores_equal(local, dst)
    dec = lambda run: pq.read_table(run / "selected" / "decisions.parquet").to_pylist()  # noqa: E731
    assert dec(local) == dec(dst)
    assert _shard_images(local) == _shard_images(dst) and _shard_images(local)
    assert verify_run(dst) == []
    # a rerun finds every shard current and writes nothing
    assert score_stage(cfg, dst, shards) == {"skipped": len(shards), "scored": 0, "failed": 0}


def test_actor_killed_mid_run_is_survived(local_run, ray_local):
    from t2i_curate.pipeline.core.layout import RunLayout
    from t2i_curate.pipeline.score.ray_actors import score_on_actors

    cfg, dst = _ray_copy(local_run, "demo-actor-killed", extra=("ray.actors=1",))
    seen: dict[str, object] = {}

    def kill_after_two(n: int, actors: list) -> None:
        if n == 2:  # the actor has the next batch queued: that call is re-sent to the restarted actor
            seen["pid_before"] = ray.get(actors[0].pid.remote())
            ray.kill(actors[0], no_restart=False)
        if n == 3:  # the batch that was in flight at the kill came back from the restarted actor
            seen["pid_after"] = ray.get(actors[0].pid.remote())
        seen["batches"] = n

    shards = RunLayout(dst).finished_downloads()
    res = score_on_actors(cfg, dst, shards, retries=0, on_batch=kill_after_two)
    assert res.errors == {}, res.errors
    assert seen["batches"] > 3  # batches were scored after the kill
    assert seen["pid_after"] != seen["pid_before"]  # the actor really died and was restarted
    assert sum(r["scored"] + r["failed"] for r in res.results.values()) == sum(
        pq.read_table(RunLayout(dst).download_parquet(s)).to_pandas()["status"].eq("success").sum() for s in shards)
    _assert_scores_equal(local_run / "demo", dst)


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])  # after "pid (comm) state"


def _decode_task_pids() -> list[int]:
    """This test session's worker processes running a decode task now (Ray titles a busy worker by its
    task; the local Ray instance's processes descend from this one), never another session's."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if not (d.name.isdigit() and (d / "cmdline").read_bytes().startswith(b"ray::decode_shard")):
                continue
            pid = int(d.name)
            while pid > 1 and pid != os.getpid():
                pid = _ppid(pid)
            if pid == os.getpid():
                pids.append(int(d.name))
        except (OSError, ValueError, IndexError):  # it ended meanwhile
            continue
    return pids


def test_decode_task_killed_mid_shard_is_retried(local_run, ray_local):
    """SIGKILL a decode task's worker after the first batch: Ray re-runs the generator task, the batches it
    yields again are not scored twice, and every shard commits its keys once, equal to the local run's."""
    from t2i_curate.pipeline.core.layout import RunLayout
    from t2i_curate.pipeline.score.ray_actors import score_on_actors

    if not Path("/proc/self/cmdline").exists():
        pytest.skip("finds the decode task's worker through /proc (Linux)")
    # one decode task at a time, batches of 2: the task is still mid-shard (held back by the driver's
    # backpressure) when the first batch comes back
    cfg, dst = _ray_copy(local_run, "demo-decode-killed", extra=("ray.actors=1", "workers=1", "score.batch_size=2"))
    killed: list[int] = []

    def kill_decode_task(n: int, actors: list) -> None:
        if n == 1:
            pids = _decode_task_pids()
            assert len(pids) == 1, pids
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    shards = RunLayout(dst).finished_downloads()
    res = score_on_actors(cfg, dst, shards, retries=0, on_batch=kill_decode_task)
    assert killed and res.errors == {}, res.errors  # no pass of our own: Ray's task retry recovered it
    assert sum(r["scored"] + r["failed"] for r in res.results.values()) == sum(
        pq.read_table(RunLayout(dst).download_parquet(s)).to_pandas()["status"].eq("success").sum() for s in shards)
    _assert_scores_equal(local_run / "demo", dst)


def test_gpu_decode_is_refused_on_the_actor_path(tmp_path):
    from t2i_curate.pipeline.core.config import load_config
    from t2i_curate.pipeline.core.errors import UserError
    from t2i_curate.pipeline.score.ray_actors import score_on_actors

    cfg = load_config("demo", [f"runs_dir={tmp_path}", "executor=ray", "ray.score_actors=true", "score.decode=gpu"])
    with pytest.raises(UserError, match="score.decode=gpu"):
        score_on_actors(cfg, tmp_path / "demo", [0])


def test_a_failing_shard_writes_nothing_and_the_others_commit(local_run, ray_local):
    from t2i_curate.pipeline.core.layout import RunLayout
    from t2i_curate.pipeline.score.ray_actors import score_on_actors

    cfg, dst = _ray_copy(local_run, "demo-actor-bad-shard", extra=("ray.actors=1",))
    lay = RunLayout(dst)
    shards = lay.finished_downloads()
    bad = shards[0]
    lay.download_parquet(bad).write_bytes(b"not a parquet file")  # the decode task fails reading it
    res = score_on_actors(cfg, dst, shards, retries=1)  # the retry pass (fresh actors) fails it again
    assert list(res.errors) == [bad] and "decode" in res.errors[bad]
    assert not lay.score_parquet(bad).exists() and not lay.embeddings(bad).exists()
    assert sorted(res.results) == shards[1:]
    assert all(lay.score_parquet(s).exists() for s in shards[1:])
