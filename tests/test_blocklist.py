"""Blocklists (pipeline/blocklist.py): url / domain lists before download, image-hash lists at select."""

import hashlib
import io
import json

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import curate
from PIL import Image

from t2i_curate.filters.blocklist import (
    BlocklistError,
    blocked_urls,
    check_blocklists,
    hash_rules,
    load,
)
from t2i_curate.filters.phash import phash_hex
from t2i_curate.pipeline.core.config import ConfigError, load_config
from t2i_curate.pipeline.download.demo import _DemoHandler, serve_folder
from t2i_curate.pipeline.runfolder import RunFolderError, prepare_run


def _cfg(tmp_path, lists, *more):
    items = ", ".join("{" + ", ".join(f"{k}: '{v}'" for k, v in b.items()) + "}" for b in lists)
    return load_config("demo", [f"runs_dir={tmp_path / 'runs'}", "name=b", f"blocklists=[{items}]", *more])


# ---- reading and checking lists --------------------------------------------------------------------

def test_malformed_md5_line_is_reported_with_file_and_line(tmp_path):
    p = tmp_path / "md5.txt"
    p.write_text("# removal list\n" + "a" * 32 + "\n\n" + "b" * 31 + "\n" + "C" * 32 + "  # upper case is fine\n")
    cfg = _cfg(tmp_path, [{"name": "m", "path": p, "kind": "md5"}])
    with pytest.raises(BlocklistError, match=rf"{p}:4: expected 32 hex digits, got something else") as e:
        check_blocklists(cfg)
    assert "1 malformed entry" in str(e.value) and ":5:" not in str(e.value)


@pytest.mark.parametrize("kind,line", [("sha256", "xyz"), ("phash", "0123456789abcdeg"), ("domain", "http://x.com/"),
                                       ("url", "example.com/a.jpg"), ("url", "http://x.com/a b.jpg")])
def test_malformed_entries_of_each_kind(tmp_path, kind, line):
    p = tmp_path / "list.txt"
    p.write_text(f"# ok\n{line}\n")
    with pytest.raises(BlocklistError, match=rf"{p}:2: expected"):
        load(_cfg(tmp_path, [{"name": "l", "path": p, "kind": kind}]).blocklists[0])


def test_parquet_lists_and_bad_bytes(tmp_path):
    p = tmp_path / "hosts.parquet"
    pq.write_table(pa.table({"host": ["Example.COM", "*.bad.org", "not a host"]}), p)
    with pytest.raises(BlocklistError, match=rf"{p}: row 3: expected a host name"):
        load(_cfg(tmp_path, [{"name": "d", "path": p, "kind": "domain"}]).blocklists[0])
    pq.write_table(pa.table({"host": ["Example.COM", "*.bad.org"], "why": ["a", "b"]}), p)
    with pytest.raises(BlocklistError, match="expected one column"):
        load(_cfg(tmp_path, [{"name": "d", "path": p, "kind": "domain"}]).blocklists[0])
    got = load(_cfg(tmp_path, [{"name": "d", "path": p, "kind": "domain", "column": "host"}]).blocklists[0])
    assert got.entries == ("example.com", "bad.org") and len(got.sha256) == 64
    t = tmp_path / "bytes.txt"
    t.write_bytes(b"example.com\n\xff\xfe.com\n")
    with pytest.raises(BlocklistError, match=rf"{t}:2: .*not UTF-8"):
        load(_cfg(tmp_path, [{"name": "d", "path": t, "kind": "domain"}]).blocklists[0])


def test_config_checks(tmp_path):
    p = tmp_path / "l.txt"
    p.write_text("0123456789abcdef\n")
    with pytest.raises(ConfigError, match="max_distance applies to kind phash only"):
        _cfg(tmp_path, [{"name": "s", "path": p, "kind": "sha256", "max_distance": 2}])
    with pytest.raises(ConfigError, match="repeated"):
        _cfg(tmp_path, [{"name": "s", "path": p, "kind": "phash"}, {"name": "s", "path": p, "kind": "phash"}])
    with pytest.raises(BlocklistError, match="needs the phash scorer"):  # refused before any work
        check_blocklists(_cfg(tmp_path, [{"name": "p", "path": p, "kind": "phash"}], "score.scorers=[resolution]"))
    check_blocklists(_cfg(tmp_path, [{"name": "p", "path": p, "kind": "phash"}], "score.scorers=[resolution, phash]"))
    m = tmp_path / "m.txt"
    m.write_text("d41d8cd98f00b204e9800998ecf8427e\n")
    with pytest.raises(BlocklistError, match="records only the sha256"):
        check_blocklists(_cfg(tmp_path, [{"name": "m", "path": m, "kind": "md5"}]))
    with pytest.raises(BlocklistError, match="no such file"):
        check_blocklists(_cfg(tmp_path, [{"name": "x", "path": tmp_path / "absent.txt", "kind": "url"}]))


# ---- matching ----------------------------------------------------------------------------------------

def test_url_and_domain_matching(tmp_path):
    (tmp_path / "u.txt").write_text("# urls\nHTTP://Example.COM:80/a.jpg#frag\n")
    (tmp_path / "d.txt").write_text("evil.com\n*.bad.org  # and subdomains\n")
    cfg = _cfg(tmp_path, [{"name": "u", "path": tmp_path / "u.txt", "kind": "url"},
                          {"name": "d", "path": tmp_path / "d.txt", "kind": "domain"}])
    urls = {"http://example.com/a.jpg": "u", "http://example.com/a.jpg?x=1": None, "http://example.com/A.jpg": None,
            "http://sub.EVIL.com:8080/x": "d", "http://u:p@evil.com/": "d", "http://bad.org./y": "d",
            "http://notevil.com/x": None, "http://evil.com.au/": None, "": None, "garbage": None, None: None,
            # as urllib fetches them: surrounding space and tabs stripped, full-width host letters folded
            " http://evil.com/x": "d", "\thttp://evil.com/": "d", "http://\uff45\uff56\uff49\uff4c.com/x": "d"}
    got = blocked_urls(cfg, list(urls))
    assert [g[0] if g else None for g in got] == [f"blocklist:{v}" if v else None for v in urls.values()]


def _hash_con(rows):
    con = duckdb.connect()
    con.execute("CREATE TABLE samples (key VARCHAR, sha256 VARCHAR, phash VARCHAR)")
    con.executemany("INSERT INTO samples VALUES (?, ?, ?)", rows)
    return con


def _hits(con, rule):
    return sorted(k for (k,) in con.execute(f"SELECT key FROM samples WHERE NOT ({rule.keep})").fetchall())


def test_phash_exact_and_within_distance(tmp_path):
    listed = 0xF0F0_1234_5678_9ABC
    (tmp_path / "p.txt").write_text(f"{listed:016x}\n")
    rows = [("same", None, f"{listed:016x}"), ("one_bit", None, f"{listed ^ 1:016x}"),
            ("three_bits", None, f"{listed ^ (1 | 1 << 40 | 1 << 63):016x}"),
            ("four_bits", None, f"{listed ^ 0xF:016x}"), ("other", None, "0000000000000000"), ("none", None, None)]
    for d, want in [(0, ["same"]), (1, ["one_bit", "same"]), (3, ["one_bit", "same", "three_bits"])]:
        con = _hash_con(rows)
        cfg = _cfg(tmp_path, [{"name": "p", "path": tmp_path / "p.txt", "kind": "phash", "max_distance": d}],
                   "score.scorers=[resolution]")
        [rule] = hash_rules(cfg, con)
        assert rule.name == "blocklist:p" and _hits(con, rule) == want, d
    with pytest.raises(BlocklistError, match="no 'phash' column .*phash scorer"):
        hash_rules(cfg, duckdb.connect().execute("CREATE TABLE samples AS SELECT 'k' AS key, 'h' AS sha256"))


def test_sha256_rule_matches_any_case(tmp_path):
    h = hashlib.sha256(b"x").hexdigest()
    (tmp_path / "s.txt").write_text(h.upper() + "\n")
    con = _hash_con([("a", h, None), ("b", "0" * 64, None), ("c", None, None)])
    [rule] = hash_rules(_cfg(tmp_path, [{"name": "s", "path": tmp_path / "s.txt", "kind": "sha256"}]), con)
    assert _hits(con, rule) == ["a"]


def test_url_list_content_is_part_of_the_fingerprint(tmp_path):
    u = tmp_path / "u.txt"
    u.write_text("http://example.com/a.jpg\n")
    s = tmp_path / "s.txt"
    s.write_text(hashlib.sha256(b"x").hexdigest() + "\n")
    plain = load_config("demo", [f"runs_dir={tmp_path / 'runs'}", "name=b"])
    with_hash = _cfg(tmp_path, [{"name": "s", "path": s, "kind": "sha256"}])
    assert with_hash.fingerprint() == plain.fingerprint()  # select-time lists change no download
    cfg = _cfg(tmp_path, [{"name": "u", "path": u, "kind": "url"}])
    assert cfg.fingerprint() != plain.fingerprint()
    run = prepare_run(cfg)
    saved = load_config(str(run / "config.yaml"))
    assert saved.blocklists[0].sha256 == hashlib.sha256(u.read_bytes()).hexdigest()  # recorded with the folder
    prepare_run(cfg)  # same list: fine
    u.write_text("http://example.com/a.jpg\nhttp://example.com/b.jpg\n")
    with pytest.raises(RunFolderError, match="different config(.|\n)*blocklists"):
        prepare_run(cfg)


# ---- end to end: a URL list served on loopback ---------------------------------------------------------

class _LoggingHandler(_DemoHandler):
    """The demo handler, keeping its access log."""

    log: list[str] = []

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        type(self).log.append(format % args)


def _jpeg(i: int, size=(320, 300)) -> bytes:
    """Smooth random blobs (not flat: a flat image's pHash is float noise), different for each i."""
    rng = np.random.default_rng(i)
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((size[0] + i, size[1]), Image.BICUBIC).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def blocked_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blocklist")
    (tmp / "site" / "img").mkdir(parents=True)
    for i in range(5):
        (tmp / "site" / "img" / f"{i}.jpg").write_bytes(_jpeg(i))
    (tmp / "hosts.txt").write_text("blocked.invalid\n")
    (tmp / "sha.txt").write_text(hashlib.sha256(_jpeg(3)).hexdigest() + "\n")
    # the pHash of image 4 as served; the scorer hashes img2dataset's re-encoded copy: a few bits apart at most
    (tmp / "phash.txt").write_text(phash_hex(Image.open(io.BytesIO(_jpeg(4))).convert("RGB")) + "\n")
    _LoggingHandler.log = []
    with serve_folder(tmp / "site", handler=_LoggingHandler) as base:
        # scheme upper-cased, a fragment: the same URL once normalised
        (tmp / "urls-block.txt").write_text(f"# removal requests\n{base.replace('http', 'HTTP')}/img/1.jpg#top\n")
        rows = [{"URL": f"{base}/img/{i}.jpg", "TEXT": f"picture {i}"} for i in range(5)]
        rows += [{"URL": "http://img.blocked.invalid/5.jpg", "TEXT": "a listed domain"},
                 {"URL": "file:///etc/passwd", "TEXT": "refused by the URL guard"}]
        (tmp / "urls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        specs = [("takedown", "urls-block.txt", "url"), ("hosts", "hosts.txt", "domain"), ("csam_sha", "sha.txt", "sha256")]
        lists = ", ".join(f"{{name: {n}, path: '{tmp / f}', kind: {k}}}" for n, f, k in specs)
        lists = f"blocklists=[{lists}, {{name: near, path: '{tmp / 'phash.txt'}', kind: phash, max_distance: 6}}]"
        curate("run", "--urls", tmp / "urls.jsonl", "--set", f"runs_dir={tmp / 'runs'}", "--set", "name=b",
               "--set", "download.processes=1", "--set", "workers=1", "--set", "select.rules=[]",
               "--set", "score.scorers=[resolution, phash]", "--set", lists)
    return tmp / "runs" / "b", tmp


def test_blocked_urls_are_never_fetched_and_end_dropped(blocked_run):
    run, _ = blocked_run
    fetched = " ".join(_LoggingHandler.log)
    assert "/img/0.jpg" in fetched and "/img/3.jpg" in fetched  # the log is real
    assert "/img/1.jpg" not in fetched  # the blocked URL never reached the server
    dec = {r["key"]: r for r in pq.read_table(run / "selected" / "decisions.parquet").to_pylist()}
    assert dec["refused-000000001"]["state"] == "dropped" and dec["refused-000000001"]["rule"] == "blocklist:takedown"
    assert dec["refused-000000005"]["state"] == "dropped" and dec["refused-000000005"]["rule"] == "blocklist:hosts"
    assert dec["refused-000000006"]["state"] == "failed" and dec["refused-000000006"]["rule"] is None
    refused = pq.read_table(run / "download" / "_refused.parquet").to_pylist()
    assert [(r["input_row"], r["rule"]) for r in refused] == [(1, "blocklist:takedown"), (5, "blocklist:hosts"),
                                                              (6, None)]
    assert pq.read_metadata(run / "download" / "_fetch.parquet").num_rows == 4


def test_hash_listed_image_never_reaches_a_shard(blocked_run):
    run, _ = blocked_run
    by_row = dict(duckdb.connect().execute(
        f"SELECT s.input_row, d.rule FROM read_parquet('{run}/download/0*.parquet') s "
        f"JOIN read_parquet('{run}/selected/decisions.parquet') d USING (key)").fetchall())
    assert by_row == {0: None, 2: None, 3: "blocklist:csam_sha", 4: "blocklist:near"}
    written = duckdb.connect().execute(f"SELECT sha256 FROM read_parquet('{run}/selected/0*.parquet')").fetchall()
    assert len(written) == 2 and (hashlib.sha256(_jpeg(3)).hexdigest(),) not in written


def test_funnel_verify_and_provenance_account_for_blocklists(blocked_run):
    run, tmp = blocked_run
    f = json.loads((run / "report" / "funnel.json").read_text())
    assert f["dropped_by_rule"] == {"blocklist:takedown": 1, "blocklist:hosts": 1, "blocklist:csam_sha": 1,
                                    "blocklist:near": 1}
    assert (f["input"], f["written"], f["dropped"], f["failed"]) == (7, 2, 4, 1)
    assert "| dropped | rule `blocklist:takedown` | 1 |" in (run / "report" / "funnel.md").read_text()
    curate("verify", run)
    prov = {b["name"]: b for b in json.loads((run / "selected" / "manifest.json").read_text())["blocklists"]}
    assert prov["takedown"]["sha256"] == hashlib.sha256((tmp / "urls-block.txt").read_bytes()).hexdigest()
    assert (prov["takedown"]["rows"], prov["hosts"]["rows"], prov["csam_sha"]["rows"]) == (1, 1, 1)
    assert prov["csam_sha"]["kind"] == "sha256" and prov["hosts"]["rule"] == "blocklist:hosts"
    assert prov["near"]["max_distance"] == 6 and "max_distance" not in prov["hosts"]


def test_a_malformed_list_stops_the_run_before_any_work(tmp_path):
    (tmp_path / "site").mkdir()
    bad = tmp_path / "sha.txt"
    bad.write_text(hashlib.sha256(b"x").hexdigest() + "\nnot-a-hash\n")
    _LoggingHandler.log = []
    with serve_folder(tmp_path / "site", handler=_LoggingHandler) as base:
        (tmp_path / "urls.jsonl").write_text(json.dumps({"URL": f"{base}/img/0.jpg", "TEXT": "t"}) + "\n")
        p = curate("run", "--urls", tmp_path / "urls.jsonl", "--set", f"runs_dir={tmp_path / 'runs'}",
                   "--set", "score.scorers=[resolution]",
                   "--set", f"blocklists=[{{name: s, path: '{bad}', kind: sha256}}]", check=False)
    assert p.returncode == 2, p.stderr
    assert f"{bad}:2: expected 64 hex digits, got something else" in p.stderr and "not-a-hash" not in p.stderr
    assert _LoggingHandler.log == [] and not (tmp_path / "runs" / "demo").exists()


def test_retry_failed_never_fetches_a_refreshed_url_a_list_names(tmp_path):
    from t2i_curate.pipeline.download.stage import _allowed_only

    (tmp_path / "d.txt").write_text("example.com\n")
    cfg = _cfg(tmp_path, [{"name": "d", "path": tmp_path / "d.txt", "kind": "domain"}],
               "download.allow_private_addresses=false")
    rows = pa.table({"URL": ["https://cdn.example.com/a.jpg", "https://ok.org/b.jpg", "file:///etc/passwd"],
                     "TEXT": ["a", "b", "c"]})
    assert _allowed_only(cfg, rows)["URL"].to_pylist() == ["https://ok.org/b.jpg"]
