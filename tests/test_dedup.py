"""Exact deduplication (select.dedup): the same normalised URL or the same bytes keeps one sample."""

import io
import json

import duckdb
import pyarrow.parquet as pq
import pytest
from conftest import curate
from PIL import Image

from t2i_curate.filters.dedup import ExactDedup, url_key_sql
from t2i_curate.filters.expressions import RuleError
from t2i_curate.filters.rules import decision_sql
from t2i_curate.pipeline.core.config import ConfigError, Rule, load_config, resolve_preset
from t2i_curate.pipeline.download.demo import serve_folder
from t2i_curate.pipeline.select.stage import dedup_plan


def _url_key(url):
    return duckdb.connect().execute(f"SELECT {url_key_sql('u')} FROM (SELECT ?::VARCHAR AS u)", [url]).fetchall()[0][0]


@pytest.mark.parametrize("a,b", [
    ("HTTP://Example.COM:80/a#x", "http://example.com/a"),
    ("https://Example.com:443/a/B.jpg", "https://example.com/a/B.jpg"),
    ("http://example.com:/a", "http://example.com/a"),
    ("http://example.com/a?x=1&Y=2#frag", "http://example.com/a?x=1&Y=2"),
    ("http://[::1]:80/a", "http://[::1]/a"),
    ("http://User:PW@Example.com/a", "http://User:PW@example.com/a"),
])
def test_url_normalisation_equal(a, b):
    assert _url_key(a) == _url_key(b) == b


@pytest.mark.parametrize("a,b", [
    ("http://example.com/a?x=1", "http://example.com/a?x=2"),  # query kept
    ("http://example.com/A", "http://example.com/a"),  # path case kept
    ("http://example.com:443/a", "http://example.com/a"),  # 443 is not http's default port
    ("https://example.com:80/a", "https://example.com/a"),
    ("https://example.com:8443/a", "https://example.com/a"),
    ("http://example.com/a", "https://example.com/a"),
])
def test_url_normalisation_distinct(a, b):
    assert _url_key(a) != _url_key(b)


def _samples(con, rows):
    """rows: (key, url, sha256, status, score_status, caption, aesthetic_score)"""
    con.execute("CREATE TABLE samples (key VARCHAR, url VARCHAR, sha256 VARCHAR, status VARCHAR, "
                "error_message VARCHAR, score_status VARCHAR, score_error VARCHAR, caption VARCHAR, "
                "aesthetic_score DOUBLE)")
    con.executemany("INSERT INTO samples VALUES (?, ?, ?, ?, NULL, ?, NULL, ?, ?)", rows)


def _decide(rows, rules=(), keep_order="key"):
    con = duckdb.connect()
    _samples(con, rows)
    sql = decision_sql(list(rules), "samples", None, ExactDedup(keep_order=keep_order))
    return {r[0]: (r[1], r[2], r[5]) for r in con.execute(sql).fetchall()}


ROWS = [  # key, url, sha256, status, score_status, caption, aesthetic
    ("a", "http://x.com/1.jpg", "h1", "success", "ok", "a fine long caption", 5.0),
    ("b", "HTTP://X.com:80/1.jpg#z", "h1", "success", "ok", "a fine long caption", 6.0),
    ("c", "http://y.com/other.jpg", "h1", "success", "ok", "same bytes elsewhere", 7.0),
    ("d", "http://x.com/2.jpg", "h2", "success", "ok", "x", 9.0),  # dropped by the rule first
    ("e", "http://x.com/2.jpg", "h2", "success", "ok", "the copy that passes", 1.0),
    ("f", "http://x.com/3.jpg", None, "failed_to_download", None, "gone", None),
    ("g", "http://x.com/3.jpg", "h3", "success", "ok", "a lone sample here", 2.0),
]
CAPTION_RULE = Rule(name="caption_over_2_words", keep="len(string_split(caption, ' ')) > 2")


def test_dedup_among_samples_every_rule_keeps():
    got = _decide(ROWS, [CAPTION_RULE])
    assert got["a"] == ("selected", None, None)
    assert got["b"] == ("dropped", "duplicate", "a")  # same normalised URL
    assert got["c"] == ("dropped", "duplicate", "a")  # same bytes
    assert got["d"] == ("dropped", "caption_over_2_words", None)  # a rule never costs the good copy
    assert got["e"] == ("selected", None, None)
    assert got["f"][0] == "failed" and got["g"] == ("selected", None, None)  # failures take no part


def test_keep_order_picks_the_copy_and_duplicate_of_points_at_a_kept_one():
    got = _decide(ROWS, [CAPTION_RULE], keep_order="aesthetic_score DESC NULLS LAST")
    # URL step: b beats a; sha256 step among URL winners {b, c}: c wins; a points past b to c
    assert got["c"] == ("selected", None, None)
    assert got["b"] == ("dropped", "duplicate", "c") and got["a"] == ("dropped", "duplicate", "c")
    got = _decide(ROWS, keep_order="key DESC")
    assert got["e"] == ("selected", None, None) and got["d"] == ("dropped", "duplicate", "e")


def test_url_twin_with_other_bytes_does_not_chain():
    rows = [("a", "http://x.com/1.jpg", "h1", "success", "ok", "c a p", 1.0),
            ("b", "http://x.com/1.jpg", "h2", "success", "ok", "c a p", 1.0),  # served other bytes later
            ("c", "http://y.com/1.jpg", "h2", "success", "ok", "c a p", 1.0)]
    got = _decide(rows)
    assert got["b"] == ("dropped", "duplicate", "a")
    assert got["c"] == ("selected", None, None)  # its only byte twin was a URL duplicate of another image


def test_keep_order_binding():
    con = duckdb.connect()
    con.execute("CREATE TABLE samples AS SELECT 'k' AS key, 'u' AS url, 'h' AS sha256")
    cfg = load_config("datacomp-basic").select.dedup
    assert dedup_plan(con, cfg) == ExactDedup(keep_order="key", by_sha256=True)  # the default falls back
    with pytest.raises(RuleError, match="aesthetic"):
        dedup_plan(con, cfg.model_copy(update={"keep_order": "aesthetic_score DESC"}))
    assert dedup_plan(con, cfg.model_copy(update={"exact": False})) is None


def test_on_in_every_preset_and_duplicate_is_a_reserved_rule_name():
    for preset in resolve_preset("demo").parent.glob("*.yaml"):
        assert load_config(str(preset)).select.dedup.exact, preset.name
    with pytest.raises(ConfigError, match="reserved"):
        load_config("demo", ["select.rules=[{name: duplicate, keep: 'true'}]"])


# ---- end to end: a URL list served on loopback ----------------------------------------------------

def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (320 + i, 300), (60 * i, 90, 200)).save(buf, format="JPEG")
    return buf.getvalue()


# input row -> (path, caption); groups: {0, 1, 6} (same URL twice, same bytes at /mirror/),
# {2, 3} (the same URL once normalised), {4, 5} (same bytes at two paths), {7} alone
LIST = [("/img/0.jpg", "a picture number zero"), ("/img/0.jpg", "a picture number zero, again"),
        ("/img/1.jpg", "a picture number one"), ("/img/1.jpg#top", "a picture number one, anchored"),
        ("/mirror/2.jpg", "a picture number two, mirrored"), ("/img/2.jpg", "a picture number two"),
        ("/mirror/0.jpg", "a picture number zero, mirrored"), ("/img/3.jpg", "a picture number three")]


@pytest.fixture(scope="module")
def dedup_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dedup")
    (tmp / "site" / "img").mkdir(parents=True)
    for i in range(4):
        (tmp / "site" / "img" / f"{i}.jpg").write_bytes(_jpeg(i))
    with serve_folder(tmp / "site") as base:
        rows = [{"URL": base + p, "TEXT": t} for p, t in LIST]
        rows[3]["URL"] = rows[3]["URL"].replace("http://", "HTTP://")
        (tmp / "urls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        args = ["--urls", tmp / "urls.jsonl", "--set", f"runs_dir={tmp / 'runs'}", "--set", "name=d",
                "--set", "download.processes=1", "--set", "workers=1", "--set", "select.rules=[]",
                "--set", "score.scorers=[resolution]", "--set", "download.allow_private_addresses=true"]
        curate("run", *args)
        yield tmp / "runs" / "d", args


def _by_row(run):
    return {r[0]: r[1:] for r in duckdb.connect().execute(f"""
        SELECT s.input_row, d.state, d.rule, o.input_row FROM read_parquet('{run}/download/0*.parquet') s
        JOIN read_parquet('{run}/selected/decisions.parquet') d USING (key)
        LEFT JOIN read_parquet('{run}/download/0*.parquet') o ON o.key = d.duplicate_of""").fetchall()}


def _check_accounting(run, written, dropped):
    f = json.loads((run / "report" / "funnel.json").read_text())
    assert (f["input"], f["written"], f["failed"]) == (8, written, 0)
    assert f["dropped_by_rule"] == ({"duplicate": dropped} if dropped else {})
    assert f["written"] + f["dropped"] + f["failed"] == f["input"]
    assert pq.read_metadata(run / "selected" / "decisions.parquet").num_rows == 8
    curate("verify", run)


def test_duplicates_end_dropped_pointing_at_the_kept_copy(dedup_run):
    run, _ = dedup_run
    got = _by_row(run)
    assert all(got[i] == ("selected", None, None) for i in (0, 2, 4, 7))  # no aesthetic score: lowest key
    assert got[1] == ("dropped", "duplicate", 0) and got[6] == ("dropped", "duplicate", 0)
    assert got[3] == ("dropped", "duplicate", 2) and got[5] == ("dropped", "duplicate", 4)
    _check_accounting(run, 4, 4)
    written = duckdb.connect().execute(f"SELECT count(*), count(DISTINCT sha256) FROM "
                                       f"read_parquet('{run}/selected/0*.parquet')").fetchall()[0]
    assert written == (4, 4)
    funnel = (run / "report" / "funnel.md").read_text()
    assert "| dropped | rule `duplicate` | 4 |" in funnel


def test_dedup_off_writes_every_copy(dedup_run):
    run, args = dedup_run
    p = curate("run", *args, "--set", "select.dedup.exact=false")
    assert "finished already" in p.stderr  # a selection setting: nothing is downloaded again
    assert all(s == ("selected", None, None) for s in _by_row(run).values())
    _check_accounting(run, 8, 0)


def test_keep_order_chooses_the_kept_copy(dedup_run):
    run, args = dedup_run
    curate("run", *args, "--set", "select.dedup.keep_order='length(caption) DESC'")
    got = _by_row(run)
    # longest caption first: URL step keeps 1 over 0; bytes step between 1 and 6 keeps 6
    assert got[6] == ("selected", None, None)
    assert got[0] == ("dropped", "duplicate", 6) and got[1] == ("dropped", "duplicate", 6)
    assert got[3] == ("selected", None, None) and got[2] == ("dropped", "duplicate", 3)
    assert got[4] == ("selected", None, None) and got[5] == ("dropped", "duplicate", 4)
    _check_accounting(run, 4, 4)
    curate("run", *args)  # back to the default order
    assert _by_row(run)[0] == ("selected", None, None)
