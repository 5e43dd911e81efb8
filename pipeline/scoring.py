"""The scoring pass over one shard: build scorers once per process, batch rows, run them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from filters.base import Batch, Scorer
from pipeline.config import ScoreConfig

log = logging.getLogger(__name__)

_CACHE: dict[str, ShardScorer] = {}  # one per process: models load once per worker


def build_scorers(scfg: ScoreConfig) -> list[Scorer]:
    from filters.resolution import ResolutionScorer

    out: list[Scorer] = []
    model_scorers = [s for s in scfg.scorers if s != "resolution"]
    if "resolution" in scfg.scorers:
        out.append(ResolutionScorer())
    if model_scorers:
        from filters.models import build_model_scorers

        out.extend(build_model_scorers(model_scorers, scfg))
    return out


class ShardScorer:
    def __init__(self, scfg: ScoreConfig):
        self.cfg = scfg
        self.scorers = build_scorers(scfg)
        # the CLIP whose image embeddings are kept: the aesthetic one, else the similarity one
        self.embedding_clip = next((s.clip_name for s in self.scorers if hasattr(s, "clip_name")), None)
        self.bank = next((s.bank for s in self.scorers if hasattr(s, "bank")), None)

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
        return {s.name: s.metadata() for s in self.scorers}

    def _batches(self, rows: list[dict], tar_path: Path):
        if any(s.needs_image for s in self.scorers):
            from pipeline.decode import iter_decoded_batches

            return iter_decoded_batches(rows, tar_path, self.scorers, self.cfg)
        bs = self.cfg.batch_size
        return ((rows[i : i + bs], {}, {}) for i in range(0, len(rows), bs))

    def score_rows(self, rows: list[dict], tar_path: Path) -> tuple[dict[str, list], Any, dict]:
        """Score ``rows`` (download successes); return columns in key order, the image
        embeddings (float16 array aligned with ``embedding_row``, or None) and provenance."""
        import numpy as np

        results: dict[str, dict[str, Any]] = {}
        embeddings: dict[str, Any] = {}
        for batch_rows, inputs, errors in self._batches(rows, tar_path):
            ok_rows = [r for r in batch_rows if r["key"] not in errors]
            values: dict[str, list] = {}
            if ok_rows:
                b = Batch(rows=ok_rows, inputs=inputs)
                for s in self.scorers:
                    values.update(s.score(b))
                if self.embedding_clip and self.cfg.save_embeddings:
                    emb = self.bank.image_embedding(self.embedding_clip, b).numpy().astype(np.float16)
                    embeddings.update({r["key"]: emb[j] for j, r in enumerate(ok_rows)})
            for key, err in errors.items():
                results[key] = {"score_status": "failed", "score_error": err}
            for j, r in enumerate(ok_rows):
                results[r["key"]] = {"score_status": "ok", "score_error": None,
                                     **{c: values[c][j] for c in self.columns}}
        keys = sorted(results)
        cols: dict[str, list] = {"key": keys}
        for c in ["score_status", "score_error", *self.columns]:
            cols[c] = [results[k].get(c) for k in keys]
        if self.bank is not None:  # flag every row scored with tiny random models
            cols["tiny_models"] = [self.bank.tiny()] * len(keys)
        emb_array = None
        if embeddings:
            emb_keys = [k for k in keys if k in embeddings]
            row_of = {k: i for i, k in enumerate(emb_keys)}
            cols["embedding_row"] = [row_of.get(k) for k in keys]
            emb_array = np.stack([embeddings[k] for k in emb_keys])
        return cols, emb_array, self.provenance()
