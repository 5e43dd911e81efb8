"""The ``scores/`` artifact, its one owner: the score parquet (key, ``score_status``, score columns,
``image_sha256``, the tiny flag, ``embedding_row``) whose metadata records the source stamp, the scorer
settings, provenance and the embeddings file; the embeddings ``.npy`` beside it. Written by the score
stage (``commit_shard``), read here for everyone else (resume checks, selection's completeness check,
provenance, semantic deduplication, coverage)."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from t2i_curate.pipeline.core.config import ScoreConfig
from t2i_curate.pipeline.core.io import (
    atomic_path,
    file_stamp,
    file_stats,
    footer_threads,
    read_schema,
    shard_ids,
    write_parquet,
)
from t2i_curate.pipeline.core.layout import RunLayout

log = logging.getLogger(__name__)

META_KEY = b"t2i_curate"


def scorer_settings(scfg: ScoreConfig) -> dict[str, Any]:
    """The part of the config that changes score values (not batch size or device)."""
    return {"scorers": sorted(scfg.scorers), "models": scfg.models.model_dump(exclude={"cache_dir"}),
            "decode": scfg.decode}


def shard_is_current(out: Path, stamp: str, settings: dict) -> bool:
    """Whether the score parquet ``out`` exists and was made from the download files stamped ``stamp``
    with these scorer settings."""
    if not out.exists():
        return False
    try:
        return _made_from(out, stamp, settings)
    except Exception as e:  # a truncated or foreign file: the shard is scored again and the file replaced
        log.warning("%s unreadable, scored again: %s: %s", out, type(e).__name__, e)
        return False


def _made_from(out: Path, stamp: str, settings: dict) -> bool:
    meta = read_schema(out).metadata or {}
    try:
        info = json.loads(meta.get(META_KEY, b"{}"))
    except ValueError:
        return False
    return info.get("source_stamp") == stamp and info.get("settings") == settings


def current_shards(lay: RunLayout, shards: list[int], settings: dict,
                   stats: dict[str, tuple[int, int]] | None = None, scored: set[int] | None = None) -> set[int]:
    """The shards among ``shards`` whose scores are current (:func:`shard_is_current`). The source
    stamps come from one listing of the download folder (``stats``, :func:`file_stats`, when the
    caller has it) and only listed score files are opened, their footers read concurrently on a
    store: a LIST per 1,000 keys, then three requests per scored shard (open and footer), 32 at a
    time, where a check shard by shard sends six one after another (bench/resume_check.py). A shard
    whose scores cannot be read counts as not current (logged), so it gets a task of its own. ``scored``:
    the ids listed in the scores folder, when the caller has them."""
    stats = file_stats(lay.download) if stats is None else stats
    scored = set(shard_ids(lay.scores, ".parquet")) if scored is None else scored

    def current(s: int) -> bool:
        try:
            stamp = file_stamp(lay.download_parquet(s), lay.download_tar(s), stats=stats)
            return _made_from(lay.score_parquet(s), stamp, settings)
        except Exception as e:  # e.g. a truncated score file: that shard is redone, the others go on
            log.warning("scores of shard %d unreadable, counted as not current: %s: %s", s, type(e).__name__, e)
            return False

    todo = [s for s in shards if s in scored]  # listed: no existence check each
    with ThreadPoolExecutor(footer_threads(lay.root)) as pool:
        return {s for s, ok in zip(todo, pool.map(current, todo), strict=True) if ok}


def commit_shard(lay: RunLayout, shard: int, info: dict[str, Any], columns: dict[str, list], embeddings,
                 embedding_model: str | None) -> dict[str, int]:
    """Write one shard's scores (and embeddings) atomically; the parquet, written last, marks it done.
    ``info``: source stamp, settings and provenance for the parquet metadata. Returns counts."""
    import pyarrow as pa

    info = dict(info)
    if embeddings is not None:  # written before the parquet, which marks the shard done
        info["embeddings"] = {"file": lay.embeddings_rel(shard), "model": embedding_model,
                              "dtype": "float16", "normalised": True, "shape": list(embeddings.shape)}
        save_npy(lay.embeddings(shard), embeddings)
    table = pa.table(columns).replace_schema_metadata({META_KEY: json.dumps(info).encode()})
    write_parquet(lay.score_parquet(shard), table)
    n_failed = sum(1 for s in columns["score_status"] if s != "ok")
    return {"skipped": 0, "scored": len(columns["key"]) - n_failed, "failed": n_failed}


def save_npy(path: Path, array) -> None:
    import numpy as np

    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.save(f, array)


def read_provenance(run_dir: Path) -> dict[str, Any]:
    """Scorer provenance (model names, weights, tiny flag) from the first scores shard."""

    lay = RunLayout(run_dir)
    ids = shard_ids(lay.scores, ".parquet")
    if not ids:
        return {}
    meta = read_schema(lay.score_parquet(ids[0])).metadata or {}
    return json.loads(meta.get(META_KEY, b"{}")).get("provenance", {})
