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

    def score_rows(self, rows: list[dict], tar_path: Path) -> tuple[dict[str, list], dict]:
        """Score ``rows`` (download successes, sorted by key); return columns and provenance."""
        cols: dict[str, list] = {"key": [], "score_status": [], "score_error": []}
        cols.update({c: [] for c in self.columns})
        needs_image = any(s.needs_image for s in self.scorers)
        if needs_image:
            from pipeline.decode import iter_decoded_batches

            batches = iter_decoded_batches(rows, tar_path, self.scorers, self.cfg)
        else:
            bs = self.cfg.batch_size
            batches = ((rows[i : i + bs], {}, {}) for i in range(0, len(rows), bs))
        for batch_rows, inputs, errors in batches:
            ok_rows = [r for r in batch_rows if r["key"] not in errors]
            values: dict[str, list] = {}
            if ok_rows:
                b = Batch(rows=ok_rows, inputs=inputs)
                for s in self.scorers:
                    values.update(s.score(b))
            j = 0
            for r in batch_rows:
                cols["key"].append(r["key"])
                err = errors.get(r["key"])
                cols["score_status"].append("failed" if err else "ok")
                cols["score_error"].append(err)
                for c in self.columns:
                    cols[c].append(None if err else values[c][j])
                if not err:
                    j += 1
        return cols, self.provenance()
