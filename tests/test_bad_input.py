"""Bad input is refused before any work, with a clear message and a non-zero exit."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import curate

from t2i_curate.pipeline.download.demo import serve_folder


def _args(runs, urls, *extra):
    return ["--set", f"runs_dir={runs}", "--set", "name=t", "--urls", urls, "--set", "download.processes=1",
            "--set", "workers=1", *extra]


def test_missing_url_column(tmp_path):
    p = tmp_path / "u.parquet"
    pq.write_table(pa.table({"link": ["http://127.0.0.1:9/a.jpg"], "TEXT": ["x"]}), p)
    r = curate("download", *_args(tmp_path / "runs", p), check=False)
    assert r.returncode == 2
    assert "expected a URL column 'URL'" in r.stderr and "link" in r.stderr
    assert not (tmp_path / "runs" / "t" / "download" / "00000.tar").exists()


def test_empty_list(tmp_path):
    p = tmp_path / "u.csv"
    p.write_text("URL,TEXT\n")
    r = curate("download", *_args(tmp_path / "runs", p), check=False)
    assert r.returncode == 2 and "empty" in r.stderr


def test_unreadable_file(tmp_path):
    p = tmp_path / "u.parquet"
    p.write_bytes(b"this is not parquet")
    r = curate("download", *_args(tmp_path / "runs", p), check=False)
    assert r.returncode == 2 and "cannot read as parquet" in r.stderr
    r = curate("download", *_args(tmp_path / "runs", tmp_path / "absent.parquet"), check=False)
    assert r.returncode == 2 and "no such file" in r.stderr


def test_mistyped_url_column(tmp_path):
    p = tmp_path / "u.parquet"
    pq.write_table(pa.table({"URL": [1, 2], "TEXT": ["a", "b"]}), p)
    r = curate("download", *_args(tmp_path / "runs", p), check=False)
    assert r.returncode == 2 and "must hold strings" in r.stderr


def test_bad_yaml_and_unknown_key(tmp_path):
    c = tmp_path / "c.yaml"
    c.write_text("select: {rules: [\n")
    r = curate("run", "--config", c, check=False)
    assert r.returncode == 2 and "not valid YAML" in r.stderr
    c.write_text("downlaod: {}\n")
    r = curate("run", "--config", c, check=False)
    assert r.returncode == 2 and "downlaod: unknown key" in r.stderr and str(c) in r.stderr


def test_non_writable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where a folder must go: unwritable even for root
    r = curate("run", "--set", f"runs_dir={blocker}/runs", check=False)
    assert r.returncode == 2 and "not writable" in r.stderr


def test_other_config_refused_and_work_kept(tmp_path):
    folder = tmp_path / "site"
    (folder / "img").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (300, 300), "red").save(folder / "img" / "a.jpg")
    with serve_folder(folder) as base:
        p = tmp_path / "u.csv"
        p.write_text(f"URL,TEXT\n{base}/img/a.jpg,a red square image\n")
        curate("download", *_args(tmp_path / "runs", p))
    tar = tmp_path / "runs" / "t" / "download" / "00000.tar"
    before = tar.read_bytes()
    r = curate("download", *_args(tmp_path / "runs", p, "--set", "download.image_size=64"), check=False)
    assert r.returncode == 2
    assert "made by a different config" in r.stderr and "download.image_size: 512 in the folder, 64 now" in r.stderr
    assert tar.read_bytes() == before


def test_rule_needing_missing_scorer(tmp_path):
    c = tmp_path / "c.yaml"
    c.write_text(json.dumps({"base": "sd-v1", "score": {"scorers": ["resolution"]}}))
    from t2i_curate.pipeline.core.config import load_config

    cfg = load_config(str(c))
    assert cfg.select.rules[1].name == "aesthetic_5"
    import duckdb

    from t2i_curate.filters.expressions import RuleError
    from t2i_curate.pipeline.select.stage import check_rules

    con = duckdb.connect()
    con.execute("CREATE VIEW samples AS SELECT 600 AS original_width, 600 AS original_height")
    with pytest.raises(RuleError, match="needs the aesthetic scorer .*aesthetic_score"):
        check_rules(con, cfg.select.rules)
    from t2i_curate.pipeline.core.config import Rule

    with pytest.raises(RuleError, match="expected a true/false expression"):
        check_rules(con, [Rule(name="n", keep="original_width + 1")])
