"""Score stage: one pass per download shard, adding score columns for every success.

The engine (:class:`ShardScorer`) builds the configured scorers once per
process, decodes each image once, builds every declared input from it (each
CLIP's preprocessing, each scorer's own transforms), batches rows and records
per-sample failures. Output ``scores/NNNNN.parquet``: ``key``, ``score_status``
(``ok`` / ``failed``), ``score_error`` and one column per scorer column. Its
parquet metadata holds a stamp of the download shard it was computed from and
the scorer settings; a rerun skips shards whose stamp and settings still match,
and re-scores the others (changing scorers never needs a new download).
"""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path

from t2i_curate.pipeline.core.config import RunConfig, ScoreConfig
from t2i_curate.pipeline.core.io import file_stamp, file_stats
from t2i_curate.pipeline.core.layout import RunLayout
from t2i_curate.pipeline.core.scores import commit_shard, current_shards, scorer_settings, shard_is_current
from t2i_curate.pipeline.score.shards import ShardScorer, success_rows

log = logging.getLogger(__name__)

SHARDS_PER_PROCESS = 8  # a scoring process costs ~9 s to start (imports + models); amortise it


# --- the stage ---------------------------------------------------------------------------------


def score_shard(run_dir: str, scfg_json: str, shard: int) -> dict[str, int]:
    """Score one download shard; return counts. Runs inside a worker process."""
    scfg = ScoreConfig.model_validate_json(scfg_json)
    lay = RunLayout(run_dir)
    src_parquet, src_tar, out = lay.download_parquet(shard), lay.download_tar(shard), lay.score_parquet(shard)
    stamp, settings = file_stamp(src_parquet, src_tar), scorer_settings(scfg)
    if shard_is_current(out, stamp, settings):
        return {"skipped": 1, "scored": 0, "failed": 0}
    rows = success_rows(src_parquet)
    scorer = ShardScorer.for_config(scfg)
    columns, embeddings, provenance = scorer.score_rows(rows, src_tar)
    info = {"source_stamp": stamp, "settings": settings, "provenance": provenance}
    return commit_shard(lay, shard, info, columns, embeddings, scorer.embedding_model())


def score_processes(cfg: RunConfig, n_shards: int) -> int:
    """How many local scoring processes: 1 (in-process) on CUDA or when there are too few shards
    to pay for starting more; otherwise ``workers``."""
    from t2i_curate.filters.registry import configured

    if cfg.executor != "local":
        return cfg.workers
    if any(c.uses_models for c in configured(cfg.score)):
        from t2i_curate.pipeline.core.devices import pick_device

        if pick_device(cfg.score.device) == "cuda":
            return 1  # one process feeds the GPU; decoding runs in its DataLoader workers
        return max(1, min(cfg.workers, n_shards // SHARDS_PER_PROCESS))
    return cfg.workers


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)  # processes x threads = cores, no oversubscription


def score_stage(cfg: RunConfig, run_dir: Path, shards: list[int]) -> dict[str, int]:
    from t2i_curate.filters.registry import preflight
    from t2i_curate.pipeline.executors.shards import map_shards

    preflight(cfg.score)
    if cfg.score.decode == "gpu" and cfg.executor == "local":  # refuse before any work, not per shard
        from t2i_curate.pipeline.score.gpu_decode import decode_device

        decode_device(cfg.score)
    lay = RunLayout(run_dir)
    stats = file_stats(lay.download)  # one listing: every shard's source stamp
    done = current_shards(lay, shards, scorer_settings(cfg.score), stats)
    if done:
        log.info("score: %d of %d shards have current scores already", len(done), len(shards))
    shards = [s for s in shards if s not in done]  # no task (nor process) for a finished shard
    fn = partial(score_shard, str(run_dir), cfg.score.model_dump_json())
    workers = score_processes(cfg, len(shards))
    threads = max(1, (os.cpu_count() or 1) // workers)
    if cfg.executor == "ray" and cfg.ray.score_actors and shards:  # CPU decode tasks feed model actors
        from t2i_curate.pipeline.score.ray_actors import score_on_actors

        # stamped from the listing; a shard missing a file is left to the driver, which records its error
        files = {s: (lay.download_parquet(s), lay.download_tar(s)) for s in shards}
        stamps = {s: file_stamp(*f, stats=stats) for s, f in files.items() if all(p.name in stats for p in f)}
        res = score_on_actors(cfg, run_dir, shards, stamps=stamps)
    else:
        res = map_shards(fn, shards, workers=workers, executor=cfg.executor, desc="score",
                         initializer=_init_worker, initargs=(threads,), ray_cfg=cfg.ray,
                         gpus=cfg.ray.gpus_per_worker if cfg.executor == "ray" else 0.0)
    res.raise_if_failed("score")
    total = {"skipped": len(done), "scored": 0, "failed": 0}
    for r in res.results.values():
        for k in total:
            total[k] += r[k]
    return total
