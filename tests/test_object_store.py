"""Run folders on an object store: a real S3-compatible server (moto's server mode) on 127.0.0.1.

The commit protocol (temporary key, then the final key; completion markers last; leftovers removed),
the run lock's exclusive create, the demo end to end with the local run's exact outputs, and SIGKILL
during download and write followed by a rerun, with nothing lost or duplicated.
"""

import hashlib
import json
import os
import socket

import pytest
from conftest import curate

from t2i_curate.pipeline.core.io import (
    TMP_MARK,
    as_path,
    atomic_path,
    clean_tmp,
    duck_connect,
    file_stamp,
    file_stats,
    is_remote,
    read_table,
    sha256_file,
    shard_ids,
    sql_path,
    write_json,
    write_parquet,
)


def _tmp_keys(root) -> list[str]:
    return [f for f in root.fs.find(root.path) if f.rsplit("/", 1)[-1].startswith(TMP_MARK)]


def test_commit_protocol_on_s3(s3_store):
    import pyarrow as pa

    from t2i_curate.pipeline.core.tars import read_samples, write_samples

    root = as_path(f"{s3_store}/unit")
    assert is_remote(root) and str(root).startswith("s3://")
    write_json(root / "a" / "00000.json", {"x": 1})
    assert json.loads((root / "a" / "00000.json").read_text()) == {"x": 1}
    with pytest.raises(RuntimeError), atomic_path(root / "a" / "00001.json") as tmp:
        tmp.write_text("half")  # the temporary key exists, the final one must never appear
        assert tmp.exists() and tmp.name.startswith(TMP_MARK)
        raise RuntimeError("killed")
    assert not (root / "a" / "00001.json").exists()
    assert _tmp_keys(root) == []
    (root / "a" / f"{TMP_MARK}dead-00002.json").write_text("left by a killed run")
    assert shard_ids(root / "a", ".json") == [0]  # readers ignore temporaries
    assert clean_tmp(root) == 1 and _tmp_keys(root) == []
    table = pa.table({"key": ["00000000", "00000001"], "v": [1.5, 2.5]})
    write_parquet(root / "t" / "00000.parquet", table)
    assert read_table(root / "t" / "00000.parquet").equals(table)
    con = duck_connect(root)
    assert con.execute("SELECT sum(v) FROM read_parquet(?)", [sql_path(root / "t" / "00000.parquet")]
                       ).fetchall() == [(4.0,)]
    write_samples(root / "tars" / "00000.tar", [("00000000", [("jpg", b"abc"), ("txt", b"cat")])])
    assert read_samples(root / "tars" / "00000.tar") == {"00000000": [("jpg", b"abc"), ("txt", b"cat")]}
    assert len(sha256_file(root / "tars" / "00000.tar")) == 64


def test_run_lock_is_exclusive_on_s3(s3_store):
    from t2i_curate.pipeline.core.lock import RunFolderError, run_lock

    run = as_path(f"{s3_store}/locked")
    with run_lock(run, "run") as lock:
        assert json.loads(lock.read_text())["command"] == "run"
        with pytest.raises(RunFolderError, match="in use by `run`"), run_lock(run, "score"):
            pass
    assert not (run / ".lock").exists()
    # a lock whose process is gone (this host, dead pid) is taken over; the new holder's lock remains ours
    (run / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 2 ** 22 + 12345,
                                           "command": "run"}))
    with run_lock(run, "select") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_lock_without_exclusive_create_is_best_effort(caplog):
    """A filesystem that cannot create exclusively still refuses a second holder it can see."""
    from t2i_curate.pipeline.core.lock import _create_lock_racy

    lock = as_path("memory://t2i-lock-test/run/.lock")
    assert _create_lock_racy(lock, b"first", NotImplementedError("mode x"))
    assert not _create_lock_racy(lock, b"second", NotImplementedError("mode x"))
    assert lock.read_bytes() == b"first"
    assert "best effort" in caplog.text


def test_missing_bucket_is_a_clear_error(s3_store):
    p = curate("run", "--set", "runs_dir=s3://no-such-bucket-t2i/runs", check=False)
    assert p.returncode == 2, p.stderr
    assert "no-such-bucket-t2i" in p.stderr and "not writable" in p.stderr


def _fake_scored_run(root, settings) -> None:
    """Three finished download shards; scores current for shard 0, made with other settings for 1, none
    for 2."""
    import pyarrow as pa

    from t2i_curate.pipeline.core.layout import RunLayout
    from t2i_curate.pipeline.core.scores import META_KEY

    lay = RunLayout(root)
    for s in range(3):
        write_parquet(lay.download_parquet(s), pa.table({"key": [f"{s:05d}0000"]}))
        write_json(lay.download_tar(s), {"not": "a tar, only its size and time count"})
        write_json(lay.download_stats(s), {"successes": 1})
    for s, settings_of in ((0, settings), (1, {"other": True})):
        info = {"source_stamp": file_stamp(lay.download_parquet(s), lay.download_tar(s)), "settings": settings_of}
        write_parquet(lay.score_parquet(s), pa.table({"key": [f"{s:05d}0000"]}).replace_schema_metadata(
            {META_KEY: json.dumps(info).encode()}))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_current_shards_from_one_listing(where, s3_store, tmp_path, monkeypatch):
    """Score stamps each shard per file (a HEAD each on a store); select and a resumed score read the
    same stamps from one listing of the download folder, so the two must agree, and on a store no
    download file is asked about one by one."""
    from t2i_curate.pipeline.core.layout import RunLayout
    from t2i_curate.pipeline.core.scores import current_shards

    root = as_path(tmp_path / "run" if where == "local" else f"{s3_store}/stamps")
    settings = {"scorers": ["resolution"]}
    _fake_scored_run(root, settings)
    lay = RunLayout(root)
    stats = file_stats(lay.download)
    assert sorted(stats) == sorted(f"{s:05d}{x}" for s in range(3) for x in (".parquet", ".tar", "_stats.json"))
    for s in range(3):
        files = lay.download_parquet(s), lay.download_tar(s)
        assert file_stamp(*files, stats=stats) == file_stamp(*files)
        # the stamp's old form (size and st_mtime_ns of each file's stat): scores made before still match
        old = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
        assert file_stamp(*files) == hashlib.sha256(old.encode()).hexdigest()[:16]
    if where == "s3":
        asked = []
        fs = root.fs
        info = fs.info
        monkeypatch.setattr(fs, "info", lambda path, **kw: asked.append(path) or info(path, **kw))
    assert current_shards(lay, [0, 1, 2], settings) == {0}
    if where == "s3":
        assert not [p for p in asked if "/download/" in p], asked
    write_json(lay.download_tar(0), {"a": "re-downloaded shard, another size"})
    assert current_shards(lay, [0, 1, 2], settings) == set()


def test_unreadable_scores_count_as_not_current(tmp_path, caplog):
    from t2i_curate.pipeline.core.layout import RunLayout
    from t2i_curate.pipeline.core.scores import current_shards

    settings = {"scorers": ["resolution"]}
    _fake_scored_run(tmp_path / "run", settings)
    lay = RunLayout(tmp_path / "run")
    lay.score_parquet(0).write_bytes(b"PAR1 truncated")  # its task redoes it; the check goes on
    assert current_shards(lay, [0, 1, 2], settings) == set()
    assert "scores of shard 0 unreadable" in caplog.text


# --- the demo end to end, and SIGKILL during download and write (slow: several small runs) -----------

def _args(runs, name):
    from test_kill import _args as kill_args

    return kill_args(runs, name)


def _snapshot(run):
    """Decisions, scores by key and the curated shards' sha256, read through fsspec for a remote run."""
    run = as_path(run)
    dec = read_table(run / "selected" / "decisions.parquet").to_pylist()
    scores = {}
    for s in shard_ids(run / "scores", ".parquet"):
        for r in read_table(run / "scores" / f"{s:05d}.parquet").to_pylist():
            scores[r["key"]] = r
    shards = {f"{s:05d}.tar": _shard_digest(run / "selected" / f"{s:05d}.tar")
              for s in shard_ids(run / "selected", ".parquet")}
    return dec, scores, shards


def _shard_digest(tar) -> str:
    """sha256 over a curated tar's members, the json's ``url`` left out: the demo's URLs name the port its
    server had when the run's URL list was made, which differs between a local and an S3 runs folder."""
    import hashlib

    from t2i_curate.pipeline.core.tars import read_samples

    h = hashlib.sha256()
    for key, parts in sorted(read_samples(tar).items()):
        for ext, data in parts:
            if ext == "json":
                meta = json.loads(data)
                meta.pop("url")
                data = json.dumps(meta, sort_keys=True).encode()
            h.update(f"{key}.{ext}:{len(data)}:".encode() + data)
    return h.hexdigest()


@pytest.fixture(scope="module")
def s3_reference(s3_store, tmp_path_factory):
    """The same small demo run locally and on S3; the S3 one is the kill tests' source."""
    local = tmp_path_factory.mktemp("s3ref")
    curate("run", *_args(local, "ref"))
    curate("run", *_args(f"{s3_store}/runs", "ref"))
    return _snapshot(local / "ref"), f"{s3_store}/runs", local


@pytest.mark.slow
def test_demo_on_s3_gives_the_local_outputs(s3_reference, tmp_path):
    ref, runs, _ = s3_reference
    run = as_path(f"{runs}/ref")
    assert _snapshot(run) == ref  # decisions, every score, and the curated samples
    # and byte-identical tars on the store: key order, fixed mtime and mode, as locally
    tar = run / "selected" / "00000.tar"
    assert sha256_file(tar) == json.loads((run / "selected" / "manifest.json").read_text())["shards"][0]["sha256"]
    curate("verify", run)
    assert _tmp_keys(run) == [] and not (run / ".lock").exists()
    assert not (run / "download" / "_tmp").exists()  # img2dataset's scratch input shards are gone
    n = len(ref[0])
    out = curate("query", "--run", run, "--format", "csv", "SELECT count(*) AS n FROM decisions").stdout
    assert out.split()[-1] == str(n)
    # catalog.duckdb on the store: its views name s3:// parquet, readable once the filesystem is registered
    db = tmp_path / "catalog.duckdb"
    run.fs.get_file((run / "catalog.duckdb").path, str(db))
    con = duck_connect(run, database=str(db))
    assert con.execute("SELECT count(*) FROM decisions").fetchall() == [(n,)]
    assert (run / "report" / "index.html").exists()


def _store_count(folder, pattern):
    folder = as_path(folder)
    return lambda: len(folder.fs.glob(f"{folder.path}/{pattern}"))


S3_KILLS = {  # stage -> (label, folder, glob, count): SIGKILL once that many keys match
    "download": [("2 shards", "download", "*_stats.json", 2)],
    "score": [("2 shards", "scores", "0*.parquet", 2)],
    "write": [("first temp", "selected", f"{TMP_MARK}*", 1), ("1 shard", "selected", "0*.parquet", 1)],
}


@pytest.mark.slow
@pytest.mark.parametrize("stage,point", [(s, i) for s in S3_KILLS for i in range(len(S3_KILLS[s]))],
                         ids=[f"{s}-{p[0]}" for s in S3_KILLS for p in S3_KILLS[s]])
def test_kill_on_s3_and_rerun_loses_and_duplicates_nothing(s3_reference, stage, point):
    from test_kill import _kill_when

    ref, runs, _ = s3_reference
    name = f"k-{stage}-{point}"
    run = as_path(f"{runs}/{name}")
    fs = run.fs
    if stage == "write":  # download, scores and decisions of the reference; no curated shards
        src = as_path(f"{runs}/ref")
        fs.copy(src.path, run.path, recursive=True)
        fs.rm([f for f in fs.find((run / "selected").path) if f.rsplit("/", 1)[-1][:1] in "0m"])
        fs.rm([(run / "config.yaml").path, (run / "catalog.duckdb").path])
    if stage == "score":  # the reference's download shards only: the rerun prepares the input again and
        # its download finds every shard there, then score resumes after the two it had committed
        fs.copy(as_path(f"{runs}/ref/download").path, (run / "download").path, recursive=True)
    label, folder, pattern, count = S3_KILLS[stage][point]
    ready = _store_count(run / folder, pattern)
    assert _kill_when([stage, *_args(runs, name)], lambda: ready() >= count), f"never reached {label}"
    curate("run", *_args(runs, name))
    curate("verify", run)
    assert _snapshot(run) == ref
    assert _tmp_keys(run) == []


@pytest.mark.slow
def test_ray_actor_scoring_and_ray_write_on_s3(s3_reference, ray_local):
    """The cluster shape: Ray decode tasks and model actors read the download shards from the store and
    commit scores there; Ray write tasks read the plan from the store. Same results as the local run."""
    pytest.importorskip("ray")
    from test_ray import assert_rows_close

    from t2i_curate.pipeline.core.config import load_config
    from t2i_curate.pipeline.core.layout import RunLayout
    from t2i_curate.pipeline.report.verify import verify_run
    from t2i_curate.pipeline.score.stage import score_stage
    from t2i_curate.pipeline.select.stage import select_stage
    from t2i_curate.pipeline.write.stage import write_stage

    (ref_dec, ref_scores, ref_shards), runs, _ = s3_reference
    run = as_path(f"{runs}/ray")
    fs = run.fs
    fs.copy(as_path(f"{runs}/ref/download").path, (run / "download").path, recursive=True)
    overrides = [a for a in _args(runs, "ray") if a != "--set"] + [
        "download.allow_private_addresses=true", "executor=ray", "workers=2", "ray.score_actors=true"]
    cfg = load_config("demo", overrides)
    shards = RunLayout(run).finished_downloads()
    assert score_stage(cfg, run, shards)["scored"] > 0
    select_stage(cfg, run)
    write_stage(cfg, run)
    dec, scores, got_shards = _snapshot(run)
    assert dec == ref_dec and got_shards == ref_shards
    assert scores.keys() == ref_scores.keys()
    for k in scores:
        assert_rows_close(ref_scores[k], scores[k], k)
    assert verify_run(run) == [] and _tmp_keys(run) == []


@pytest.mark.slow
def test_semantic_dedup_reads_embeddings_from_s3(s3_reference):
    """SemDeDup (k-means over the saved embeddings, joined to the score parquet by file name) on a run on the
    store selects exactly as on the local run. Last in this module: it re-selects the reference runs."""
    _, runs, local = s3_reference
    run = as_path(f"{runs}/ref")
    sem = ("--set", "select.dedup.semantic.enabled=true", "--set", "select.dedup.semantic.threshold=0.5")
    curate("select", *_args(local, "ref"), *sem)
    curate("select", *_args(runs, "ref"), *sem)

    def meta(r):
        from t2i_curate.pipeline.core.io import read_schema

        return json.loads(read_schema(as_path(r) / "selected" / "decisions.parquet").metadata[b"t2i_curate"])

    m_local, m_s3 = meta(local / "ref"), meta(run)
    assert m_local["near_dedup"]["semantic_duplicate"]["candidates"] > 0
    assert m_s3["near_dedup"]["semantic_duplicate"] == m_local["near_dedup"]["semantic_duplicate"]
    dec = read_table(run / "selected" / "decisions.parquet").to_pylist()
    assert dec == read_table(local / "ref" / "selected" / "decisions.parquet").to_pylist()
