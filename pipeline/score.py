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

import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any

from t2i_curate.filters.base import Batch
from t2i_curate.pipeline.config import RunConfig, ScoreConfig
from t2i_curate.pipeline.io import atomic_path, file_stamp, shard_ids, write_parquet
from t2i_curate.pipeline.layout import RunLayout

log = logging.getLogger(__name__)

META_KEY = b"t2i_curate"
SHARDS_PER_PROCESS = 8  # a scoring process costs ~9 s to start (imports + models); amortise it
_CACHE: dict[str, ShardScorer] = {}  # one per process: models load once per worker


class ShardScorer:
    """The configured scorers of one process, and the inputs they declared."""

    def __init__(self, scfg: ScoreConfig):
        from t2i_curate.filters.registry import clip_models, configured

        self.cfg = scfg
        classes = configured(scfg)
        self.bank = None
        if any(c.uses_models for c in classes):
            from t2i_curate.filters.modelbank import ModelBank

            self.bank = ModelBank(scfg)
        self.scorers = [cls(self.bank) for cls in classes]
        clips = clip_models(scfg)
        # the first CLIP the scorers read is the one whose image embeddings are kept
        self.embedding_clip = clips[0] if clips and scfg.save_embeddings else None
        self.transforms: dict[str, Any] = self.bank.clip_transforms(clips) if self.bank else {}
        sizes = [self.bank.clip_input_size(c) for c in clips] if self.bank else []
        for s in self.scorers:
            self.transforms.update(s.transforms())
            sizes += list(s.image_inputs(scfg.models).values())
        # "fast" decoding drafts JPEGs down to the largest input any model takes
        self.draft = max(sizes) if sizes and scfg.decode == "fast" else None

    @classmethod
    def for_config(cls, scfg: ScoreConfig) -> ShardScorer:
        key = scfg.model_dump_json()
        if key not in _CACHE:
            _CACHE.clear()
            _CACHE[key] = cls(scfg)
        return _CACHE[key]

    @property
    def columns(self) -> list[str]:
        return [c for s in self.scorers for c in s.columns]

    def provenance(self) -> dict[str, Any]:
        return {s.name: s.provenance() for s in self.scorers}

    def embedding_model(self) -> str | None:
        return self.bank.clip_label(self.embedding_clip) if self.embedding_clip else None

    def _batches(self, rows: list[dict], tar_path: Path):
        if self.transforms:
            from t2i_curate.pipeline.decode import iter_decoded_batches

            return iter_decoded_batches(rows, tar_path, self.transforms, self.cfg, self.draft)
        # no scorer decodes images, but a sample missing from a truncated tar still fails here
        from t2i_curate.pipeline.tars import IMAGE_EXTS, MISSING, member_keys

        present = member_keys(tar_path, IMAGE_EXTS)
        bs = self.cfg.batch_size
        return ((b, {}, {r["key"]: MISSING for r in b if r["key"] not in present})
                for b in (rows[i : i + bs] for i in range(0, len(rows), bs)))

    def _score_batch(self, batch_rows, inputs, errors, results, embeddings) -> None:
        import numpy as np

        ok_rows = [r for r in batch_rows if r["key"] not in errors]
        values: dict[str, list] = {}
        if ok_rows:
            b = Batch(rows=ok_rows, inputs=inputs)
            for s in self.scorers:
                values.update(s.score(b))
            if self.embedding_clip:
                emb = self.bank.image_embedding(self.embedding_clip, b).numpy().astype(np.float16)
                embeddings.update({r["key"]: emb[j] for j, r in enumerate(ok_rows)})
        for key, err in errors.items():
            results[key] = {"score_status": "failed", "score_error": err}
        for j, r in enumerate(ok_rows):
            results[r["key"]] = {"score_status": "ok", "score_error": None,
                                 **{c: values[c][j] for c in self.columns}}

    def score_rows(self, rows: list[dict], tar_path: Path) -> tuple[dict[str, list], Any, dict]:
        """Score ``rows`` (download successes); return columns in key order, the image
        embeddings (float16 array aligned with ``embedding_row``, or None) and provenance."""
        import numpy as np

        results: dict[str, dict[str, Any]] = {}
        embeddings: dict[str, Any] = {}
        for batch_rows, inputs, errors in self._batches(rows, tar_path):
            self._score_batch(batch_rows, inputs, errors, results, embeddings)
        keys = sorted(results)
        cols: dict[str, list] = {"key": keys}
        for c in ["score_status", "score_error", *self.columns]:
            cols[c] = [results[k].get(c) for k in keys]
        if self.bank is not None:  # flag every row scored with tiny random models (by any scorer:
            # a real model among tiny ones, e.g. the text detector, says tiny false in its provenance)
            tiny = any(s.provenance().get("tiny", str(self.bank.tiny).lower()) == "true"
                       for s in self.scorers if s.uses_models)
            cols["tiny_models"] = [tiny] * len(keys)
        emb_array = None
        if embeddings:
            emb_keys = [k for k in keys if k in embeddings]
            row_of = {k: i for i, k in enumerate(emb_keys)}
            cols["embedding_row"] = [row_of.get(k) for k in keys]
            emb_array = np.stack([embeddings[k] for k in emb_keys])
        return cols, emb_array, self.provenance()


# --- the stage ---------------------------------------------------------------------------------


def scorer_settings(scfg: ScoreConfig) -> dict[str, Any]:
    """The part of the config that changes score values (not batch size or device)."""
    return {"scorers": sorted(scfg.scorers), "models": scfg.models.model_dump(exclude={"cache_dir"}),
            "decode": scfg.decode}


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

    scfg = ScoreConfig.model_validate_json(scfg_json)
    lay = RunLayout(Path(run_dir))
    src_parquet, src_tar, out = lay.download_parquet(shard), lay.download_tar(shard), lay.score_parquet(shard)
    stamp, settings = file_stamp(src_parquet, src_tar), scorer_settings(scfg)
    if shard_is_current(out, stamp, settings):
        return {"skipped": 1, "scored": 0, "failed": 0}
    rows = sorted((r for r in pq.read_table(src_parquet).to_pylist() if r["status"] == "success"),
                  key=lambda r: r["key"])
    scorer = ShardScorer.for_config(scfg)
    columns, embeddings, provenance = scorer.score_rows(rows, src_tar)
    info = {"source_stamp": stamp, "settings": settings, "provenance": provenance}
    if embeddings is not None:  # written before the parquet, which marks the shard done
        info["embeddings"] = {"file": lay.embeddings_rel(shard), "model": scorer.embedding_model(),
                              "dtype": "float16", "normalised": True, "shape": list(embeddings.shape)}
        save_npy(lay.embeddings(shard), embeddings)
    table = pa.table(columns).replace_schema_metadata({META_KEY: json.dumps(info).encode()})
    write_parquet(out, table)
    n_failed = sum(1 for s in columns["score_status"] if s != "ok")
    return {"skipped": 0, "scored": len(rows) - n_failed, "failed": n_failed}


def save_npy(path: Path, array) -> None:
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def score_processes(cfg: RunConfig, n_shards: int) -> int:
    """How many local scoring processes: 1 (in-process) on CUDA or when there are too few shards
    to pay for starting more; otherwise ``workers``."""
    from t2i_curate.filters.registry import configured

    if cfg.executor != "local":
        return cfg.workers
    if any(c.uses_models for c in configured(cfg.score)):
        from t2i_curate.pipeline.devices import pick_device

        if pick_device(cfg.score.device) == "cuda":
            return 1  # one process feeds the GPU; decoding runs in its DataLoader workers
        return max(1, min(cfg.workers, n_shards // SHARDS_PER_PROCESS))
    return cfg.workers


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)  # processes x threads = cores, no oversubscription


def score_stage(cfg: RunConfig, run_dir: Path, shards: list[int]) -> dict[str, int]:
    from t2i_curate.filters.registry import preflight
    from t2i_curate.pipeline.executors import map_shards

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
    """Scorer provenance (model names, weights, tiny flag) from the first scores shard."""
    import pyarrow.parquet as pq

    lay = RunLayout(Path(run_dir))
    ids = shard_ids(lay.scores, ".parquet")
    if not ids:
        return {}
    meta = pq.read_schema(lay.score_parquet(ids[0])).metadata or {}
    return json.loads(meta.get(META_KEY, b"{}")).get("provenance", {})
