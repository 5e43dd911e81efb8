"""End to end on the built-in demo: download (img2dataset, loopback), score, select, write."""

import json
import tarfile

import duckdb
import pyarrow.parquet as pq
import pytest
from conftest import curate, small_demo_args

from t2i_curate.pipeline.core.io import sha256_file


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    p = curate("run", *small_demo_args(runs))
    return runs / "demo", p


def _members(tar_path):
    with tarfile.open(tar_path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}


def test_every_row_accounted_for(demo_run):
    run, _ = demo_run
    f = json.loads((run / "report" / "funnel.json").read_text())
    n_input = pq.read_metadata(run / "download" / "_input.parquet").num_rows
    # 60 images + 3 dead, 3 html, 3 truncated + 3 exact duplicates + 4 near copies (re-encoded / resized)
    assert f["input"] == n_input == 60 + 9 + 3 + 4
    assert f["written"] + f["dropped"] + f["failed"] == n_input
    assert f["written"] > 0 and f["dropped"] > 0 and f["failed"] == 9
    dec = pq.read_table(run / "selected" / "decisions.parquet").to_pylist()
    assert len(dec) == n_input and len({d["key"] for d in dec}) == n_input
    assert all(d["rule"] for d in dec if d["state"] == "dropped")
    assert all(d["error"] for d in dec if d["state"] == "failed")


def test_failures_have_their_reasons(demo_run):
    run, _ = demo_run
    con = duckdb.connect()
    rows = con.execute(
        f"""SELECT i.demo_id, d.error FROM read_parquet('{run}/download/0000*.parquet') i
            JOIN read_parquet('{run}/selected/decisions.parquet') d USING (key)
            WHERE d.state = 'failed'""").fetchall()
    gt = {r["demo_id"]: r["kind"] for r in pq.read_table(run.parent / "_demo" / "ground_truth.parquet").to_pylist()}
    kinds = {gt[i]: e for i, e in rows}
    assert set(kinds) == {"dead_link", "not_image", "truncated"}
    assert "404" in kinds["dead_link"]


def test_demo_duplicates_keep_one_copy(demo_run):
    run, _ = demo_run
    f = json.loads((run / "report" / "funnel.json").read_text())
    assert f["dropped_by_rule"]["duplicate"] == 3
    rows = duckdb.connect().execute(f"""
        SELECT i.demo_id, d.state, d.rule, o.demo_id FROM read_parquet('{run}/download/0000*.parquet') i
        JOIN read_parquet('{run}/selected/decisions.parquet') d USING (key)
        LEFT JOIN read_parquet('{run}/download/0000*.parquet') o ON o.key = d.duplicate_of""").fetchall()
    got = {i: (state, rule, of) for i, state, rule, of in rows}
    gt = pq.read_table(run.parent / "_demo" / "ground_truth.parquet").to_pylist()
    pairs = [(r["demo_id"], r["duplicate_of"]) for r in gt if r["duplicate_of"] is not None]
    assert len(pairs) == 3
    for copy, original in pairs:  # exactly one of the two is written, the other points at it
        states = sorted([got[copy], got[original]], key=lambda s: s[0] != "selected")
        kept = copy if got[copy][0] == "selected" else original
        assert states[0] == ("selected", None, None)
        assert states[1] == ("dropped", "duplicate", kept)


def test_sizes_match_ground_truth(demo_run):
    run, _ = demo_run
    gt = {r["demo_id"]: r for r in pq.read_table(run.parent / "_demo" / "ground_truth.parquet").to_pylist()}
    rows = duckdb.connect().execute(
        f"SELECT demo_id, original_width, original_height FROM read_parquet('{run}/download/0000*.parquet') "
        "WHERE status = 'success'").fetchall()
    assert len(rows) == 60 + 3 + 4  # the exact duplicates and the near copies download fine
    for i, w, h in rows:
        assert (w, h) == (gt[i]["true_width"], gt[i]["true_height"])


def test_shards_manifest_and_bytes_unchanged(demo_run):
    run, _ = demo_run
    manifest = json.loads((run / "selected" / "manifest.json").read_text())
    dec = pq.read_table(run / "selected" / "decisions.parquet").to_pylist()
    selected = sorted(d["key"] for d in dec if d["state"] == "selected")
    written = []
    for entry in manifest["shards"]:
        tar = run / "selected" / f"{entry['shard']}.tar"
        assert sha256_file(tar) == entry["sha256"]
        members = _members(tar)
        keys = sorted({n.split(".")[0] for n in members})
        assert len(keys) == entry["samples"] <= 15
        meta = pq.read_table(tar.with_suffix(".parquet")).to_pylist()
        assert [m["key"] for m in meta] == keys
        for k in keys:
            src = _members(run / "download" / f"{k[:5]}.tar")
            assert members[f"{k}.jpg"] == src[f"{k}.jpg"]  # no re-encode
            assert members[f"{k}.txt"] == src[f"{k}.txt"]
            j = json.loads(members[f"{k}.json"])
            assert j["key"] == k and j["shorter_side"] == min(j["original_width"], j["original_height"])
        written += keys
    assert written == selected and manifest["samples"] == len(selected)


def test_selected_samples_satisfy_rules(demo_run):
    run, _ = demo_run
    rows = duckdb.connect().execute(
        f"SELECT shorter_side, aspect_ratio, caption FROM read_parquet('{run}/selected/0*.parquet')").fetchall()
    for short, aspect, cap in rows:
        assert short >= 256 and aspect <= 3 and len(cap.split()) > 2 and len(cap.strip()) > 5


def test_catalog_views_and_query_formats(demo_run, tmp_path):
    run, _ = demo_run
    con = duckdb.connect(str(run / "catalog.duckdb"), read_only=True)
    views = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    assert {"input", "downloads", "scores", "samples", "decisions", "funnel", "shards"} <= views
    total = con.execute("SELECT sum(samples) FROM funnel").fetchall()[0][0]
    assert total == 76
    out = tmp_path / "q.csv"
    curate("query", "--run", run, "SELECT state, count(*) AS n FROM decisions GROUP BY 1 ORDER BY 1",
           "--format", "csv", "--output", out)
    assert out.read_text().splitlines()[0] == '"state","n"'
    p = curate("query", "--run", run, "SELECT count(*) AS n FROM shards", "--format", "json")
    assert json.loads(p.stdout.strip())["n"] == json.loads((run / "selected" / "manifest.json").read_text())["samples"]
    bad = curate("query", "--run", run, "SELECT nope FROM shards", check=False)
    assert bad.returncode == 2 and "views in this run" in bad.stderr


def test_rerun_skips_and_changes_nothing(demo_run):
    run, _ = demo_run
    before = {p.name: sha256_file(p) for p in (run / "selected").glob("*.tar")}
    manifest_before = json.loads((run / "selected" / "manifest.json").read_text())
    p = curate("run", *small_demo_args(run.parent))
    assert "all 4 shards finished already" in p.stderr
    after = {p.name: sha256_file(p) for p in (run / "selected").glob("*.tar")}
    assert before == after
    assert json.loads((run / "selected" / "manifest.json").read_text())["shards"] == manifest_before["shards"]


def test_interrupted_write_resumes_without_loss_or_duplicates(demo_run):
    run, _ = demo_run
    manifest = json.loads((run / "selected" / "manifest.json").read_text())
    # simulate a write killed mid-way: one shard gone, one parquet gone, a temporary left behind
    (run / "selected" / "00000.tar").unlink()
    (run / "selected" / "00001.parquet").unlink()
    (run / "selected" / ".tmp-dead-00002.tar").write_bytes(b"partial")
    curate("write", *small_demo_args(run.parent))
    again = json.loads((run / "selected" / "manifest.json").read_text())
    assert [(s["shard"], s["sha256"]) for s in again["shards"]] == [(s["shard"], s["sha256"]) for s in manifest["shards"]]
    assert not list((run / "selected").glob(".tmp-*"))


def test_changed_rules_rewrite_only_what_changed(demo_run, tmp_path):
    run, _ = demo_run
    args = small_demo_args(run.parent, extra=["--set", "select.rules=[{name: big, keep: 'shorter_side >= 600'}]"])
    curate("select", *args)
    curate("write", *args)
    keys = duckdb.connect().execute(f"SELECT key FROM read_parquet('{run}/selected/0*.parquet')").fetchall()
    assert len(keys) == len(set(keys))
    n_sel = duckdb.connect().execute(
        f"SELECT count(*) FROM read_parquet('{run}/selected/decisions.parquet') WHERE state='selected'").fetchall()[0][0]
    assert len(keys) == n_sel
    # back to the config's rules: same shards as the first run
    curate("run", *small_demo_args(run.parent))


def test_changing_scorers_rescores_without_a_new_download(demo_run):
    run, _ = demo_run
    tars = {p.name: sha256_file(p) for p in (run / "download").glob("*.tar")}
    p = curate("run", *small_demo_args(run.parent, extra=["--set", "score.scorers=[resolution, aesthetic, text]"]))
    assert "all 4 shards finished already" in p.stderr
    assert {p.name: sha256_file(p) for p in (run / "download").glob("*.tar")} == tars
    cols = pq.read_schema(run / "scores" / "00000.parquet").names
    assert "aesthetic_score" in cols and "text_area" in cols and "pwatermark" not in cols  # demo's rules need text
    curate("run", *small_demo_args(run.parent))  # back to the config's scorers
    assert "pwatermark" in pq.read_schema(run / "scores" / "00000.parquet").names


def test_verify_passes_then_finds_tampering(demo_run):
    run, _ = demo_run
    curate("verify", run)
    tar = run / "selected" / "00001.tar"
    original = tar.read_bytes()
    try:
        import shutil

        shutil.copy(run / "selected" / "00000.tar", tar)  # a duplicated shard
        r = curate("verify", run, check=False)
        assert r.returncode == 1
        assert "sha256 differs" in r.stderr and "more than once across shards" in r.stderr
    finally:
        tar.write_bytes(original)
    curate("verify", run)
