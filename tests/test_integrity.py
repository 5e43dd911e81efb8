"""Integrity: nothing laundered, nothing lost, nothing outside the run folder (the audit's cases).

Each test damages a finished demo run the way a disk, a user or a crash would, and requires that the
damage is found (``curate verify``), repaired by the next run of the stage that owns the file, or
refused with one line, never accepted into the manifest.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import curate

from t2i_curate.pipeline.core.io import sha256_file

N = 40


def _args(runs, name, *extra):
    return ["--set", f"runs_dir={runs}", "--set", f"name={name}", "--set", f"input.demo_size={N}",
            "--set", "download.samples_per_shard=20", "--set", "write.samples_per_shard=10",
            "--set", "download.processes=1", "--set", "download.threads=8", "--set", "workers=1", *extra]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One finished demo run; each test works on a copy (same runs_dir: the demo's URLs stay the same)."""
    runs = tmp_path_factory.mktemp("integrity")
    curate("run", *_args(runs, "base"))
    return runs


@pytest.fixture
def run(base, request):
    name = request.node.name.replace("[", "-").replace("]", "")[:60]
    shutil.copytree(base / "base", base / name, copy_function=shutil.copy2)  # mtimes kept: nothing re-scored
    yield base / name
    shutil.rmtree(base / name, ignore_errors=True)


def _verify(run):
    return curate("verify", run, check=False)


def _manifest(run):
    return json.loads((run / "selected" / "manifest.json").read_text())


def _flip(path, offset):
    b = bytearray(path.read_bytes())
    b[offset] ^= 0xFF
    path.write_bytes(bytes(b))


def _image_member(tar_path, index=1):
    with tarfile.open(tar_path) as tf:
        return [m for m in tf.getmembers() if m.name.endswith(".jpg")][index]


def _no_traceback(p):
    assert "Traceback" not in p.stderr, p.stderr


# --- 1. a damaged curated shard is rewritten, never written into the manifest --------------------------

@pytest.mark.slow  # reruns a stage: in `make test-slow` and CI
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_curated_tar_is_rewritten_not_laundered(run, damage):
    tar = run / "selected" / "00001.tar"
    good = sha256_file(tar)
    if damage == "flip":
        _flip(tar, _image_member(tar).offset_data + 100)
    else:
        os.truncate(tar, tar.stat().st_size // 2)
    assert _verify(run).returncode == 1
    p = curate("run", *_args(run.parent, run.name))
    assert "shard rewritten" in p.stderr
    assert sha256_file(tar) == good  # the same bytes as before the damage: rewritten from the downloads
    assert {e["shard"]: e["sha256"] for e in _manifest(run)["shards"]}["00001"] == good
    assert _verify(run).returncode == 0


@pytest.mark.slow  # reruns a stage: in `make test-slow` and CI
def test_curated_parquet_with_changed_rows_is_rewritten(run):
    """A curated parquet whose values were edited (its footer still claims the planned rows) is rewritten."""
    path = run / "selected" / "00000.parquet"
    t = pq.read_table(path)
    edited = t.set_column(t.column_names.index("caption"), "caption", pa.array(["edited"] * t.num_rows))
    pq.write_table(edited.replace_schema_metadata(t.schema.metadata), path)
    assert _verify(run).returncode == 1  # its sha256 differs from the manifest's
    p = curate("run", *_args(run.parent, run.name))
    assert "does not hold the rows it records" in p.stderr
    assert pq.read_table(path).column("caption").to_pylist() != ["edited"] * t.num_rows
    assert _verify(run).returncode == 0


# --- 2. verify misses nothing and never crashes ----------------------------------------------------------

def test_verify_reports_a_missing_manifest(run):
    (run / "selected" / "manifest.json").unlink()
    p = _verify(run)
    assert p.returncode == 1 and "manifest.json is missing" in p.stderr


def test_verify_reports_an_invalid_manifest_without_traceback(run):
    (run / "selected" / "manifest.json").write_text("{not json")
    p = _verify(run)
    assert p.returncode == 1 and "unreadable manifest" in p.stderr
    _no_traceback(p)


def test_verify_reports_deleted_curated_shards(run):
    for f in (run / "selected").glob("0*.*"):
        f.unlink()
    p = _verify(run)
    assert p.returncode == 1 and "missing (listed in the manifest)" in p.stderr


@pytest.mark.slow  # reruns a stage: in `make test-slow` and CI
def test_verify_and_write_catch_a_changed_download_image(run):
    """img2dataset's sha256 is of the bytes it fetched, before its resize and re-encode; the score stage
    records the stored bytes' sha256 (image_sha256), which verify and write check."""
    tar = run / "download" / "00000.tar"
    dec = pq.read_table(run / "selected" / "decisions.parquet").to_pylist()
    chosen = {d["key"] for d in dec if d["state"] == "selected"}
    with tarfile.open(tar) as tf:
        m = next(m for m in tf.getmembers() if m.name.endswith(".jpg") and m.name.split(".")[0] in chosen)
    st = tar.stat()
    _flip(tar, m.offset_data + m.size // 2)
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))  # bit rot: size and mtime unchanged, nothing re-scored
    key = m.name.split(".")[0]
    p = _verify(run)
    assert p.returncode == 1 and "differ from the bytes the score stage read" in p.stderr and key in p.stderr
    for f in (run / "selected").glob("0*.*"):  # the curated copy of that image must be made again
        f.unlink()
    p = curate("write", *_args(run.parent, run.name), check=False)
    assert p.returncode == 1 and "differ from the bytes that were scored" in p.stderr and key in p.stderr
    assert not list((run / "selected").glob(f"*{key}*"))


# --- 3. an output that cannot be read is redone by its stage ----------------------------------------------

@pytest.mark.slow  # reruns a stage: in `make test-slow` and CI
def test_truncated_scores_are_rescored(run):
    path = run / "scores" / "00000.parquet"
    good = pq.read_table(path).drop_columns([]).to_pylist()
    os.truncate(path, 200)
    p = curate("run", *_args(run.parent, run.name))
    assert "unreadable, scored again" in p.stderr
    assert pq.read_table(path).to_pylist() == good
    assert _verify(run).returncode == 0


@pytest.mark.slow  # reruns a stage: in `make test-slow` and CI
@pytest.mark.parametrize("damage", ["truncate", "foreign"])
def test_unreadable_decisions_and_curated_parquet_are_redone(run, damage):
    dec, cur = run / "selected" / "decisions.parquet", run / "selected" / "00000.parquet"
    good_dec, good_cur = pq.read_table(dec), sha256_file(cur)
    if damage == "truncate":
        os.truncate(dec, 300)
        os.truncate(cur, 500)
    else:  # a parquet of another schema where ours belongs
        pq.write_table(pa.table({"something": [1, 2]}), dec)
        pq.write_table(pa.table({"else": ["x"]}), cur)
    v = _verify(run)
    assert v.returncode == 1
    _no_traceback(v)
    p = curate("run", *_args(run.parent, run.name))
    _no_traceback(p)
    assert pq.read_table(dec).equals(good_dec) and sha256_file(cur) == good_cur
    assert _verify(run).returncode == 0


# --- 4. a full disk: the old catalog stays whole, one line, finished work kept -----------------------------

@contextlib.contextmanager
def _small_disk(path, size="4m"):
    """A small tmpfs at ``path`` (root only; skipped elsewhere)."""
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        pytest.skip("mounting a small tmpfs needs root on Linux")
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder, leave=0):
    """Fill the disk of ``folder`` up to ``leave`` bytes free."""
    free = shutil.disk_usage(folder).free - leave
    with open(folder / f"filler-{time.monotonic_ns()}", "wb") as f:
        with contextlib.suppress(OSError):
            while free > 0:
                n = min(free, 1 << 20)
                f.write(b"\0" * n)
                free -= n


def _views(db):
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        return {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    finally:
        con.close()


@pytest.mark.slow  # reruns a stage: in `make test-slow` and CI
@pytest.mark.parametrize("leave", [0, 20_000, 60_000, 150_000, 300_000])
def test_catalog_refresh_on_a_full_disk_keeps_the_old_catalog(base, tmp_path, leave):
    """However little room is left, the catalog afterwards is the old one or a complete new one."""
    from t2i_curate.pipeline.core.catalog import refresh_catalog

    with _small_disk(tmp_path / "disk", "16m") as disk:
        run = disk / "base"
        shutil.copytree(base / "base", run, copy_function=shutil.copy2,
                        ignore=shutil.ignore_patterns("*.tar", "report", "embeddings"))
        refresh_catalog(run)
        before, views = sha256_file(run / "catalog.duckdb"), _views(run / "catalog.duckdb")
        assert len(views) >= 5
        _fill(disk, leave)
        try:
            refresh_catalog(run)
        except OSError:
            assert sha256_file(run / "catalog.duckdb") == before
        assert _views(run / "catalog.duckdb") == views
        assert not [f for f in run.iterdir() if f.name.startswith(".tmp-")]
        _fill(disk)
        p = curate("report", run, check=False)  # the command: one line naming the disk, exit 1
        assert p.returncode == 1 and "no space left on the disk of" in p.stderr, p.stderr
        _no_traceback(p)


@pytest.mark.slow  # reruns a stage: in `make test-slow` and CI
def test_download_on_a_full_disk_stops_with_one_line(base, tmp_path):
    with _small_disk(tmp_path / "disk", "24m") as disk:
        first = curate("download", *_args(disk, "a"), check=False)
        assert first.returncode == 0, first.stderr  # the demo's images are made and served from this disk
        _fill(disk, leave=150_000)
        p = curate("run", *_args(disk, "b"), check=False)
        assert p.returncode == 1, p.stderr
        assert "no space left on the disk of" in p.stderr
        assert "score:" not in p.stderr  # it never went on to score
        assert not (disk / "b" / "scores").exists()


# --- 6. run names are names --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["..", "", "/abs", "../x", "a/b", ".hidden"])
def test_run_name_is_a_name(tmp_path, name):
    runs = tmp_path / "runs"
    runs.mkdir()
    (tmp_path / ".tmp-keep").write_text("not ours")
    p = curate("download", *_args(runs, name), check=False)
    assert p.returncode == 2 and "run name" in p.stderr
    assert sorted(f.name for f in tmp_path.iterdir()) == [".tmp-keep", "runs"]
    assert not list(runs.iterdir())


# --- 11. leftovers ---------------------------------------------------------------------------------------------

def test_report_removes_leftovers_under_its_lock(run):
    thumbs = run / "report" / "thumbs"
    thumbs.mkdir(parents=True, exist_ok=True)
    (thumbs / ".tmp-1234abcd-x.jpg").write_bytes(b"half")
    (run / "report" / ".tmp-9876abcd-index.html").write_text("half")
    curate("report", run)
    assert not [p for p in (run / "report").rglob(".tmp-*")]


def test_a_zombie_lock_holder_counts_as_dead(tmp_path):
    """A killed process not yet reaped by its parent still answers kill(pid, 0)."""
    import socket

    from t2i_curate.pipeline.core.lock import run_lock

    if not os.path.exists("/proc/self/stat"):
        pytest.skip("zombie detection reads /proc")
    child = subprocess.Popen(["sleep", "30"])
    child.kill()
    deadline = time.time() + 5
    while time.time() < deadline:  # wait for the zombie state; never reap it before the lock is taken
        with open(f"/proc/{child.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.01)
    run = tmp_path / "r"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": child.pid, "started": "x",
                                           "command": "curate run"}))
    try:
        t0 = time.time()
        with run_lock(run, "curate test"):
            assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
        assert time.time() - t0 < 1
    finally:
        child.wait()


@pytest.mark.slow  # reruns a stage: in `make test-slow` and CI
def test_download_leaves_nothing_in_the_system_temporary_folder(tmp_path):
    """img2dataset imports wandb, whose import makes two folders per process in the temporary folder."""
    tmp = tmp_path / "systmp"
    tmp.mkdir()
    curate("download", *_args(tmp_path / "runs", "w", "--set", "input.demo_size=20"), env={"TMPDIR": str(tmp)})
    assert not [p.name for p in tmp.iterdir() if "wandb" in p.name]


# --- the restructure changed no output -----------------------------------------------------------------------

# decisions (key, state, rule) and every curated member but the json (which holds the demo server's URL,
# whose port follows the temporary folder), as main before the restructure into role packages wrote them
DEMO_DIGEST = "c4eee6ac23c73d39cf8b2340a052b9fd3b365dd737ef21e87e4dda2653048a22"


def _demo_digest(run):
    import hashlib

    h = hashlib.sha256()
    for d in pq.read_table(run / "selected" / "decisions.parquet", columns=["key", "state", "rule"]).to_pylist():
        h.update(repr(sorted(d.items())).encode())
    for tar in sorted((run / "selected").glob("0*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if not m.name.endswith(".json"):
                    h.update(m.name.encode() + hashlib.sha256(tf.extractfile(m).read()).digest())
    return h.hexdigest()


def test_demo_decisions_and_curated_bytes_are_pinned(base):
    """The same decisions and byte-identical curated images and captions as before the restructure."""
    assert _demo_digest(base / "base") == DEMO_DIGEST
