"""The curation report (report/curation.py): sections from the run's files, bounded size and time."""

import base64
import io
import json
import re
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import curate, small_demo_args

from t2i_curate.pipeline.core.catalog import open_run
from t2i_curate.pipeline.report.curation import (
    Threshold,
    build_run_report,
    funnel_rows,
    histogram,
    parse_threshold,
    rule_order,
    threshold_share,
)

RULES = [
    {"name": "min_side_256", "keep": "shorter_side >= 256", "description": "shorter side at least 256"},
    {"name": "caption_3_words", "keep": "len(string_split(caption, ' ')) >= 3", "description": "3 words"},
    {"name": "aesthetic_5", "keep": "aesthetic_score >= 5", "description": "aesthetic at least 5"},
    {"name": "no_watermark", "keep": "pwatermark < 0.8", "description": "watermark below 0.8"},
]
SCORE_COLUMNS = ["shorter_side", "aspect_ratio", "aesthetic_score", "pwatermark", "similarity", "punsafe",
                 "text_area"]


def _jpegs(n: int) -> list[bytes]:
    from PIL import Image

    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (48 + 8 * i, 40), (30 * i % 255, 90, 200 - 20 * i)).save(buf, format="JPEG", quality=70)
        out.append(buf.getvalue())
    return out


def _decisions(keys, ok, cols, captions, rng):
    """state / rule per row, the rules in order, then exact duplicates among the kept rows."""
    n = len(keys)
    state = np.where(ok, "selected", "failed").astype(object)
    rule = np.full(n, None, dtype=object)
    words = np.array([len(c.split()) for c in captions])
    drops = [cols["shorter_side"] < 256, words < 3, cols["aesthetic_score"] < 5, cols["pwatermark"] >= 0.8]
    for r, bad in zip(RULES, drops, strict=True):
        hit = ok & (rule == None) & bad  # noqa: E711
        rule[hit] = r["name"]
    kept = np.flatnonzero(ok & (rule == None))  # noqa: E711
    dup_of = np.full(n, None, dtype=object)
    dups = kept[1::40]
    rule[dups], dup_of[dups] = "duplicate", keys[kept[0::40][: len(dups)]]
    state[ok & (rule != None)] = "dropped"  # noqa: E711
    error = np.where(ok, None, "HTTP Error 404: gone").astype(object)
    return pa.table({"key": keys, "state": state.astype(str), "rule": rule, "error": error,
                     "failed_stage": np.where(ok, None, "download").astype(object), "duplicate_of": dup_of})


def synthetic_run(root, n_rows=100_000, shards=10, image_every=5, seed=0):
    """A run folder as `curate run` leaves it, from synthetic parquet; every ``image_every``-th key
    of each shard has a (tiny, real JPEG) image in its download tar."""
    rng = np.random.default_rng(seed)
    per = n_rows // shards
    keys = np.array([f"{s:05d}{i:04d}" for s in range(shards) for i in range(per)])
    n = len(keys)
    urls = np.array([f"http://site{i % 37}.example/img/{i}.jpg" for i in range(n)])
    words = ["a", "photo", "of", "red", "horse", "on", "beach", "at", "night"]
    captions = [" ".join(words[: 1 + i % 8]) for i in range(n)]
    ok = rng.random(n) > 0.03 * (1 + (np.arange(n) % 37 == 5) * 10)  # site5 fails a lot
    cols = {"shorter_side": rng.integers(64, 1500, n), "aspect_ratio": np.exp(rng.normal(0.2, 0.3, n)),
            "aesthetic_score": rng.normal(5.2, 0.9, n), "pwatermark": rng.beta(1, 3, n),
            "similarity": rng.normal(0.28, 0.04, n), "punsafe": rng.beta(1, 8, n), "text_area": rng.beta(0.5, 8, n)}
    lay_dl, lay_sc, sel = root / "download", root / "scores", root / "selected"
    for d in (lay_dl, lay_sc / "embeddings", sel):
        d.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"URL": urls, "TEXT": captions, "input_row": np.arange(n)}), lay_dl / "_input.parquet")
    images = _jpegs(8)
    for s in range(shards):
        sl = slice(s * per, (s + 1) * per)
        status = np.where(ok[sl], "success", "failed_to_download")
        pq.write_table(pa.table({
            "key": keys[sl], "url": urls[sl], "caption": captions[sl], "status": status, "input_row": np.arange(n)[sl],
            "error_message": np.where(ok[sl], None, "HTTP Error 404: gone").astype(object)}),
            lay_dl / f"{s:05d}.parquet")
        (lay_dl / f"{s:05d}_stats.json").write_text("{}")
        with tarfile.open(lay_dl / f"{s:05d}.tar", "w") as tf:
            for j in np.flatnonzero(ok[sl])[::image_every]:
                data = images[j % len(images)]
                info = tarfile.TarInfo(f"{keys[sl][j]}.jpg")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        okk = ok[sl]
        pq.write_table(pa.table({"key": keys[sl][okk], "score_status": np.full(okk.sum(), "ok"),
                                 **{c: v[sl][okk] for c, v in cols.items()},
                                 "embedding_row": np.arange(okk.sum())}), lay_sc / f"{s:05d}.parquet")
    dec = _decisions(keys, ok, cols, captions, rng)
    pq.write_table(dec, sel / "decisions.parquet")
    written = int(np.sum(np.asarray(dec["state"]) == "selected"))
    models = {"aesthetic": {"clip": "ViT-L-14/openai", "clip_sha256": "ab" * 32, "tiny": "false"}}
    (sel / "manifest.json").write_text(json.dumps({"run": root.name, "samples": written, "shards": [],
                                                   "models": models, "tiny_models": False, "rules": RULES}))
    (root / "config.yaml").write_text(yaml.safe_dump({"name": root.name, "select": {"rules": RULES}}))
    return root


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"src='data:image/jpeg;base64,([^']+)'", page)]


def test_parse_threshold():
    assert parse_threshold({"name": "r", "keep": "shorter_side >= 200"}) == Threshold("r", "shorter_side", ">=", 200.0)
    assert parse_threshold({"name": "r", "keep": " pwatermark<0.8 "}) == Threshold("r", "pwatermark", "<", 0.8)
    assert parse_threshold({"name": "r", "keep": "x <= 1e-3"}).value == pytest.approx(1e-3)
    for keep in ("length(trim(caption)) > 5", "a >= 1 AND b < 2", "x = 3", "x >= y"):
        assert parse_threshold({"name": "r", "keep": keep}) is None


def test_rule_order_follows_selection():
    f = {"input": 10, "written": 3, "dropped_by_rule": {"duplicate": 1, "b": 2, "a": 1, "blocklist:x": 1,
                                                         "near_duplicate_phash": 1},
         "failed_by_reason": [{"stage": "download", "error": "HTTP Error 404", "samples": 1}]}
    order = rule_order(f, [{"name": "a"}, {"name": "b"}])
    assert order == ["blocklist:x", "a", "b", "duplicate", "near_duplicate_phash"]
    rows = funnel_rows(f, order)
    assert [r[0] for r in rows] == ["input", "failed", *["dropped"] * 5, "written"]


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    return synthetic_run(tmp_path_factory.mktemp("synthetic") / "big")


def test_100k_run_builds_in_bounded_time_and_size(big_run, caplog):
    t = time.perf_counter()
    out = build_run_report(big_run)
    first = time.perf_counter() - t
    page = out.read_text()
    size = len(page.encode())
    t = time.perf_counter()
    build_run_report(big_run)  # thumbnails cached: the rebuild reads no tar
    again = time.perf_counter() - t
    print(f"100k-row synthetic run: first build {first:.1f} s, rebuild {again:.1f} s, {size / 1e6:.2f} MB")
    assert first < 90 and again < 60 and size < 20_000_000
    assert len(re.findall(r"class=\"funnel-bar\"", page)) == 1 + 1 + len(RULES) + 1 + 1
    for col in SCORE_COLUMNS:
        assert f'class="hist" data-column="{col}"' in page
    assert 'data-column="embedding_row"' not in page
    thumbs = _images(page)
    assert len(thumbs) >= 20 and all(t[:2] == b"\xff\xd8" for t in thumbs)
    assert "site5.example" in page and "ab" * 32 in page
    assert "class='dupgroup' data-rule='duplicate'" in page
    for r in RULES:
        assert f"<h3>{r['name']}: " in page  # examples dropped by each rule
    assert "aesthetic_score <small>(fixed bins)" in page and "shorter_side <small>(quartile bins)" in page
    assert "aesthetic_score ≥ 6: " in page


def test_histogram_and_shares_match_a_direct_count(big_run):
    con = open_run(big_run)
    h = histogram(con, "aesthetic_score", [5.0])
    n = con.execute("SELECT count(*) FROM scores").fetchall()[0][0]
    assert sum(h["counts"]) == h["n"] == n and h["lo"] <= 5.0 <= h["hi"]
    kept, total = threshold_share(con, Threshold("aesthetic_5", "aesthetic_score", ">=", 5.0))
    direct = pq.read_table(big_run / "scores").column("aesthetic_score").to_numpy()
    assert total == len(direct) and kept == int(np.sum(direct >= 5.0))


def test_size_limit_leaves_thumbnails_out(big_run):
    full = len(_images(build_run_report(big_run).read_text()))
    bare = build_run_report(big_run, max_bytes=1).read_text()
    assert not _images(bare) and "thumbnails left out to keep the page under" in bare
    limit = len(bare.encode()) + 15_000
    page = build_run_report(big_run, max_bytes=limit).read_text()
    assert len(page.encode()) <= limit and 0 < len(_images(page)) < full


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    p = curate("run", *small_demo_args(runs, n=40))
    return runs / "demo", p


def test_curate_run_ends_with_the_report(demo_run):
    run, p = demo_run
    out = run / "report" / "index.html"
    assert out.exists() and str(out) in p.stderr.strip().splitlines()[-1].replace("\n", "")
    page = out.read_text()
    f = json.loads((run / "report" / "funnel.json").read_text())
    bars = re.findall(r'class="funnel-bar" data-state="(\w+)"', page)
    assert len(bars) == 2 + len(f["failed_by_reason"]) + len(f["dropped_by_rule"])
    assert bars[0] == "input" and bars[-1] == "written"
    assert "tiny random models" in page and not re.search(r"""(src|href)=["']?(https?:|//)""", page)
    from PIL import Image

    for data in _images(page):
        assert max(Image.open(io.BytesIO(data)).size) <= 128


def test_curate_report_rebuilds_from_files(demo_run, tmp_path):
    run, _ = demo_run
    out = run / "report" / "index.html"
    before = out.read_text()
    out.unlink()
    curate("report", run)
    assert out.read_text() == before  # same files, same page
    r = curate("report", tmp_path, check=False)
    assert r.returncode == 2 and "expected a run folder" in r.stderr


def test_coverage_section_is_added_when_its_module_exists(big_run, monkeypatch):
    import sys
    import types

    from t2i_curate.pipeline.report.curation import coverage_hook

    monkeypatch.setitem(sys.modules, "t2i_curate.pipeline.report.coverage", None)  # absent: no section, no error
    assert coverage_hook(big_run) == ""
    fake = types.ModuleType("t2i_curate.pipeline.report.coverage")
    fake.coverage_section = lambda run_dir: f"<section id='coverage'>{run_dir.name} horses</section>"
    monkeypatch.setitem(sys.modules, "t2i_curate.pipeline.report.coverage", fake)
    page = build_run_report(big_run).read_text()
    assert "<section id='coverage'>big horses</section>" in page
    assert page.index("id='failures'") < page.index("id='coverage'") < page.index("id='provenance'")
