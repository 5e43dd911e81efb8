"""An untrusted URL list cannot read local files or reach private addresses.

Only http(s) is fetched; literal loopback / private / link-local hosts are refused unless
``download.allow_private_addresses``. Every test here talks to 127.0.0.1 only, and the
private-network URLs of the table are judged, never fetched.
"""

import base64
import io
import json

import duckdb
import pyarrow.parquet as pq
import pytest
from conftest import curate
from PIL import Image

from t2i_curate.pipeline.core.config import DownloadConfig
from t2i_curate.pipeline.core.urls import url_refusal
from t2i_curate.pipeline.download.demo import _DemoHandler, serve_folder

SCHEME = "scheme"
PRIVATE = "loopback, private or link-local"

# url -> expected refusal substring with the defaults (None: fetched)
TABLE = {
    "file:///etc/passwd": SCHEME,
    "FILE:///C:/Windows/win.ini": SCHEME,
    "data:image/png;base64,iVBORw0KGgo=": SCHEME,
    "ftp://example.com/x.jpg": SCHEME,
    "gopher://example.com/": SCHEME,
    "www.example.com/x.jpg": "without a scheme",
    "": "empty URL",
    "   ": "empty URL",
    None: "empty URL",
    "http:///x.jpg": "no host",
    "http://[::1/x.jpg": "malformed",
    "http://127.0.0.1/x.jpg": PRIVATE,
    "http://127.8.9.10:8080/x.jpg": PRIVATE,
    "http://localhost:8000/x.jpg": PRIVATE,
    "http://LOCALHOST./x.jpg": PRIVATE,
    "http://img.localhost/x.jpg": PRIVATE,
    "http://user:pw@127.0.0.1/x.jpg": PRIVATE,
    "http://[::1]/x.jpg": PRIVATE,
    "http://[::ffff:127.0.0.1]/x.jpg": PRIVATE,
    "http://[::ffff:7f00:1]/x.jpg": PRIVATE,
    "http://2130706433/x.jpg": PRIVATE,  # 127.0.0.1 as one integer
    "http://0x7f000001/x.jpg": PRIVATE,
    "http://0177.0.0.1/x.jpg": PRIVATE,
    "http://127.1/x.jpg": PRIVATE,
    # urllib's resolver IDNA-encodes the host: full-width forms and ideographic dots are these addresses
    "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/x.jpg": PRIVATE,
    "http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54/x.jpg": PRIVATE,
    "http://127\u30020\u30020\u30021/x.jpg": PRIVATE,
    " http://127.0.0.1/x.jpg": PRIVATE,  # urllib strips the space
    "http://0.0.0.0/x.jpg": PRIVATE,
    "http://10.1.2.3/x.jpg": PRIVATE,
    "http://172.20.0.1/x.jpg": PRIVATE,
    "http://172.31.255.255/x.jpg": PRIVATE,
    "http://192.168.1.1/x.jpg": PRIVATE,
    "http://169.254.169.254/latest/meta-data": PRIVATE,
    "http://100.100.100.200/latest/meta-data": PRIVATE,  # carrier-grade NAT range (Alibaba metadata)
    "http://[fc00::1]/x.jpg": PRIVATE,
    "http://[fd00:ec2::254]/latest/meta-data": PRIVATE,
    "http://[fe80::1%25eth0]/x.jpg": PRIVATE,
    "https://example.com/a.jpg": None,
    "HTTPS://Example.COM/a.jpg": None,
    "http://93.184.215.14/a.jpg": None,
    "http://172.32.0.1/a.jpg": None,  # just outside 172.16/12
    "http://[2606:4700::1111]/a.jpg": None,
    "http://[::ffff:8.8.8.8]/a.jpg": None,
    "http://10.1.2.3.nip.io/a.jpg": None,  # a name: not resolved (documented as not covered)
}


@pytest.mark.parametrize("url,expected", list(TABLE.items()), ids=[repr(u)[:50] for u in TABLE])
def test_url_refusal_defaults(url, expected):
    reason = url_refusal(url, DownloadConfig())
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and reason.startswith("refused: ") and expected in reason, reason


@pytest.mark.parametrize("url,expected", list(TABLE.items()), ids=[repr(u)[:50] for u in TABLE])
def test_url_refusal_private_allowed(url, expected):
    reason = url_refusal(url, DownloadConfig(allow_private_addresses=True))
    if expected in (None, PRIVATE):
        assert reason is None
    else:
        assert reason is not None and expected in reason


def test_allowed_schemes_is_the_list():
    only_https = DownloadConfig(allowed_schemes=["https"])
    assert "scheme 'http'" in url_refusal("http://example.com/a.jpg", only_https)
    assert url_refusal("https://example.com/a.jpg", only_https) is None


class _CountingHandler(_DemoHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802
        type(self).requests.append(self.path)
        super().do_GET()


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (300 + i, 280), (40 * i, 90, 200)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Four images on a loopback server, and a URL list that also names a local file and a data: URL."""
    tmp = tmp_path_factory.mktemp("urlsafety")
    (tmp / "site" / "img").mkdir(parents=True)
    for i in range(4):
        (tmp / "site" / "img" / f"{i}.jpg").write_bytes(_jpeg(i))
    secret = tmp / "secret.jpg"  # a real local JPEG: fetched, it would be a valid sample
    secret.write_bytes(_jpeg(9))
    data_url = "data:image/jpeg;base64," + base64.b64encode(_jpeg(8)).decode()
    return tmp, secret, data_url


def _run(tmp, name, base, secret, data_url, *sets):
    urls = tmp / f"{name}.jsonl"
    rows = [{"URL": f"{base}/img/{i}.jpg", "TEXT": f"a blue picture number {i}"} for i in range(4)]
    rows += [{"URL": secret.as_uri(), "TEXT": "a local file"}, {"URL": data_url, "TEXT": "inline data"},
             {"URL": "", "TEXT": "no url"}]
    urls.write_text("".join(json.dumps(r) + "\n" for r in rows))
    curate("run", "--urls", urls, "--set", f"runs_dir={tmp / 'runs'}", "--set", f"name={name}",
           "--set", "download.processes=1", "--set", "workers=1", "--set", "select.rules=[]",
           "--set", "score.scorers=[resolution]", *sets)
    return tmp / "runs" / name


def _decisions(run):
    return {r["key"]: r for r in pq.read_table(run / "selected" / "decisions.parquet").to_pylist()}


def test_file_and_data_urls_end_failed_never_fetched(site):
    tmp, secret, data_url = site
    _CountingHandler.requests = []
    with serve_folder(tmp / "site", handler=_CountingHandler) as base:
        run = _run(tmp, "allowed", base, secret, data_url)  # conftest.curate: allow_private_addresses=true
    assert sorted(_CountingHandler.requests) == [f"/img/{i}.jpg" for i in range(4)]
    dec = _decisions(run)
    assert len(dec) == 7
    assert dec["refused-000000004"]["error"] == "refused: scheme 'file' is not fetched (download.allowed_schemes)"
    assert "scheme 'data'" in dec["refused-000000005"]["error"]
    assert dec["refused-000000006"]["error"] == "refused: empty URL"
    assert all(dec[f"refused-00000000{i}"]["state"] == "failed" and
               dec[f"refused-00000000{i}"]["failed_stage"] == "download" for i in (4, 5, 6))
    assert sum(d["state"] == "selected" for d in dec.values()) == 4
    assert pq.read_metadata(run / "download" / "_fetch.parquet").num_rows == 4
    assert pq.read_metadata(run / "download" / "_input.parquet").num_rows == 7
    written = duckdb.connect().execute(
        f"SELECT url, sha256 FROM read_parquet('{run}/selected/0*.parquet')").fetchall()
    assert len(written) == 4 and all(u.startswith(base) for u, _ in written)
    f = json.loads((run / "report" / "funnel.json").read_text())
    assert f["input"] == 7 and f["written"] == 4 and f["failed"] == 3
    assert f["written"] + f["dropped"] + f["failed"] == f["input"]
    refused = json.loads(curate("query", "--run", run, "SELECT input_row, url, reason FROM refused ORDER BY 1",
                                "--format", "json").stdout.strip().splitlines()[0])
    assert refused["input_row"] == 4 and refused["url"] == secret.as_uri()
    curate("verify", run)


def test_private_addresses_refused_by_default(site):
    tmp, secret, data_url = site
    _CountingHandler.requests = []
    with serve_folder(tmp / "site", handler=_CountingHandler) as base:
        run = _run(tmp, "refused", base, secret, data_url, "--set", "download.allow_private_addresses=false")
    assert _CountingHandler.requests == []  # nothing fetched: img2dataset never started
    dec = _decisions(run)
    assert len(dec) == 7 and all(d["state"] == "failed" for d in dec.values())
    assert all(PRIVATE in dec[f"refused-00000000{i}"]["error"] for i in range(4))
    assert not list((run / "download").glob("0*.tar"))
    f = json.loads((run / "report" / "funnel.json").read_text())
    assert f["input"] == 7 and f["failed"] == 7 and f["written"] == 0
    curate("verify", run)


def test_retry_failed_skips_refreshed_urls_that_are_refused():
    import pyarrow as pa

    from t2i_curate.pipeline.core.config import load_config
    from t2i_curate.pipeline.download.stage import _allowed_only

    cfg = load_config("demo", ["download.allow_private_addresses=false"])
    rows = pa.table({"URL": ["https://example.com/a.jpg", "file:///etc/passwd", "http://10.0.0.7/b.jpg"],
                     "TEXT": ["a", "b", "c"], "_orig_key": ["000000000", "000000001", "000000002"]})
    assert _allowed_only(cfg, rows)["_orig_key"].to_pylist() == ["000000000"]


def test_refused_keys_are_valid_and_never_img2dataset_keys():
    from t2i_curate.filters.rules import REFUSED_KEY
    from t2i_curate.pipeline.write.stage import KEY_RE

    keys = [k for (k,) in duckdb.connect().execute(
        f"SELECT {REFUSED_KEY} FROM (SELECT unnest([0, 7, 123456789, 12345678901]) AS input_row)").fetchall()]
    assert keys[:2] == ["refused-000000000", "refused-000000007"] and keys[3] == "refused-12345678901"
    assert all(KEY_RE.match(k) and not k.isdigit() for k in keys)


def test_private_hosts_are_allowed_for_the_builtin_demo_alone():
    """The demo preset with a user's URL list (`make filter URLS=...`) still refuses private hosts."""
    from t2i_curate.pipeline.core.config import load_config
    from t2i_curate.pipeline.core.urls import url_refusal
    from t2i_curate.pipeline.download.stage import guard_settings

    meta = "http://169.254.169.254/latest/meta-data"
    assert url_refusal(meta, guard_settings(load_config("demo"))) is None  # the built-in demo's loopback server
    assert "private" in url_refusal(meta, guard_settings(load_config("demo", ["input.urls=list.parquet"])))
    assert url_refusal(meta, guard_settings(load_config("demo", ["input.urls=list.parquet",
                                                                 "download.allow_private_addresses=true"]))) is None
