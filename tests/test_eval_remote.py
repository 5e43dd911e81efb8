"""``curate eval`` on a run folder on an object store (moto's S3 server on 127.0.0.1): eval works in a local
staging folder and uploads the finished folder, ``metrics.json`` last; the catalog's eval views, ``curate
query``, ``curate compare`` and ``curate report`` see it."""

import json

import pytest
from conftest import curate, small_demo_args

from t2i_curate.pipeline.core.io import as_path

# the demo's tiny pipeline with as little as measures everything: 4 suites x 2 prompts x 1 image
QUICK_EVAL = ["--set", "eval.max_prompts_per_suite=2", "--set", "eval.samples_per_prompt=1",
              "--set", "eval.judges=[clip_contrast]", "--set", "eval.census=false"]


@pytest.mark.slow
def test_eval_of_a_run_on_s3(s3_store, tmp_path, monkeypatch):
    from t2i_curate.eval.evaluate import staging_dir, staging_root

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the subprocesses stage here
    runs = f"{s3_store}/evalruns"
    args = small_demo_args(runs, n=40)
    curate("run", *args)
    curate("eval", *args, *QUICK_EVAL)

    run = as_path(f"{runs}/demo")
    out = run / "eval" / "tiny"
    stage = staging_dir(run, "tiny")
    assert str(stage).startswith(str(tmp_path / "cache" / "t2i_curate" / "eval"))
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_images"] == 4 * 2 and m["tag"] == "tiny"
    assert "clip_score" in m["models"] and "fid_features" in m["models"] and m["provenance"]["versions"]
    assert m["fid_protocol"]["n_reference"] >= 2  # the reference images came from the S3 run's curated tars
    assert (out / "eval_images.parquet").exists() and (out / "report.html").exists()
    assert len(list((out / "images").iterdir())) == 8
    assert json.loads((stage / "metrics.json").read_text()) == m  # what was uploaded is what was measured
    assert list((staging_root(run) / "_reference").glob("reference-*.pt"))  # the reference cache, local
    assert not (run / "eval" / "_reference").exists()
    keys = out.fs.find(out.path)
    assert not [k for k in keys if "/.tmp-" in k]

    q = curate("query", "--run", str(run), "--format", "csv", "SELECT count(*) AS n FROM eval_images").stdout
    assert q.split()[-1] == "8", q
    q = curate("query", "--run", str(run), "--format", "csv", "SELECT count(*) AS n FROM eval_metrics "
               "WHERE metric = 'fid'").stdout
    assert q.split()[-1] == "1", q
    assert "tiny" in curate("compare", str(out), str(stage)).stderr  # remote and local side by side

    # the report of the remote eval is rebuilt from the staging folder; without it, a clear refusal
    (out / "report.md").unlink()
    curate("report", str(out))
    assert (out / "report.md").exists()
    moved = stage.with_name("moved")
    stage.rename(moved)
    r = curate("report", str(out), check=False)
    assert r.returncode != 0 and str(stage) in r.stderr, r.stderr
    moved.rename(stage)

    # the training run named as a run under runs_dir (an s3:// URL): found from the local working folder too
    curate("coverage", str(run))
    curate("eval", *args, *QUICK_EVAL, "--set", "eval.training_run=demo")
    assert f"Training run: {run}" in (out / "report.md").read_text()


def test_catalog_reads_only_finished_evals(tmp_path):
    """An eval folder without its metrics.json (an upload or a measure not finished) is not in the views."""
    import pyarrow as pa

    from t2i_curate.pipeline.core.catalog import open_run
    from t2i_curate.pipeline.core.io import write_json, write_parquet

    run = tmp_path / "run"
    for tag in ("done", "half"):
        write_parquet(run / "eval" / tag / "eval_images.parquet", pa.table({"model": [tag, tag]}))
    write_json(run / "eval" / "done" / "metrics.json", {"tag": "done"})
    con = open_run(run)
    assert con.execute("SELECT model, count(*) FROM eval_images GROUP BY model").fetchall() == [("done", 2)]
    (run / "eval" / "done" / "metrics.json").unlink()
    con = open_run(run)
    assert "eval_images" not in {r[0] for r in con.execute("SELECT view_name FROM duckdb_views()").fetchall()}
