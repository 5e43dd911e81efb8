"""Score stage: one pass per download shard, adding score columns for every success.

Output ``scores/NNNNN.parquet``: ``key``, ``score_status`` (``ok`` / ``failed``),
``score_error`` and one column per scorer column. Its parquet metadata holds a
stamp of the download shard it was computed from and the scorer settings; a
rerun skips shards whose stamp and settings still match.
"""

from __future__ import annotations

import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig, ScoreConfig
from pipeline.io import file_stamp, write_parquet

log = logging.getLogger(__name__)

META_KEY = b"t2i_curate"


def scorer_settings(scfg: ScoreConfig) -> dict[str, Any]:
    """The part of the config that changes score values (not batch size or device)."""
    return {"scorers": sorted(scfg.scorers), "models": scfg.models.model_dump(exclude={"cache_dir"})}


def shard_is_current(out: Path, stamp: str, settings: dict) -> bool:
    import pyarrow.parquet as pq

    if not out.exists():
        return False
    meta = pq.read_schema(out).metadata or {}
    try:
        info = json.loads(meta.get(META_KEY, b"{}"))
    except ValueError:
        return False
    return info.get("source_stamp") == stamp and info.get("settings") == settings


def score_shard(run_dir: str, scfg_json: str, shard: int) -> dict[str, int]:
    """Score one download shard; return counts. Runs inside a worker process."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.scoring import ShardScorer

    scfg = ScoreConfig.model_validate_json(scfg_json)
    run = Path(run_dir)
    name = f"{shard:05d}"
    src_parquet, src_tar = run / "download" / f"{name}.parquet", run / "download" / f"{name}.tar"
    out = run / "scores" / f"{name}.parquet"
    stamp, settings = file_stamp(src_parquet, src_tar), scorer_settings(scfg)
    if shard_is_current(out, stamp, settings):
        return {"skipped": 1, "scored": 0, "failed": 0}
    meta = pq.read_table(src_parquet)
    rows = [r for r in meta.to_pylist() if r["status"] == "success"]
    rows.sort(key=lambda r: r["key"])
    scorer = ShardScorer.for_config(scfg)
    columns, embeddings, provenance = scorer.score_rows(rows, src_tar)
    table = pa.table(columns)
    info = {"source_stamp": stamp, "settings": settings, "provenance": provenance}
    if embeddings is not None:  # written before the parquet, which marks the shard done
        info["embeddings"] = {"file": f"embeddings/{name}.npy", "model": provenance_model(scorer),
                              "dtype": "float16", "normalised": True, "shape": list(embeddings.shape)}
        save_npy(run / "scores" / "embeddings" / f"{name}.npy", embeddings)
    table = table.replace_schema_metadata({META_KEY: json.dumps(info).encode()})
    write_parquet(out, table)
    n_failed = sum(1 for s in columns["score_status"] if s != "ok")
    return {"skipped": 0, "scored": len(rows) - n_failed, "failed": n_failed}


def provenance_model(scorer) -> str:
    return ("tiny:" if scorer.bank.tiny() else "") + scorer.embedding_clip


def save_npy(path: Path, array) -> None:
    import numpy as np

    from pipeline.io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


SHARDS_PER_PROCESS = 8  # a scoring process costs ~9 s to start (imports + models); amortise it


def score_processes(cfg: RunConfig, n_shards: int) -> int:
    """How many local scoring processes: 1 (in-process) on CUDA or when there are too few shards
    to pay for starting more; otherwise ``workers``."""
    if cfg.executor != "local":
        return cfg.workers
    if any(s != "resolution" for s in cfg.score.scorers):
        from filters.models import pick_device

        if pick_device(cfg.score.device) == "cuda":
            return 1  # one process feeds the GPU; decoding runs in its DataLoader workers
        return max(1, min(cfg.workers, n_shards // SHARDS_PER_PROCESS))
    return cfg.workers


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)  # processes x threads = cores, no oversubscription


def score_stage(cfg: RunConfig, run_dir: Path, shards: list[int]) -> dict[str, int]:
    from pipeline.executors import map_shards
    from pipeline.models import preflight

    preflight(cfg.score)
    fn = partial(score_shard, str(run_dir), cfg.score.model_dump_json())
    workers = score_processes(cfg, len(shards))
    threads = max(1, (os.cpu_count() or 1) // workers)
    res = map_shards(fn, shards, workers=workers, executor=cfg.executor, desc="score",
                     initializer=_init_worker, initargs=(threads,), ray_cfg=cfg.ray,
                     gpus=cfg.ray.gpus_per_worker if cfg.executor == "ray" else 0.0)
    res.raise_if_failed("score")
    total = {"skipped": 0, "scored": 0, "failed": 0}
    for r in res.results.values():
        for k in total:
            total[k] += r[k]
    return total


def read_provenance(run_dir: Path) -> dict[str, Any]:
    """Scorer provenance (model names, tiny flag) from the first scores shard."""
    import pyarrow.parquet as pq

    from pipeline.io import shard_ids

    ids = shard_ids(run_dir / "scores", ".parquet")
    if not ids:
        return {}
    meta = pq.read_schema(run_dir / "scores" / f"{ids[0]:05d}.parquet").metadata or {}
    return json.loads(meta.get(META_KEY, b"{}")).get("provenance", {})
