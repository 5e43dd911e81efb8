"""One writer per run folder: a second is refused at once (exit 2, naming the holder); stale locks are taken over."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import curate, small_demo_args

from t2i_curate.pipeline.core.lock import RunFolderError, run_lock
from t2i_curate.pipeline.download.demo import serve_folder

LOCK_NAME = ".lock"  # RunLayout.lock


def _flat(text: str) -> str:
    """Log lines as one line (rich wraps long messages)."""
    return " ".join(text.split())


def _write_lock(run, pid, host=None, command="curate run"):
    run.mkdir(parents=True, exist_ok=True)
    lock = run / LOCK_NAME
    lock.write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid,
                                "started": "2026-01-01T00:00:00+00:00", "command": command}))
    return lock


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_second_holder_refused_naming_the_first(tmp_path):
    run = tmp_path / "run"
    with run_lock(run, "curate run") as lock:
        held = json.loads(lock.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["command"] == "curate run"
        with pytest.raises(RunFolderError) as e:
            with run_lock(run, "curate score"):
                pass
        msg = str(e.value)
        assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg and "`curate run`" in msg
        assert held["started"] in msg and str(lock) in msg
        assert json.loads(lock.read_text()) == held  # the refused one leaves the holder's lock alone
    assert not lock.exists()


def test_stale_lock_of_dead_process_taken_over(tmp_path, caplog):
    run = tmp_path / "run"
    dead = _dead_pid()
    lock = _write_lock(run, dead)
    with caplog.at_level(logging.WARNING, logger="t2i_curate.pipeline.core.lock"):
        with run_lock(run, "curate score"):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text and "taken over" in caplog.text and f"pid {dead}" in caplog.text
    assert not lock.exists()


def test_lock_of_other_host_never_taken_over(tmp_path):
    run = tmp_path / "run"
    lock = _write_lock(run, _dead_pid(), host="elsewhere.example")
    with pytest.raises(RunFolderError, match="another host is never taken over"):
        with run_lock(run, "curate score"):
            pass
    assert json.loads(lock.read_text())["host"] == "elsewhere.example"


def test_garbage_lock_taken_over_only_when_old(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    lock = run / LOCK_NAME
    lock.write_text("")  # a holder that has created the file but not written it yet
    with pytest.raises(RunFolderError, match="being locked by another process"):
        with run_lock(run, "curate score"):
            pass
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with caplog.at_level(logging.WARNING, logger="t2i_curate.pipeline.core.lock"):
        with run_lock(run, "curate score"):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "unreadable" in caplog.text and "taken over" in caplog.text
    assert not lock.exists()


def test_release_keeps_a_lock_that_is_not_ours(tmp_path):
    run = tmp_path / "run"
    with run_lock(run, "curate run") as lock:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "command": "curate run"}))
    assert lock.exists()


def test_cli_writer_refused_at_once(tmp_path):
    runs = tmp_path / "runs"
    lock = _write_lock(runs / "demo", os.getpid())
    for cmd in ("run", "score", "select"):
        t = time.time()
        r = curate(cmd, *small_demo_args(runs), check=False)
        assert r.returncode == 2, (cmd, r.stderr)
        err = _flat(r.stderr)
        assert f"pid {os.getpid()}" in err and socket.gethostname() in err and "in use by" in err, err
        assert "Traceback" not in r.stderr and time.time() - t < 30
    assert not (runs / "_demo").exists()  # refused before the demo server started
    assert sorted(p.name for p in (runs / "demo").iterdir()) == [LOCK_NAME]  # nothing else touched
    assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_cli_readers_take_no_lock(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    runs = tmp_path / "runs"
    _write_lock(runs / "demo", os.getpid())
    (runs / "demo" / "selected").mkdir()  # a run table: `query` refuses a folder that holds none
    pq.write_table(pa.table({"key": ["0"], "state": ["selected"], "rule": pa.array([None], pa.string()),
                             "error": pa.array([None], pa.string()), "failed_stage": pa.array([None], pa.string())}),
                   runs / "demo" / "selected" / "decisions.parquet")
    for args in (["verify"], ["query", "SELECT 1 AS x"], ["funnel"]):
        r = curate(*args, "--set", f"runs_dir={runs}", "--set", "name=demo", check=False)
        assert "in use by" not in _flat(r.stderr), (args, r.stderr)
    r = curate("query", "SELECT 1 AS x", "--run", runs / "demo", "--format", "json")
    assert json.loads(r.stdout) == {"x": 1}


def test_cli_lock_removed_after_command(tmp_path):
    site = tmp_path / "site"
    (site / "img").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (300, 300), "red").save(site / "img" / "a.jpg")
    runs = tmp_path / "runs"
    stale = _write_lock(runs / "t", _dead_pid())
    with serve_folder(site) as base:
        urls = tmp_path / "u.csv"
        urls.write_text(f"URL,TEXT\n{base}/img/a.jpg,a red square image\n")
        r = curate("download", "--set", f"runs_dir={runs}", "--set", "name=t", "--urls", urls,
                   "--set", "download.processes=1", "--set", "workers=1")
    assert "stale lock" in _flat(r.stderr) and "taken over" in _flat(r.stderr)
    assert not stale.exists() and (runs / "t" / "download").is_dir()
    r = curate("select", "--set", f"runs_dir={runs}", "--set", "name=t", "--urls", urls, check=False)
    assert r.returncode != 0 and "in use by" not in _flat(r.stderr)
    assert not stale.exists()
