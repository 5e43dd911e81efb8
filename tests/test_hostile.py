"""The hostile-input corpus: every case ends as a recorded failure with a reason, or a correct result."""

import http.server
import io
import tarfile
import threading

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import curate
from hostile import HostileHandler, url_list_csv
from PIL import Image

# case -> expected (final state, substring of the reason) ; "written" cases must also be scored
EXPECTED = {
    "truncated_jpeg": ("failed", "Image decoding error"),
    "zero_bytes": ("failed", "!buf.empty()"),
    "html_as_jpeg": ("failed", "Image decoding error"),
    "decompression_bomb": ("failed", "too many pixels"),
    "decompression_bomb_30k": ("failed", "too many pixels"),
    "cmyk_jpeg": ("written", None),
    "png_16bit": ("written", None),
    "palette_transparent": ("written", None),
    "animated_gif": ("written", None),
    "exif_rotated": ("written", None),
    "webp": ("written", None),
    "one_pixel": ("written", None),
    "over_10k_side": ("written", None),
    "caption_empty": ("written", None),
    "caption_10k": ("written", None),
    "caption_bad_utf8": ("written", None),
    "duplicate_url_a": ("written", None),
    "duplicate_url_b": ("written", None),
    "slow_server": ("failed", "timed out"),
    "http_429": ("failed", "HTTP Error 429"),
    "http_500": ("failed", "HTTP Error 500"),
}


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    HostileHandler.slow_seconds = 4.0
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HostileHandler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        rows = url_list_csv(tmp / "urls.csv", f"http://127.0.0.1:{srv.server_address[1]}")
        p = curate("run", "--urls", tmp / "urls.csv", "--set", f"runs_dir={tmp / 'runs'}", "--set", "name=h",
                   "--set", "download.timeout=2", "--set", "download.processes=1", "--set", "workers=1",
                   "--set", "select.rules=[]", "--set", "score.scorers=[resolution,watermark,aesthetic,clip_similarity]",
                   "--set", "select.dedup.exact=false",  # cases share bytes and a URL; dedup: tests/test_dedup.py
                   "--set", "score.models.preset=tiny")
    finally:
        srv.shutdown()
    return tmp / "runs" / "h", rows, p


def test_every_case_has_its_outcome(corpus_run):
    run, rows, _ = corpus_run
    assert set(rows) == set(EXPECTED)
    got = {r[0]: r[1:] for r in duckdb.connect().execute(f"""
        SELECT d."case", dec.state, dec.error, s.score_status, s.pwatermark, d.caption
        FROM read_parquet('{run}/download/0*.parquet') d
        JOIN read_parquet('{run}/selected/decisions.parquet') dec USING (key)
        LEFT JOIN read_parquet('{run}/scores/0*.parquet') s USING (key)""").fetchall()}
    for case, (state, reason) in EXPECTED.items():
        st, err, score_status, pwm, caption = got[case]
        assert st == ("selected" if state == "written" else state), (case, st, err)
        if reason:
            assert reason in err, (case, err)
        else:
            assert score_status == "ok" and 0 <= pwm <= 1, case
    written = duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{run}/selected/0*.parquet')").fetchall()
    assert written[0][0] == sum(1 for s, _ in EXPECTED.values() if s == "written")
    assert got["caption_bad_utf8"][4] == "caf\ufffd \ufffd\ufffd broken"
    assert len(got["caption_10k"][4]) == 10_000


def test_sizes_consistent_across_stages(corpus_run):
    """EXIF orientation: the stored grid, its parquet sizes and the scorer's decode agree."""
    from t2i_curate.pipeline.core.images import decode_image

    run, _, _ = corpus_run
    row = duckdb.connect().execute(
        f"""SELECT key, width, height, original_width, original_height FROM read_parquet('{run}/download/0*.parquet')
            WHERE "case" = 'exif_rotated'""").fetchall()[0]
    key = row[0]
    with tarfile.open(run / "download" / f"{key[:5]}.tar") as tf:
        data = tf.extractfile(f"{key}.jpg").read()
    img = decode_image(data, draft=10_000)
    assert img.size == (row[1], row[2]) == (row[3], row[4]) == (400, 200)
    with tarfile.open(run / "selected" / "00000.tar") as tf:
        assert tf.extractfile(f"{key}.jpg").read() == data


def test_corpus_run_verifies(corpus_run):
    run, _, _ = corpus_run
    curate("verify", run)


def _crafted_shard(run, members):
    d = run / "download"
    d.mkdir(parents=True)
    rows = []
    with tarfile.open(d / "00000.tar", "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    for key in ("0000000", "0000001"):
        rows.append({"key": key, "caption": "a caption here", "status": "success", "error_message": None,
                     "original_width": 64, "original_height": 64, "input_row": int(key)})
    pq.write_table(pa.Table.from_pylist(rows), d / "00000.parquet")
    pq.write_table(pa.table({"URL": ["u0", "u1"], "TEXT": ["a", "b"], "input_row": [0, 1]}), d / "_input.parquet")
    (d / "00000_stats.json").write_text("{}")


def _jpeg():
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "green").save(buf, format="JPEG")
    return buf.getvalue()


def test_tar_member_escaping_the_folder_is_never_followed(tmp_path):
    from t2i_curate.pipeline.core.config import load_config
    from t2i_curate.pipeline.score.stage import score_shard
    from t2i_curate.pipeline.select.stage import select_stage
    from t2i_curate.pipeline.write.stage import write_stage

    run = tmp_path / "runs" / "t"
    good = _jpeg()
    _crafted_shard(run, [("0000000.jpg", good), ("../../escape.jpg", good), ("0000001/../../x.jpg", good),
                         ("/abs.jpg", good), ("0000001.jpg", good)])
    # the two members are the same green image: near-duplicate dedup would keep one
    cfg = load_config("demo", [f"runs_dir={tmp_path / 'runs'}", "name=t", "workers=1", "select.rules=[]",
                               "select.dedup.phash.enabled=false"])
    score_shard(str(run), cfg.score.model_dump_json(), 0)
    assert select_stage(cfg, run)["selected"] == 2
    write_stage(cfg, run)
    names = tarfile.open(run / "selected" / "00000.tar").getnames()
    assert all(n.startswith(("0000000.", "0000001.")) for n in names)
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path / "runs" / "escape.jpg").exists()
    assert not list(tmp_path.rglob("x.jpg")) and not list(tmp_path.rglob("abs.jpg"))


def test_truncated_tar_records_failures_and_keeps_the_rest(tmp_path):
    from t2i_curate.pipeline.core.config import load_config
    from t2i_curate.pipeline.score.stage import score_shard

    run = tmp_path / "runs" / "t"
    import numpy as np

    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    _crafted_shard(run, [("0000000.jpg", _jpeg()), ("0000001.png", buf.getvalue())])
    tar = run / "download" / "00000.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: 512 * 3 + 2000])  # cut inside the second member
    cfg = load_config("demo", [f"runs_dir={tmp_path / 'runs'}", "name=t", "workers=1"])
    counts = score_shard(str(run), cfg.score.model_dump_json(), 0)
    assert counts == {"skipped": 0, "scored": 1, "failed": 1}
    t = {r["key"]: r for r in pq.read_table(run / "scores" / "00000.parquet").to_pylist()}
    assert t["0000000"]["score_status"] == "ok"
    assert "missing from the download tar" in t["0000001"]["score_error"]
