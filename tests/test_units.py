import duckdb
import pytest

from t2i_curate.filters.base import Batch
from t2i_curate.filters.resolution import ResolutionScorer
from t2i_curate.filters.rules import decision_sql
from t2i_curate.pipeline.core.config import Rule
from t2i_curate.pipeline.core.io import atomic_path
from t2i_curate.pipeline.core.tars import safe_member_name


def test_resolution_scorer():
    rows = [{"original_width": 1200, "original_height": 300}, {"original_width": None, "original_height": 5}]
    out = ResolutionScorer().score(Batch(rows))
    assert out["shorter_side"] == [300, None]
    assert out["aspect_ratio"][0] == pytest.approx(4.0)
    assert out["megapixels"][0] == pytest.approx(0.36)


def test_first_failing_rule_is_recorded():
    con = duckdb.connect()
    con.execute("""CREATE VIEW samples AS SELECT * FROM (VALUES
        ('a', 'success', NULL, 'ok', NULL, 100, 1.0),
        ('b', 'success', NULL, 'ok', NULL, 100, 5.0),
        ('c', 'success', NULL, 'ok', NULL, 900, 5.0),
        ('d', 'success', NULL, 'ok', NULL, 900, 1.0),
        ('e', 'failed_to_download', 'HTTP 404', NULL, NULL, NULL, NULL),
        ('f', 'success', NULL, 'failed', 'decode: truncated', NULL, NULL),
        ('g', 'success', NULL, 'ok', NULL, NULL, 1.0))
        t(key, status, error_message, score_status, score_error, shorter_side, aspect_ratio)""")
    rules = [Rule(name="size", keep="shorter_side >= 256"), Rule(name="aspect", keep="aspect_ratio <= 3")]
    got = {r[0]: r[1:5] for r in con.execute(decision_sql(rules)).fetchall()}  # no dedup: duplicate_of NULL
    assert got["a"] == ("dropped", "size", None, None)
    assert got["b"] == ("dropped", "size", None, None)  # first rule wins
    assert got["c"] == ("dropped", "aspect", None, None)
    assert got["d"] == ("selected", None, None, None)
    assert got["e"] == ("failed", None, "HTTP 404", "download")
    assert got["f"] == ("failed", None, "decode: truncated", "score")
    assert got["g"] == ("dropped", "size", None, None)  # NULL counts as not kept


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "x.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,ok", [("0001.jpg", True), ("a/b.jpg", True), ("../x.jpg", False),
                                     ("/etc/passwd", False), ("a/../../x", False), ("", False)])
def test_safe_member_name(name, ok):
    assert (safe_member_name(name) is not None) == ok


def test_demo_port_is_stable_and_outside_the_ephemeral_ports(tmp_path, caplog, monkeypatch):
    """The demo's URLs carry its port, so a port taken by any socket changes every shard's metadata (CI saw
    kill-and-rerun outputs differ that way): the port must be stable per folder and never one the OS
    gives to outgoing connections."""
    import socket
    from pathlib import Path

    from t2i_curate.pipeline.download.demo import _preferred_port, serve_folder

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert _preferred_port(Path("runs")) == _preferred_port(tmp_path / "runs")  # relative or not: one port
    ports = {_preferred_port(tmp_path / f"runs{i}" / "_demo") for i in range(500)}
    assert len(ports) > 400 and min(ports) >= 20000 and max(ports) < 32000
    proc = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(proc.read_text().split()[0]) if proc.exists() else 32768
    if low >= 32000:  # Linux's default 32768; a host tuned lower can't be helped by any fixed range
        assert max(ports) < low, f"demo ports reach the ephemeral range starting at {low}"
    # taken anyway (another program): served elsewhere, with a warning that says the URLs change
    port = _preferred_port(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        with serve_folder(tmp_path, port=port) as base:
            assert not base.endswith(f":{port}")
    assert any(f"port {port} is taken" in r.getMessage() and "URLs change" in r.getMessage() for r in caplog.records)
