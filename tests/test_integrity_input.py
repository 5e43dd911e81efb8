"""Input columns that used to break a run for good: names the pipeline writes itself, types img2dataset
cannot write into its json, and the short download shards those left behind.

Images are served on 127.0.0.1 by test_parts' ``site`` fixture; input lists are written after the server
starts, so their URLs carry its port.
"""

import datetime
import decimal
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import test_parts
from test_parts import _cli

from t2i_curate.filters.registry import reserved_columns
from t2i_curate.pipeline.core.config import InputConfig
from t2i_curate.pipeline.core.layout import RunLayout
from t2i_curate.pipeline.download.columns import InputError, json_safe, plan_columns

site = test_parts.site  # the images on loopback (module-scoped fixture)

TS = datetime.datetime(2021, 3, 4, 5, 6, 7, 890123, tzinfo=datetime.timezone.utc)


def _typed_columns(n: int) -> dict:
    """LAION-style extras img2dataset cannot write into its json, with their expected text."""
    return {
        "hash": pa.array([bytes([i, 255]) for i in range(n)], pa.binary()),
        "seen": pa.array([TS] * n, pa.timestamp("us", tz="UTC")),
        "day": pa.array([datetime.date(2021, 3, 4)] * n, pa.date32()),
        "price": pa.array([decimal.Decimal("1.20")] * n, pa.decimal128(9, 2)),
        "tags": pa.array([[("lang", "en")]] * n, pa.map_(pa.string(), pa.string())),
        "blobs": pa.array([[b"\x01"]] * n, pa.list_(pa.binary())),
    }


EXPECTED = {"seen": "2021-03-04T05:06:07.890123Z", "day": "2021-03-04", "price": "1.20",
            "tags": '{"lang":"en"}', "blobs": ["01"]}


def _list(base, rows, *more_urls, **extra):
    urls = [f"{base}/img/{i}.jpg" for i in rows] + list(more_urls)
    return pa.table({"URL": urls, "TEXT": [f"picture {u}" for u in urls], **extra})


def _columns(path) -> set[str]:
    return set(pq.read_schema(path).names)


# --- fast: the column plan and the conversions -------------------------------------------------------


def test_reserved_names_are_renamed_and_a_taken_input_name_is_not_reused():
    schema = pa.schema([("URL", pa.string()), ("TEXT", pa.string()), ("score_status", pa.string()),
                        ("input_score_status", pa.string()), ("Tiny_Models", pa.bool_()), ("input_row", pa.int64()),
                        ("aesthetic", pa.float64()), ("state", pa.string()), ("lang", pa.string())])
    plan = plan_columns(schema, InputConfig())
    assert plan.renamed == {"score_status": "input_score_status_2", "Tiny_Models": "input_tiny_models",
                            "input_row": "input_input_row", "aesthetic": "input_aesthetic_score",
                            "state": "input_state"}
    assert plan.notes == {"score_status": "'input_score_status' is taken"}
    assert "lang" in plan.names and "input_score_status" in plan.names
    # the single list covers every stage: img2dataset, scores, decisions, select's and write's own columns
    for name in ("status", "sha256", "score_status", "score_error", "tiny_models", "embedding_row", "punsafe",
                 "state", "rule", "failed_stage", "duplicate_of", "drop_rule", "dd_rank", "shard",
                 "bucket_width", "input_row", "input_file", "part_row"):
        assert name in reserved_columns(), name


def test_conversions_are_exact_and_the_same_for_any_batching():
    n = 3
    t = pa.table({**_typed_columns(n), "dur": pa.array([1500, -2, None], pa.duration("ms")),
                  "when": pa.array([TS.replace(tzinfo=None)] * n, pa.timestamp("s")),
                  "nested": pa.array([{"h": b"\xab", "k": 1}, None, {"h": None, "k": 2}])})
    whole = json_safe(t).to_pylist()
    assert whole[0]["hash"] == "00ff" and whole[2]["hash"] == "02ff"
    assert {k: whole[0][k] for k in EXPECTED} == EXPECTED
    assert [r["dur"] for r in whole] == ["PT1.500S", "-PT0.002S", None]
    assert whole[0]["when"] == "2021-03-04T05:06:07"
    assert [r["nested"] for r in whole] == [{"h": "ab", "k": 1}, None, {"h": None, "k": 2}]
    one_by_one = [json_safe(t.slice(i, 1)).to_pylist()[0] for i in range(n)]
    assert one_by_one == whole
    json.dumps(whole)  # what img2dataset does with every sample's columns


def test_every_type_a_parquet_input_holds_is_carried_and_others_are_refused_naming_the_column():
    import uuid

    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    t = pa.table({"id": pa.ExtensionArray.from_storage(pa.uuid(), pa.array([u.bytes], pa.binary(16))),
                  "f16": pa.array([1.5], pa.float16()), "big": pa.array([2**64 - 1], pa.uint64())})
    assert json_safe(t).to_pylist() == [{"id": str(u), "f16": 1.5, "big": 2**64 - 1}]
    iv = pa.schema([("URL", pa.string()), ("TEXT", pa.string()), ("span", pa.month_day_nano_interval())])
    with pytest.raises(InputError, match="input column 'span' has type month_day_nano_interval"):
        plan_columns(iv, InputConfig())
    plan_columns(iv, InputConfig(extra_columns=[]))  # left out: nothing to carry


# --- end to end ----------------------------------------------------------------------------------------


def test_pipeline_names_and_json_hostile_types_in_the_input_run_end_to_end(site):
    """An input `score_status` used to fail every row ('not scored'), an input `tiny_models` reached the
    curated shards as if the scorers had said so, binary / timestamp / decimal columns failed every sample
    (stats claiming successes, a 0-row parquet: a dead end) and a map column failed the write stage."""
    tmp, base = site
    n = 6
    rows = range(n)
    table = _list(base, rows, "file:///etc/passwd", score_status=pa.array(["from the input"] * (n + 1)),
                  input_score_status=pa.array(["mine"] * (n + 1)), tiny_models=pa.array([True] * (n + 1)),
                  big=pa.array([2**64 - 1] * (n + 1), pa.uint64()), **_typed_columns(n + 1))
    src = tmp / "typed" / "urls.parquet"
    src.parent.mkdir(parents=True)
    pq.write_table(table, src)
    p = _cli("run", src, tmp / "runs", "typed", "--set", "write.buckets=sd1")
    run = tmp / "runs" / "typed"
    f = json.loads((run / "report" / "funnel.json").read_text())
    assert f["input"] == n + 1 and f["written"] == n and f["failed"] == 1, f
    log = " ".join(p.stderr.split())  # the log wraps long lines
    assert ("carried as input_<name>" in log and "'score_status' -> 'input_score_status_2'" in log
            and "'tiny_models' -> 'input_tiny_models'" in log)
    assert "converted to text" in log and "'hash' (binary -> hex)" in log
    shards = sorted((run / "selected").glob("0*.parquet"))
    out = pa.concat_tables([pq.read_table(s) for s in shards]).sort_by("input_row").to_pylist()
    assert len(out) == n and "tiny_models" not in out[0]  # resolution uses no model: no tiny flag at all
    assert {(r["input_tiny_models"], r["input_score_status_2"], r["input_score_status"]) for r in out} == {
        (True, "from the input", "mine")}
    assert [r["hash"] for r in out] == [bytes([i, 255]).hex() for i in rows]
    assert {r["big"] for r in out} == {2**64 - 1}  # the plan's types, never guessed from Python values
    assert {k: out[0][k] for k in EXPECTED} == EXPECTED
    with tarfile.open(shards[0].with_suffix(".tar")) as tf:
        meta = json.loads(next(tf.extractfile(m) for m in tf.getmembers() if m.name.endswith(".json")).read())
    assert meta["seen"] == EXPECTED["seen"] and meta["tags"] == EXPECTED["tags"]
    # every column any stage wrote is an input column or one of the reserved names
    written = {run / "download" / "00000.parquet", run / "scores" / "00000.parquet", run / "download" /
               "_refused.parquet", run / "selected" / "decisions.parquet", *shards}
    written |= set((run / "selected").glob("_plan.parquet"))
    from_input = _columns(run / "download" / "_input.parquet") - {"URL", "TEXT"}
    stray = {c for w in written for c in _columns(w)} - from_input - set(reserved_columns())
    assert not stray, stray


@pytest.mark.slow  # reruns a stage: in `make test-slow` and CI
def test_a_shard_with_fewer_rows_than_its_stats_count_is_redone(site):
    tmp, base = site
    folder = tmp / "short"
    test_parts._part(folder / "a.parquet", base, range(0, 3))
    test_parts._part(folder / "b.parquet", base, range(3, 6))
    run = tmp / "runs" / "short"
    _cli("download", folder, tmp / "runs", "short")
    d = run / "download"
    whole = pq.read_table(d / "00001.parquet")
    pq.write_table(whole.slice(0, 0), d / "00001.parquet")  # what a sample failing in img2dataset's write left
    kept = {p.name: p.stat().st_mtime_ns for p in d.glob("00000*")}
    p = _cli("download", folder, tmp / "runs", "short")
    assert p.stderr.count("fewer rows than their _stats.json counts") == 1
    assert "redone: 00001 (0 of 3 rows)" in p.stderr and "all 2 shards finished" not in p.stderr
    assert pq.read_table(d / "00001.parquet").sort_by("key").to_pylist() == whole.sort_by("key").to_pylist()
    assert {p.name: p.stat().st_mtime_ns for p in d.glob("00000*")} == kept  # whole shards untouched
    lay = RunLayout(run)
    assert lay.finished_downloads() == [0, 1] and lay.short_downloads([0, 1]) == {}  # a rerun skips both


@pytest.mark.slow  # reruns a stage: in `make test-slow` and CI
def test_parts_carry_renamed_and_converted_columns_as_the_single_list_does(site):
    tmp, base = site
    n = 6
    table = _list(base, range(n), status=pa.array(["input status"] * n), **_typed_columns(n))
    single, folder = tmp / "same" / "one.parquet", tmp / "same" / "parts"
    folder.mkdir(parents=True)
    pq.write_table(table, single)
    pq.write_table(table.slice(0, 2), folder / "a.parquet")
    pq.write_table(table.slice(2), folder / "b.parquet")
    got = {}
    for name, urls in (("one", single), ("parts", folder)):
        _cli("download", urls, tmp / "runs", f"same-{name}")
        d = tmp / "runs" / f"same-{name}" / "download"
        rows = pa.concat_tables([pq.read_table(p) for p in sorted(d.glob("0*.parquet"))]).sort_by("input_row")
        got[name] = rows.drop_columns([c for c in ("input_file", "part_row") if c in rows.column_names])
    assert got["one"].schema == got["parts"].schema
    cols = ["input_status", "hash", *EXPECTED]
    assert got["one"].select(cols).to_pylist() == got["parts"].select(cols).to_pylist()
    assert got["one"]["input_status"].to_pylist() == ["input status"] * n and set(got["one"]["status"].to_pylist()) \
        == {"success"}
