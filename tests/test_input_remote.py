"""URL-list input on an object store: one remote file, a remote folder of parts, a remote glob of parts.

A real S3-compatible server (moto, the ``s3_store`` fixture) holds the parts; images are served on
127.0.0.1 by test_parts' ``site`` fixture, and parts are made with its ``_part`` helper locally, then
uploaded, so their URLs carry the image server's port.
"""

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import test_parts
from conftest import curate
from test_parts import COMMON, _cfg, _part

from t2i_curate.pipeline.core.io import as_path, duck_connect, is_remote, read_table, sql_path
from t2i_curate.pipeline.core.layout import RunLayout
from t2i_curate.pipeline.core.lock import RunFolderError
from t2i_curate.pipeline.download import parts
from t2i_curate.pipeline.download.stage import InputError, prepare_input, read_url_list

site = test_parts.site  # the images on loopback (module-scoped fixture)


def _upload(local, url: str) -> str:
    dest = as_path(url)
    dest.fs.put_file(str(local), dest.path)
    return url


def _remote_part(tmp, url: str, base, rows, extra_url=None) -> str:
    local = _part(tmp / "staging" / url.split("://", 1)[1], base, rows, extra_url=extra_url)
    return _upload(local, url)


# --- fast: discovery and reading through the store's filesystem ---------------------------------------


def test_remote_folder_and_glob_list_parts_with_relative_names_and_stamps(s3_store, tmp_path):
    folder = f"{s3_store}/fold"
    for i, rows in enumerate((range(0, 3), range(3, 5))):
        _remote_part(tmp_path, f"{folder}/part-{i}.parquet", "http://example.com", rows)
    _upload(_part(tmp_path / "x" / "_hidden.parquet", "http://example.com", range(1)), f"{folder}/_SUCCESS")
    _upload(_part(tmp_path / "x" / "n.parquet", "http://example.com", range(1)), f"{folder}/sub/n.parquet")
    icfg = _cfg(tmp_path, "fold").input
    assert parts.is_multi(folder) and parts.is_multi(f"{folder}/") and parts.is_multi(f"{folder}/*.parquet")
    assert not parts.is_multi(f"{folder}/part-0.parquet")
    for spec in (folder, f"{folder}/", f"{folder}/part-*.parquet", f"{s3_store}/fo*/part-*.parquet"):
        ps = parts.discover_parts(spec, icfg)
        names = [p.name for p in ps.parts]
        want = ["part-0.parquet", "part-1.parquet"] if "fo*" not in spec else ["fold/part-0.parquet",
                                                                               "fold/part-1.parquet"]
        assert names == want, spec
        assert ps.total_rows == 5 and all(is_remote(p.path) for p in ps.parts)
        assert all(p.size > 0 and p.mtime_ns > 0 for p in ps.parts)
    recursive = parts.discover_parts(f"{folder}/**/*.parquet", icfg)
    assert "sub/n.parquet" in [p.name for p in recursive.parts]
    with pytest.raises(InputError, match=r"the glob .*nothing-\*\.parquet.* matches no file"):
        parts.discover_parts(f"{folder}/nothing-*.parquet", icfg)


def test_remote_parts_normalised_to_a_local_run_keep_input_file_and_row(s3_store, tmp_path):
    folder = f"{s3_store}/norm"
    _remote_part(tmp_path, f"{folder}/a.parquet", "http://example.com", range(0, 4))
    _remote_part(tmp_path, f"{folder}/b.parquet", "http://example.com", range(4, 7))
    cfg = _cfg(tmp_path, "norm")
    ps = parts.discover_parts(f"{folder}/*.parquet", cfg.input)
    man = parts.prepare_parts(cfg, cfg.run_dir, ps)
    assert [(e["name"], e["rows"], e["path"]) for e in man["parts"]] == [
        ("a.parquet", 4, f"{folder}/a.parquet"), ("b.parquet", 3, f"{folder}/b.parquet")]
    lay = RunLayout(cfg.run_dir)
    rows = pa.concat_tables([pq.read_table(lay.input_part(i)) for i in (0, 1)]).to_pylist()
    assert [(r["input_file"], r["part_row"], r["input_row"]) for r in rows] == (
        [("a.parquet", i, i) for i in range(4)] + [("b.parquet", i, 4 + i) for i in range(3)])
    assert rows[5]["URL"] == "http://example.com/img/5.jpg"
    # a recorded remote part that changed on the store (another size) is refused before any work
    _remote_part(tmp_path, f"{folder}/b.parquet", "http://example.com", range(4, 9))
    with pytest.raises(RunFolderError, match=r"input part s3://.*/norm/b\.parquet changed since this run"):
        parts.check_recorded(man, parts.discover_parts(f"{folder}/*.parquet", cfg.input))
    # ... and one re-uploaded with the same size and the same whole-second last-modified: only the store's
    # content tag (S3's ETag, recorded with the part) tells them apart
    assert all(e["etag"] for e in man["parts"])
    a = as_path(f"{folder}/a.parquet")
    data = a.read_bytes()
    i = data.index(b"example.com")  # a data page: the footer, hence rows and schema, read as before
    for _ in range(3):  # both uploads inside one second of the store's clock
        time.sleep(1.02 - time.time() % 1)
        a.fs.pipe_file(a.path, data)
        before = parts.discover_parts(f"{folder}/a*.parquet", cfg.input).parts[0]
        a.fs.pipe_file(a.path, data[:i] + b"EXAMPLE.COM" + data[i + 11:])
        after = parts.discover_parts(f"{folder}/a*.parquet", cfg.input).parts[0]
        if (after.size, after.mtime_ns) == (before.size, before.mtime_ns):
            break
    else:
        pytest.skip("the two uploads never fell into the same second")
    assert after.etag and before.etag and after.etag != before.etag
    recorded = {**man, "parts": [{**man["parts"][0], "mtime_ns": before.mtime_ns, "etag": before.etag}]}
    parts.check_recorded({**recorded, "parts": [{**recorded["parts"][0], "etag": after.etag}]},
                         parts.discover_parts(f"{folder}/a*.parquet", cfg.input))  # same tag: accepted
    with pytest.raises(RunFolderError, match=r"norm/a\.parquet changed since .* etag "):
        parts.check_recorded(recorded, parts.discover_parts(f"{folder}/a*.parquet", cfg.input))


def test_remote_csv_parts_are_streamed_from_the_store(s3_store, tmp_path):
    folder = f"{s3_store}/csv"
    for i in range(2):
        local = tmp_path / f"p{i}.csv"
        local.write_text("URL,TEXT,similarity\n" + "".join(f"http://example.com/{i}-{r}.jpg,cap {r},0.5\n"
                                                           for r in range(3)))
        _upload(local, f"{folder}/p{i}.csv")
    cfg = _cfg(tmp_path, "csv")
    ps = parts.discover_parts(folder, cfg.input)
    assert [p.fmt for p in ps.parts] == ["csv", "csv"] and ps.parts[0].rows is None
    man = parts.prepare_parts(cfg, cfg.run_dir, ps)
    assert [(e["name"], e["rows"]) for e in man["parts"]] == [("p0.csv", 3), ("p1.csv", 3)]
    t = pq.read_table(RunLayout(cfg.run_dir).input_part(1))
    assert t["URL"].to_pylist()[2] == "http://example.com/1-2.jpg" and t["input_row"].to_pylist() == [3, 4, 5]


def test_remote_part_without_the_url_column_is_refused_naming_it(s3_store, tmp_path):
    folder = f"{s3_store}/nourl"
    _remote_part(tmp_path, f"{folder}/p0.parquet", "http://example.com", range(0, 3))
    local = tmp_path / "p1.parquet"
    pq.write_table(pa.table({"url": ["http://example.com/x.jpg"], "TEXT": ["t"], "similarity": [0.1]}), local)
    _upload(local, f"{folder}/p1.parquet")
    icfg = _cfg(tmp_path, "nourl").input
    with pytest.raises(InputError, match=r"input part s3://.*/nourl/p1\.parquet: expected a URL column 'URL'"):
        parts.discover_parts(f"{folder}/*.parquet", icfg)
    # through the CLI: exit 2, the part named, no run folder made (runs_dir on the same store)
    runs = f"{s3_store}/nourl-runs"
    p = curate("download", "--urls", f"{folder}/*.parquet", "--set", f"runs_dir={runs}", "--set", "name=x",
               check=False)
    assert p.returncode == 2, p.stderr
    assert "p1.parquet: expected a URL column 'URL'" in p.stderr
    assert not as_path(runs).exists() and not as_path(f"{runs}/x").exists()


def test_single_remote_file_is_read_through_the_store(s3_store, tmp_path):
    url = _remote_part(tmp_path, f"{s3_store}/one/urls.parquet", "http://example.com", range(0, 5))
    cfg = _cfg(tmp_path, "one")
    assert not parts.is_multi(url)
    table = read_url_list(url, cfg.input)
    assert table.num_rows == 5 and table["URL"].to_pylist()[4] == "http://example.com/img/4.jpg"
    out, extras = prepare_input(cfg.run_dir, as_path(url), cfg.input)
    assert read_table(out)["input_row"].to_pylist() == list(range(5)) and "input_similarity" in extras
    local = tmp_path / "urls.jsonl"
    local.write_text("".join(json.dumps({"URL": f"http://example.com/{i}.jpg", "TEXT": f"c{i}"}) + "\n"
                             for i in range(3)))
    jl = read_url_list(_upload(local, f"{s3_store}/one/urls.jsonl"), cfg.input)
    assert jl["TEXT"].to_pylist() == ["c0", "c1", "c2"]
    with pytest.raises(InputError, match=r"s3://.*/one/missing\.parquet does not exist"):
        read_url_list(f"{s3_store}/one/missing.parquet", cfg.input)


# --- slow: the CLI end to end -------------------------------------------------------------------------


@pytest.mark.slow
def test_remote_glob_of_parts_runs_end_to_end_on_the_store(s3_store, site, tmp_path):
    tmp, base = site
    folder = f"{s3_store}/laion"
    _remote_part(tmp_path, f"{folder}/part-0.parquet", base, range(0, 4))
    _remote_part(tmp_path, f"{folder}/part-1.parquet", base, range(4, 8), extra_url="file:///etc/passwd")
    _remote_part(tmp_path, f"{folder}/part-2.parquet", base, range(8, 12))
    runs = f"{s3_store}/runs"
    curate("run", "--urls", f"{folder}/*.parquet", "--set", f"runs_dir={runs}", "--set", "name=glob", *COMMON)
    run = as_path(f"{runs}/glob")
    f = json.loads((run / "report" / "funnel.json").read_text())
    assert f["input"] == 13 and f["written"] == 12 and f["failed"] == 1
    con = duck_connect(run)
    traced = con.execute(f"""
        SELECT input_file, part_row, input_row FROM read_parquet('{sql_path(run / 'download')}/0*.parquet')
        UNION ALL SELECT input_file, part_row, input_row
        FROM read_parquet('{sql_path(run / 'download' / '_refused')}/*.parquet') ORDER BY input_row""").fetchall()
    expected = [(f"part-{p}.parquet", r) for p, n in ((0, 4), (1, 5), (2, 4)) for r in range(n)]
    assert [(a, b) for a, b, _ in traced] == expected
    assert [c for _, _, c in traced] == list(range(13))
    man = json.loads((run / "download" / "_input" / "_parts.json").read_text())
    assert [e["path"] for e in man["parts"]] == [f"{folder}/part-{i}.parquet" for i in range(3)]
    curate("verify", run)


@pytest.mark.slow
def test_single_remote_parquet_file_downloads_to_a_local_run(s3_store, site, tmp_path):
    tmp, base = site
    url = _remote_part(tmp_path, f"{s3_store}/single/urls.parquet", base, range(0, 5))
    curate("download", "--urls", url, "--set", f"runs_dir={tmp_path / 'runs'}", "--set", "name=single", *COMMON)
    got = pq.read_table(tmp_path / "runs" / "single" / "download" / "_input.parquet")
    assert got["input_row"].to_pylist() == list(range(5))
    ok = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "runs" / "single" / "download")
                                                           .glob("0*.parquet"))])
    assert sorted(ok.filter(pa.compute.equal(ok["status"], "success"))["url"].to_pylist()) == sorted(
        f"{base}/img/{i}.jpg" for i in range(5))
