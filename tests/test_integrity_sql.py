"""Rules are expressions, not SQL programs; `curate query` is a reader.

A rule's `keep` and `select.dedup.keep_order` are parsed as one expression before anything runs, and
the select query runs on a DuckDB connection that can touch no file outside the run folder; `curate query`
builds its views in memory, writes nothing, runs one SELECT limited to the run folder (unless
`--allow-writes`), and works on a read-only run folder; no error echoes a file that is not ours.
"""

import contextlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from t2i_curate.filters.expressions import RuleError
from t2i_curate.pipeline.core.config import Rule, load_config

SECRET = "TOPSECRET-4242"


def _fake_download(run: Path, n: int = 4) -> None:
    """One download shard as img2dataset writes it (300 px and 200 px images), and the input beside it."""
    from PIL import Image

    d = run / "download"
    d.mkdir(parents=True)
    rows = []
    with tarfile.open(d / "00000.tar", "w") as tf:
        for i in range(n):
            buf = io.BytesIO()
            side = 300 if i % 2 == 0 else 200
            Image.new("RGB", (side, side), (i * 40, 90, 20)).save(buf, "JPEG")
            info = tarfile.TarInfo(f"00000000{i}.jpg")
            info.size = len(buf.getvalue())
            tf.addfile(info, io.BytesIO(buf.getvalue()))
            rows.append({"key": f"00000000{i}", "url": f"http://example.invalid/{i}.jpg", "caption": f"a cat number {i}",
                         "status": "success", "error_message": None, "original_width": side,
                         "original_height": side, "sha256": f"{i:064x}", "input_row": i})
    pq.write_table(pa.Table.from_pylist(rows), d / "00000.parquet")
    (d / "00000_stats.json").write_text("{}")
    pq.write_table(pa.Table.from_pylist([{"url": r["url"], "caption": r["caption"], "input_row": r["input_row"]}
                                         for r in rows]), d / "_input.parquet")


def _cfg(runs: Path, name: str = "r", rules=None, extra=()):
    rules = rules or "[{name: min_side, keep: 'shorter_side >= 256'}]"
    return load_config("demo", [f"runs_dir={runs}", f"name={name}", "workers=1", "score.scorers=[resolution]",
                                f"select.rules={rules}", *extra])


@pytest.fixture(scope="module")
def built_run(tmp_path_factory):
    """A finished small run (fake download, resolution scores, decisions, curated shards), built in-process."""
    from t2i_curate.pipeline.run import model_manifest
    from t2i_curate.pipeline.score.stage import score_stage
    from t2i_curate.pipeline.select.stage import select_stage
    from t2i_curate.pipeline.write.stage import write_stage

    runs = tmp_path_factory.mktemp("runs")
    run = runs / "r"
    _fake_download(run)
    cfg = _cfg(runs)
    score_stage(cfg, run, [0])
    assert select_stage(cfg, run) == {"selected": 2, "dropped": 2, "failed": 0}
    write_stage(cfg, run, model_manifest(run))
    return run


@pytest.fixture
def run(built_run, tmp_path):
    """A private copy of the finished run (a test may try to change it)."""
    dst = tmp_path / "runs" / "r"
    shutil.copytree(built_run, dst)
    return dst


@pytest.fixture
def secret(tmp_path):
    """A file outside the run folder whose content must never show."""
    p = tmp_path / "outside" / "secret.txt"
    p.parent.mkdir()
    p.write_text(f"{SECRET}\nroot:x:0:0:root:/root:/bin/bash\n")
    return p


def _select(run: Path, rules=None, extra=()):
    from t2i_curate.pipeline.select.stage import select_stage

    return select_stage(_cfg(run.parent, run.name, rules, extra), run)


def _with_rule(run: Path, keep: str):
    """select with one rule ``keep`` (set through the config object: any text, quotes included)."""
    from t2i_curate.pipeline.select.stage import select_stage

    cfg = _cfg(run.parent, run.name)
    cfg = cfg.model_copy(update={"select": cfg.select.model_copy(update={"rules": [Rule(name="r1", keep=keep)]})})
    return select_stage(cfg, run)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


# ---- A. rules are expressions ----------------------------------------------------------------------------

def test_a_rule_with_several_statements_runs_none_of_them(run, tmp_path):
    target = tmp_path / "written_by_a_rule.csv"
    keep = f"1=1)) FROM samples; COPY (SELECT 'x') TO '{target}'; SELECT ((1=1"
    with pytest.raises(RuleError):
        _with_rule(run, keep)
    assert not target.exists()


def test_a_keep_order_with_several_statements_runs_none_of_them(run, tmp_path):
    target = tmp_path / "written_by_keep_order.csv"
    order = f"key; COPY (SELECT 'x') TO '{target}'; SELECT 1 AS key ORDER BY 1"
    with pytest.raises(RuleError, match="keep_order"):
        _select(run, extra=[f"select.dedup.keep_order={json.dumps(order)}"])
    assert not target.exists()
    from t2i_curate.filters.dedup import ExactDedup

    with pytest.raises(RuleError, match="subqueries are not allowed"):
        ExactDedup(keep_order="(SELECT max(key) FROM samples)")


@pytest.mark.parametrize("keep", [
    "(SELECT count(*) FROM read_csv('{secret}')) > 0",
    "(SELECT content FROM read_text('{secret}'))::INT > 0",
    "key IN (SELECT key FROM samples)",
    "read_csv('{secret}') IS NOT NULL",
    "read_text('{secret}')::INT > 0",
    "\"READ_BLOB\"('{secret}') IS NULL",
    "current_setting('allowed_directories') IS NOT NULL",
    "sum(shorter_side) > 0",
    "shorter_side > 0 -- a comment",
])
def test_table_functions_file_readers_and_subqueries_are_refused(run, secret, keep):
    keep = keep.format(secret=secret)
    with pytest.raises(RuleError, match="not allowed") as e:
        _with_rule(run, keep)
    assert SECRET not in str(e.value) and "root:x" not in str(e.value)
    assert "\n" not in str(e.value)


def test_plain_expressions_still_pass():
    from t2i_curate.filters.expressions import check_expression, check_order_by

    for keep in ["shorter_side >= 256", "len(regexp_split_to_array(trim(caption), '\\s+')) > 2",
                 "similarity >= 0.28 AND similarity_model = 'ViT-B-32/openai'", "caption LIKE '%--%'",
                 "coalesce(pwatermark, 0) < 0.8", "list_contains([1, 2], shorter_side % 3)",
                 "TRY_CAST(caption AS INT) IS NULL", "CASE WHEN aspect_ratio > 1 THEN 1 ELSE 0 END = 1"]:
        check_expression(keep, "rule 'r'")
    for order in ["aesthetic_score DESC NULLS LAST, key", "length(caption) DESC", "key"]:
        check_order_by(order)
    for preset in Path(__file__).resolve().parent.parent.joinpath("configs").glob("*.yaml"):
        cfg = load_config(str(preset))
        for r in cfg.select.rules:
            check_expression(r.keep, f"rule {r.name!r}")
        check_order_by(cfg.select.dedup.keep_order)


def test_a_rule_failing_at_run_time_is_one_line_naming_it(run):
    with pytest.raises(RuleError, match=r"rule 'r1' .*fails on this run's samples: Conversion Error") as e:
        _with_rule(run, "caption::INT > 0")
    assert "\n" not in str(e.value)


def test_the_select_connection_reads_nothing_outside_the_run(run, secret, monkeypatch):
    """Defence in depth: with the parser check switched off, DuckDB itself refuses the file."""
    from t2i_curate.pipeline.select import stage as selection

    monkeypatch.setattr(selection, "check_expression", lambda *a, **k: None, raising=False)
    monkeypatch.setattr(selection, "check_rule_syntax", lambda *a, **k: None, raising=False)
    with pytest.raises(RuleError) as e:
        _with_rule(run, f"(SELECT count(*) FROM read_text('{secret}')) > 0")
    assert "disabled by configuration" in str(e.value) and SECRET not in str(e.value)


def test_a_blocklist_never_echoes_the_file(tmp_path, secret):
    from t2i_curate.filters.blocklist import BlocklistError, load

    files = [secret] + [Path(p) for p in ("/etc/passwd", "/etc/hostname") if Path(p).is_file()]
    for path in files:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if len(ln.strip()) > 3]
        for kind in ("sha256", "url"):
            cfg = load_config("demo", [f"runs_dir={tmp_path / 'runs'}",
                                       f"blocklists=[{{name: b, path: '{path}', kind: {kind}}}]"])
            try:
                load(cfg.blocklists[0])
            except BlocklistError as e:
                msg = str(e)
                assert f"{path}:" in msg and "expected" in msg
                assert not [ln for ln in lines if ln in msg], f"{path} ({kind}): a line is echoed"
            else:
                assert path != secret


def test_a_failing_rule_exits_2_with_one_line(run):
    from t2i_curate.pipeline import cli

    rc = cli.main(["select", "--set", f"runs_dir={run.parent}", "--set", f"name={run.name}",
                   "--set", "workers=1", "--set", "score.scorers=[resolution]",
                   "--set", "select.rules=[{name: cast_caption, keep: 'caption::INT > 0'}]"])
    assert rc == 2


# ---- B. curate query is a reader -------------------------------------------------------------------------

def _query(capsys, run, sql, *more) -> tuple[int, str]:
    from t2i_curate.pipeline import cli

    capsys.readouterr()
    rc = cli.main(["query", "--run", str(run), sql, "--format", "json", *more])
    return rc, capsys.readouterr().out


def test_query_keeps_the_users_catalog_and_writes_nothing(run, capsys):
    db = run / "catalog.duckdb"
    db.unlink(missing_ok=True)
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE mine AS SELECT range AS i FROM range(1000)")
    con.close()
    before = _snapshot(run)
    rc, out = _query(capsys, run, "SELECT count(*) AS n FROM decisions")
    assert rc == 0 and json.loads(out.strip()) == {"n": 4}
    assert _snapshot(run) == before
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM mine").fetchall() == [(1000,)]
    con.close()


def test_query_writes_nothing_in_a_folder_that_is_not_a_run(tmp_path, capsys):
    folder = tmp_path / "not_a_run"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    rc, _ = _query(capsys, folder, "SELECT 1 AS one")
    assert rc == 2 and sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("sql", [
    "COPY (SELECT 1) TO '{outside}/copy.csv'",
    "COPY (SELECT 1) TO '{run}/copy.csv'",
    "ATTACH '{outside}/other.duckdb' AS other",
    "INSTALL httpfs",
    "SELECT * FROM read_text('{secret}')",
    "SELECT * FROM read_csv('{secret}')",
    "SELECT * FROM glob('{outside}/*')",
    "SET enable_external_access = true",
    "SELECT 1; COPY (SELECT 1) TO '{outside}/second.csv'",
])
def test_query_runs_one_select_that_reads_only_the_run(run, secret, capsys, caplog, sql):
    outside = secret.parent
    before, files_outside = _snapshot(run), sorted(os.listdir(outside))
    rc, out = _query(capsys, run, sql.format(outside=outside, run=run, secret=secret))
    assert rc == 2
    assert _snapshot(run) == before and sorted(os.listdir(outside)) == files_outside
    assert SECRET not in out and SECRET not in caplog.text


def test_query_allow_writes_gives_duckdb_its_full_power(run, secret, capsys):
    out_file = secret.parent / "copy.csv"
    rc, _ = _query(capsys, run, f"COPY (SELECT count(*) AS n FROM decisions) TO '{out_file}'", "--allow-writes")
    assert rc == 0 and out_file.read_text().split() == ["n", "4"]
    rc, out = _query(capsys, run, f"SELECT content FROM read_text('{secret}')", "--allow-writes")
    assert rc == 0 and SECRET in out
    from t2i_curate.pipeline import cli

    with pytest.raises(SystemExit):
        cli.main(["query", "--help"])
    assert "--allow-writes" in capsys.readouterr().out


@contextlib.contextmanager
def _read_only(folder: Path):
    """``folder`` made read-only for real: chmod as a user; as root (who ignores modes) the immutable flag."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        undo = lambda: [p.chmod(m) for p, m in modes.items()]  # noqa: E731
    else:
        chattr = shutil.which("chattr")
        if not chattr or subprocess.run([chattr, "-R", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("no way to make a folder read-only for root here (chattr +i)")
        undo = lambda: subprocess.run([chattr, "-R", "-i", str(folder)], check=True)  # noqa: E731
    try:
        try:
            (folder / "probe").write_text("x")
        except OSError:
            pass
        else:
            pytest.skip("the folder is still writable")
        yield
    finally:
        undo()


def test_query_and_funnel_work_on_a_read_only_run(run, capsys, caplog):
    from t2i_curate.pipeline import cli

    (run / "catalog.duckdb").unlink(missing_ok=True)
    before = _snapshot(run)
    with _read_only(run):
        rc, out = _query(capsys, run, "SELECT state, count(*) AS n FROM decisions GROUP BY 1 ORDER BY 1")
        assert rc == 0 and [json.loads(x) for x in out.splitlines()] == [{"state": "dropped", "n": 2},
                                                                    {"state": "selected", "n": 2}]
        assert cli.main(["funnel", "--run", str(run)]) == 0
    assert "funnel not saved" in caplog.text
    assert _snapshot(run) == before


def test_funnel_that_cannot_save_warns(run, caplog, monkeypatch):
    from t2i_curate.pipeline import cli
    from t2i_curate.pipeline.report import funnel
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(funnel, "write_json", refuse)
    assert cli.main(["funnel", "--run", str(run)]) == 0
    assert "funnel not saved" in caplog.text


# ---- the lockdown on a run folder on an object store ------------------------------------------------------

def test_lockdown_on_a_store_reads_the_run_and_nothing_else(s3_store, capsys):
    import fsspec

    from t2i_curate.pipeline.core.catalog import open_run
    from t2i_curate.pipeline.core.io import as_path

    fs = fsspec.filesystem("s3", use_listings_cache=False)
    run = as_path(f"{s3_store}/runs/r")
    with fs.open(f"{s3_store}/runs/r/selected/decisions.parquet", "wb") as f:
        pq.write_table(pa.table({"key": ["a", "b"], "state": ["selected", "dropped"], "rule": [None, "x"],
                                 "error": [None, None], "failed_stage": [None, None],
                                 "duplicate_of": pa.array([None, None], pa.string())}), f)
    with fs.open(f"{s3_store}/other/secret.csv", "wb") as f:
        f.write(f"a\n{SECRET}\n".encode())
    con = open_run(run, locked=True)
    assert con.execute("SELECT count(*) FROM decisions").fetchall() == [(2,)]
    for sql in [f"SELECT * FROM read_csv('{s3_store}/other/secret.csv')",
                f"SELECT * FROM read_csv('{s3_store}/runs/r/../../other/secret.csv')",
                f"COPY (SELECT 1) TO '{s3_store}/other/w.csv'", "SELECT * FROM read_csv('/etc/hostname')"]:
        with pytest.raises(duckdb.PermissionException):
            con.execute(sql).fetchall()
    rc, out = _query(capsys, run, f"SELECT * FROM read_csv('{s3_store}/other/secret.csv')")
    assert rc == 2 and SECRET not in out
    rc, out = _query(capsys, run, "SELECT count(*) AS n FROM decisions")
    assert rc == 0 and json.loads(out.strip()) == {"n": 2}
    assert not fs.exists(f"{s3_store}/runs/r/catalog.duckdb")
