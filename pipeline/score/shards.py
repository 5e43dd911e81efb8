"""The scoring engine, shared by the score stage's per-shard tasks (pipeline/score.py) and the Ray actor
path (score/ray_actors.py): :class:`ShardScorer` builds the configured scorers once per process,
decodes each image once and builds every declared input from it, batches rows and records per-sample
failures; and the one way a scored shard is assembled and committed (the score parquet, whose metadata
marks it done, after its embeddings file).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from t2i_curate.filters.base import Batch
from t2i_curate.pipeline.core.config import ScoreConfig
from t2i_curate.pipeline.core.io import (
    read_table,
)

log = logging.getLogger(__name__)

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

        from t2i_curate.pipeline.core.tars import IMAGE_SHA256

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
        from t2i_curate.pipeline.score.gpu_decode import iter_gpu_batches

        return iter_gpu_batches(rows, tar_path, transforms, scfg)
    if transforms:
        from t2i_curate.pipeline.score.decode import iter_decoded_batches

        return iter_decoded_batches(rows, tar_path, transforms, scfg, draft)
    # no scorer decodes images, but a sample missing from a truncated tar still fails here
    from t2i_curate.pipeline.core.tars import IMAGE_EXTS, MISSING, member_keys

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


def success_rows(src_parquet: Path) -> list[dict]:
    """The download successes of one shard, in key order (the order every executor scores them in)."""

    return sorted((r for r in read_table(src_parquet).to_pylist() if r["status"] == "success"),
                  key=lambda r: r["key"])


