"""The scoring engine, shared by the score stage's per-shard tasks (pipeline/score.py) and the Ray actor
path (pipeline/ray_score.py): :class:`ShardScorer` builds the configured scorers once per process,
decodes each image once and builds every declared input from it, batches rows and records per-sample
failures; and the one way a scored shard is assembled and committed (the score parquet, whose metadata
marks it done, after its embeddings file).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from t2i_curate.filters.base import Batch
from t2i_curate.pipeline.config import ScoreConfig
from t2i_curate.pipeline.io import (
    atomic_path,
    file_stamp,
    file_stats,
    is_remote,
    read_schema,
    read_table,
    shard_ids,
    write_parquet,
)
from t2i_curate.pipeline.layout import RunLayout

log = logging.getLogger(__name__)

META_KEY = b"t2i_curate"
FOOTER_THREADS = 32  # concurrent score-parquet footer reads when the run folder is on an object store
LOCAL_FOOTER_THREADS = 8  # ... and on a local or shared file system
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
        return shard_batches(rows, tar_path, self.transforms, self.cfg, self.draft)

    def tiny_flag(self) -> bool | None:
        """True when any model-using scorer ran a tiny random model; None when no scorer uses models."""
        if self.bank is None:
            return None
        # a real model among tiny ones, e.g. the text detector, says tiny false in its provenance
        return any(s.provenance().get("tiny", str(self.bank.tiny).lower()) == "true"
                   for s in self.scorers if s.uses_models)

    def score_batch(self, batch_rows, inputs, errors, results, embeddings) -> None:
        """Score one decoded batch into ``results`` (key -> columns) and ``embeddings`` (key -> row)."""
        import numpy as np

        from t2i_curate.pipeline.tars import IMAGE_SHA256

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
        shas = inputs.get(IMAGE_SHA256) if ok_rows else None  # None: no scorer decoded the images
        for j, r in enumerate(ok_rows):
            results[r["key"]] = {"score_status": "ok", "score_error": None,
                                 **{c: values[c][j] for c in self.columns},
                                 IMAGE_SHA256: shas[j] if shas is not None else None}

    def score_rows(self, rows: list[dict], tar_path: Path) -> tuple[dict[str, list], Any, dict]:
        """Score ``rows`` (download successes); return columns in key order, the image
        embeddings (float16 array aligned with ``embedding_row``, or None) and provenance."""
        results: dict[str, dict[str, Any]] = {}
        embeddings: dict[str, Any] = {}
        for batch_rows, inputs, errors in self._batches(rows, tar_path):
            self.score_batch(batch_rows, inputs, errors, results, embeddings)
        cols, emb_array = assemble_columns(results, embeddings, self.columns, self.tiny_flag())
        return cols, emb_array, self.provenance()


def shard_batches(rows: list[dict], tar_path: Path, transforms: dict[str, Any], scfg: ScoreConfig,
                  draft: int | None):
    """Yield ``(rows, inputs, errors)`` batches of one shard (in key order), as the scorers take them."""
    if transforms and scfg.decode == "gpu":  # nvJPEG decode + device preprocessing (refused without CUDA)
        from t2i_curate.pipeline.gpu_decode import iter_gpu_batches

        return iter_gpu_batches(rows, tar_path, transforms, scfg)
    if transforms:
        from t2i_curate.pipeline.decode import iter_decoded_batches

        return iter_decoded_batches(rows, tar_path, transforms, scfg, draft)
    # no scorer decodes images, but a sample missing from a truncated tar still fails here
    from t2i_curate.pipeline.tars import IMAGE_EXTS, MISSING, member_keys

    present = member_keys(tar_path, IMAGE_EXTS)
    bs = scfg.batch_size
    return ((b, {}, {r["key"]: MISSING for r in b if r["key"] not in present})
            for b in (rows[i : i + bs] for i in range(0, len(rows), bs)))


def assemble_columns(results: dict[str, dict], embeddings: dict[str, Any], columns: list[str],
                     tiny: bool | None) -> tuple[dict[str, list], Any]:
    """Per-key results -> the score parquet's columns in key order, and the embeddings array
    (float16, aligned with ``embedding_row``) or None. ``tiny=None``: no model column."""
    import numpy as np
    import pyarrow as pa

    keys = sorted(results)
    cols: dict[str, list] = {"key": keys}
    for c in ["score_status", "score_error", *columns]:
        cols[c] = [results[k].get(c) for k in keys]
    # the scored image bytes' sha256 (pipeline/decode.py); null where no scorer decoded images
    cols["image_sha256"] = pa.array([results[k].get("image_sha256") for k in keys], pa.string())
    if tiny is not None:  # flag every row scored with tiny random models (by any scorer)
        cols["tiny_models"] = [tiny] * len(keys)
    emb_array = None
    if embeddings:
        emb_keys = [k for k in keys if k in embeddings]
        row_of = {k: i for i, k in enumerate(emb_keys)}
        cols["embedding_row"] = [row_of.get(k) for k in keys]
        emb_array = np.stack([embeddings[k] for k in emb_keys])
    return cols, emb_array


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
    with ThreadPoolExecutor(_footer_threads(lay.root)) as pool:
        return {s for s, ok in zip(todo, pool.map(current, todo), strict=True) if ok}


def _footer_threads(root) -> int:
    """Concurrent footer reads: many on an async store driver (s3fs, gcsfs, adlfs: one IO loop, safe
    from threads), a few on a local or shared file system (NFS, Lustre), one on other drivers."""
    if not is_remote(root):
        return LOCAL_FOOTER_THREADS
    return FOOTER_THREADS if getattr(root.fs, "async_impl", False) else 1


def success_rows(src_parquet: Path) -> list[dict]:
    """The download successes of one shard, in key order (the order every executor scores them in)."""

    return sorted((r for r in read_table(src_parquet).to_pylist() if r["status"] == "success"),
                  key=lambda r: r["key"])


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
