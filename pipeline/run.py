"""``curate run``: every curation stage in order, then the catalog, the funnel, verify and the report."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from t2i_curate.pipeline.core.config import RunConfig
from t2i_curate.pipeline.core.layout import RunLayout

log = logging.getLogger(__name__)


def model_manifest(run: Path) -> dict[str, Any]:
    """Which scorer models made the scores (for the manifest and the funnel)."""
    from t2i_curate.pipeline.core.scores import read_provenance

    prov = read_provenance(run)
    return {"models": prov, "tiny_models": any(v.get("tiny") == "true" for v in prov.values())}


def run_curation(cfg: RunConfig) -> dict[str, Any]:
    """Download, score, select, write; refresh the catalog, count the funnel, verify, build the report.

    Returns the stage summaries, the funnel, the curation report's path and each stage's seconds.
    Missing weights and bad input stop it before any download.
    """
    from t2i_curate.filters.registry import preflight
    from t2i_curate.pipeline.core.catalog import refresh_catalog
    from t2i_curate.pipeline.download.stage import download_stage, read_url_list
    from t2i_curate.pipeline.report.funnel import funnel
    from t2i_curate.pipeline.report.verify import check_run
    from t2i_curate.pipeline.runfolder import prepare_run, url_source
    from t2i_curate.pipeline.score.stage import score_stage
    from t2i_curate.pipeline.select.stage import select_stage
    from t2i_curate.pipeline.write.stage import write_stage

    preflight(cfg.score)  # a missing real weight stops the run here, before any download
    times: dict[str, float] = {}
    t = time.perf_counter()
    with url_source(cfg) as urls:
        table = read_url_list(urls, cfg.input)
        run = prepare_run(cfg)
        d = download_stage(cfg, run, urls, table)
    times["download"] = time.perf_counter() - t
    t = time.perf_counter()
    s = score_stage(cfg, run, RunLayout(run).finished_downloads())
    times["score"] = time.perf_counter() - t
    t = time.perf_counter()
    sel = select_stage(cfg, run)
    times["select"] = time.perf_counter() - t
    t = time.perf_counter()
    w = write_stage(cfg, run, model_manifest(run))
    times["write"] = time.perf_counter() - t
    refresh_catalog(run)
    f = funnel(run)
    check_run(run)
    log.info("verify: %s is consistent (shards, parquet, manifest, accounting)", run)
    from t2i_curate.pipeline.report.curation import build_run_report

    t = time.perf_counter()
    report = build_run_report(run)
    times["report"] = time.perf_counter() - t
    return {"run": run, "download": d, "score": s, "select": sel, "write": w, "funnel": f, "seconds": times,
            "report": report}
