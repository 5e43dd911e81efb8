"""LAION-style input: a folder or glob of parquet parts, checked first, streamed, resumed across parts.

Images are served on 127.0.0.1 (conftest.curate allows private addresses); parts are small parquet
files written after the server starts, so their URLs carry its port.
"""

import io
import json
import os

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import curate
from PIL import Image

from t2i_curate.pipeline.core.config import load_config
from t2i_curate.pipeline.core.layout import RunLayout
from t2i_curate.pipeline.download import parts
from t2i_curate.pipeline.download.demo import serve_folder
from t2i_curate.pipeline.download.stage import InputError

N_IMAGES = 12
COMMON = ("--set", "download.processes=1", "--set", "download.threads=4", "--set", "workers=1",
          "--set", "download.samples_per_shard=3", "--set", "select.rules=[]",
          "--set", "score.scorers=[resolution]", "--set", "write.samples_per_shard=5")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parts")
    (tmp / "site" / "img").mkdir(parents=True)
    for i in range(N_IMAGES):
        buf = io.BytesIO()
        Image.new("RGB", (200 + i, 150), (20 * i, 90, 200)).save(buf, format="JPEG")
        (tmp / "site" / "img" / f"{i}.jpg").write_bytes(buf.getvalue())
    with serve_folder(tmp / "site") as base:
        yield tmp, base


def _part(path, base, rows, extra_url=None):
    """A LAION-like part: URL, TEXT, similarity (a float extra column)."""
    urls = [f"{base}/img/{i}.jpg" for i in rows] + ([extra_url] if extra_url else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"URL": urls, "TEXT": [f"picture {u.rsplit('/', 1)[-1]}" for u in urls],
                             "similarity": [0.3] * len(urls)}), path)
    return path


def _cli(cmd, urls, runs, name, *sets, check=True):
    return curate(cmd, "--urls", urls, "--set", f"runs_dir={runs}", "--set", f"name={name}", *COMMON, *sets,
                  check=check)


def test_folder_of_three_parts_runs_end_to_end(site):
    tmp, base = site
    folder = tmp / "laion"
    _part(folder / "part-0.parquet", base, range(0, 4))
    _part(folder / "part-1.parquet", base, range(4, 8), extra_url="file:///etc/passwd")
    _part(folder / "part-2.parquet", base, range(8, 12))
    run = tmp / "runs" / "folder"
    _cli("run", folder, tmp / "runs", "folder")
    f = json.loads((run / "report" / "funnel.json").read_text())
    assert f["input"] == 13 and f["written"] == 12 and f["failed"] == 1
    con = duckdb.connect()
    traced = con.execute(f"""
        SELECT input_file, part_row, input_row FROM read_parquet('{run}/download/0*.parquet')
        UNION ALL SELECT input_file, part_row, input_row FROM read_parquet('{run}/download/_refused/*.parquet')
        ORDER BY input_row""").fetchall()
    expected = [(f"part-{p}.parquet", r) for p, n in ((0, 4), (1, 5), (2, 4)) for r in range(n)]
    assert [(a, b) for a, b, _ in traced] == expected
    assert [c for _, _, c in traced] == list(range(13))  # input_row: one running index over the parts
    refused = con.execute(f"SELECT input_file, part_row, reason FROM read_parquet('{run}/download/_refused/*')"
                          ).fetchall()
    assert refused[0][:2] == ("part-1.parquet", 4) and "scheme 'file'" in refused[0][2]
    assert len(list((run / "download" / "_input").glob("part-*.parquet"))) == 3
    q = curate("query", "--run", run, "SELECT count(*) AS n, count(DISTINCT input_file) AS files FROM input",
               "--format", "json").stdout.strip().splitlines()[0]
    assert json.loads(q) == {"n": 13, "files": 3}
    curate("verify", run)


def _shards(run):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((run / "download").glob("0*"))}


@pytest.mark.slow
def test_glob_then_a_part_added_later_is_picked_up_without_touching_finished_shards(site):
    tmp, base = site
    folder = tmp / "grow"
    _part(folder / "b.parquet", base, range(0, 4))
    _part(folder / "c.parquet", base, range(4, 6))
    (folder / "notes.txt").write_text("not a part")
    run = tmp / "runs" / "grow"
    _cli("download", f"{folder}/*.parquet", tmp / "runs", "grow")
    before = _shards(run)
    assert len([n for n in before if n.endswith(".tar")]) == 3  # 4 rows -> 2 shards of 3, then 2 rows -> 1
    _part(folder / "a.parquet", base, range(6, 11))  # sorts first, but is appended after the others
    _cli("download", f"{folder}/*.parquet", tmp / "runs", "grow")
    after = _shards(run)
    assert {k: after[k] for k in before} == before  # finished shards: same bytes, same mtime
    assert sorted(set(after) - set(before)) == [f"0000{s}{e}" for s in (3, 4)
                                                for e in (".parquet", ".tar", "_stats.json")]
    rows = duckdb.connect().execute(f"SELECT input_file, min(input_row), count(*) FROM "
                                    f"read_parquet('{run}/download/0*.parquet') GROUP BY 1 ORDER BY 2").fetchall()
    assert rows == [("b.parquet", 0, 4), ("c.parquet", 4, 2), ("a.parquet", 6, 5)]
    # a part this run read may not change (size or mtime): refused before any work
    os.utime(folder / "c.parquet", ns=(1, 1))
    p = _cli("download", f"{folder}/*.parquet", tmp / "runs", "grow", check=False)
    assert p.returncode == 2 and "c.parquet changed since this run folder read it" in p.stderr
    assert _shards(run) == after


def _cfg(tmp, name, **input_sets):
    sets = [f"runs_dir={tmp / 'runs'}", f"name={name}", "download.samples_per_shard=20",
            "download.allow_private_addresses=true"] + [f"input.{k}={v}" for k, v in input_sets.items()]
    return load_config("demo", sets)


def test_parts_disagreeing_on_url_or_caption_are_refused_naming_the_part(tmp_path):
    icfg = _cfg(tmp_path, "x").input
    good = _part(tmp_path / "p" / "a.parquet", "http://h", range(2))
    pq.write_table(pa.table({"URL": ["http://h/x"], "caption": ["no TEXT column"], "similarity": [0.1]}),
                   tmp_path / "p" / "b.parquet")
    with pytest.raises(InputError, match=r"input part .*b\.parquet: expected a caption column 'TEXT'"):
        parts.discover_parts(tmp_path / "p", icfg)
    pq.write_table(pa.table({"URL": ["http://h/x"], "TEXT": [7], "similarity": [0.1]}), tmp_path / "p" / "b.parquet")
    with pytest.raises(InputError, match=r"b\.parquet: caption column 'TEXT' is int64, but part 'a.parquet' has"):
        parts.discover_parts(tmp_path / "p", icfg)
    pq.write_table(pa.table({"URL": [3], "TEXT": ["t"], "similarity": [0.1]}), tmp_path / "p" / "b.parquet")
    with pytest.raises(InputError, match=r"b\.parquet: URL column 'URL' must hold strings, got int64"):
        parts.discover_parts(tmp_path / "p", icfg)
    assert not parts.is_multi(good) and parts.is_multi(tmp_path / "p") and parts.is_multi(f"{tmp_path}/p/*.parquet")
    # through the CLI: exit 2, the part named, no run folder left
    p = curate("download", "--urls", tmp_path / "p", "--set", f"runs_dir={tmp_path / 'runs'}", check=False)
    assert p.returncode == 2 and "b.parquet" in p.stderr and "must hold strings" in p.stderr
    assert not (tmp_path / "runs" / "demo").exists()


def _bad_folder(tmp, base):
    folder = tmp / "bad"
    _part(folder / "p0.parquet", base, range(0, 3))
    (folder / "p1.parquet").write_bytes(b"PAR1 this is not parquet")
    return folder


def test_unreadable_part_refused_naming_it(site):
    tmp, base = site
    folder = _bad_folder(tmp, base)
    p = _cli("download", folder, tmp / "runs", "bad", check=False)
    assert p.returncode == 2 and "p1.parquet: cannot read it as parquet" in p.stderr
    assert not (tmp / "runs" / "bad").exists()  # nothing made, nothing downloaded


@pytest.mark.slow
def test_unreadable_part_skipped_is_listed_in_the_funnel(site):
    tmp, base = site
    folder = _bad_folder(tmp, base)
    run = tmp / "runs" / "badskip"
    _cli("run", folder, tmp / "runs", "badskip", "--set", "input.skip_bad_parts=true")
    f = json.loads((run / "report" / "funnel.json").read_text())
    assert f["input"] == 3 and f["written"] == 3  # the skipped part's rows are unknown: not in `input`
    assert [s["part"] for s in f["skipped_parts"]] == ["p1.parquet"] and f["skipped_parts"][0]["rows"] is None
    assert "skipped part | `p1.parquet`" in (run / "report" / "funnel.md").read_text()
    curate("verify", run)


def _corrupt_data(path):
    """Keep the footer (rows known), break the first data page."""
    raw = bytearray(path.read_bytes())
    raw[4:40] = b"\xff" * 36
    path.write_bytes(bytes(raw))


def test_part_with_readable_footer_and_broken_data_ends_failed_rows(tmp_path):
    folder = tmp_path / "p"
    _part(folder / "a.parquet", "http://example.com", range(5))
    _part(folder / "b.parquet", "http://example.com", range(7))
    _corrupt_data(folder / "b.parquet")
    cfg = _cfg(tmp_path, "broken", skip_bad_parts="true")
    man = parts.prepare_parts(cfg, cfg.run_dir, parts.discover_parts(folder, cfg.input))
    assert [(e["name"], e["status"], e["rows"]) for e in man["parts"]] == [("a.parquet", "ok", 5),
                                                                          ("b.parquet", "failed", 7)]
    lay = RunLayout(cfg.run_dir)
    refused = pq.read_table(lay.refused_part(1)).to_pylist()
    assert [r["input_row"] for r in refused] == list(range(5, 12))
    assert all(r["reason"].startswith("unreadable input part b.parquet") and r["rule"] is None for r in refused)
    assert pq.read_metadata(lay.input_part(1)).num_rows == 7 and not list(lay.fetch_dir.glob("part-00001-*"))
    with pytest.raises(InputError, match=r"b\.parquet: cannot read its rows"):
        cfg2 = _cfg(tmp_path, "broken2")
        parts.prepare_parts(cfg2, cfg2.run_dir, parts.discover_parts(folder, cfg2.input))


def test_parts_are_streamed_batch_by_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(parts, "BATCH_ROWS", 10)
    monkeypatch.setattr(parts, "FETCH_CHUNK_ROWS", 45)  # rounded down to 40: a multiple of samples_per_shard
    folder = tmp_path / "p"
    n = 95
    pq.write_table(pa.table({"URL": [f"http://example.com/{i}.jpg" for i in range(n)], "TEXT": ["t"] * n,
                             "similarity": [0.5] * n}), folder.mkdir() or folder / "big.parquet", row_group_size=n)
    seen = []
    real = parts.normalise_batch

    def spy(batch, *a):
        seen.append(batch.num_rows)
        return real(batch, *a)

    monkeypatch.setattr(parts, "normalise_batch", spy)
    cfg = _cfg(tmp_path, "stream")
    man = parts.prepare_parts(cfg, cfg.run_dir, parts.discover_parts(folder, cfg.input))
    assert seen == [10] * 9 + [5]  # one 95-row row group, read 10 rows at a time
    lay = RunLayout(cfg.run_dir)
    assert pq.ParquetFile(lay.input_part(0)).num_row_groups == 10  # written batch by batch
    assert man["parts"][0]["fetch"] == [["part-00000-0000.parquet", 40], ["part-00000-0001.parquet", 40],
                                        ["part-00000-0002.parquet", 15]]
    got = parts.read_input_rows(lay, [93, 2, 50])
    assert got["input_row"].to_pylist() == [93, 2, 50] and got["part_row"].to_pylist() == [93, 2, 50]


def test_vectorised_guard_fast_path_never_allows_what_url_refusal_refuses():
    from test_url_safety import TABLE

    from t2i_curate.pipeline.core.config import DownloadConfig
    from t2i_curate.pipeline.core.urls import url_refusal

    urls = list(TABLE) + [
        "https://images.example.com/a/b.jpg?x=1#f", "HTTP://CDN.Example.ORG:8080/x", "https://a.b.localhost/x",
        "http://localhost.localdomain/x", "http://ip6-localhost/x", "http://cafe.bad/x", "http://127.0.0.1.nip.io/x",
        "http://user@example.com/x", "http://example.com /x", " http://example.com/x", "http://example.com\n",
        "ftp://example.com/x", "http://0x7f.0x1/x", "http://example.123/x", "http://example/x", "https://ex.co:99999/",
    ]
    col = pa.array(urls, type=pa.string())
    for dcfg in (DownloadConfig(), DownloadConfig(allow_private_addresses=True),
                 DownloadConfig(allowed_schemes=["https"])):
        fast = parts.surely_allowed(col, dcfg)
        assert fast.sum() >= 6 if dcfg.allowed_schemes != ["https"] else fast.sum() >= 4
        for u, ok in zip(urls, fast, strict=True):
            if ok:
                assert url_refusal(u, dcfg) is None, u


@pytest.mark.slow
def test_download_killed_mid_parts_then_rerun_loses_and_duplicates_nothing(site):
    from test_kill import _kill_when

    tmp, base = site
    folder = tmp / "killparts"
    for p, rows in enumerate((range(0, 5), range(5, 8), range(8, 12))):
        _part(folder / f"p{p}.parquet", base, rows)
    args = ["--urls", folder, "--set", f"runs_dir={tmp / 'runs'}", *COMMON,
            "--set", "download.allow_private_addresses=true", "--set", "download.threads=1"]
    curate("run", *args, "--set", "name=kref")
    run = tmp / "runs" / "kill"
    killed = _kill_when(["download", *args, "--set", "name=kill"],
                        lambda: len(list((run / "download").glob("*_stats.json"))) >= 2)
    assert killed
    curate("run", *args, "--set", "name=kill")
    curate("verify", run)

    def dec(name):
        return sorted((r["key"], r["state"]) for r in
                      pq.read_table(tmp / "runs" / name / "selected" / "decisions.parquet").to_pylist())

    assert dec("kill") == dec("kref") and len(dec("kill")) == 12
    assert not list(run.rglob(".tmp-*"))
