"""Resolution scorer: sizes from img2dataset's ``original_width`` / ``original_height``."""

from __future__ import annotations

from typing import Any

from t2i_curate.filters.base import Batch, Scorer


class ResolutionScorer(Scorer):
    name = "resolution"
    columns = {"shorter_side": "BIGINT", "longer_side": "BIGINT", "aspect_ratio": "DOUBLE",
               "megapixels": "DOUBLE"}
    description = "shorter/longer side, aspect ratio (long/short) and megapixels of the original image"

    def score(self, batch: Batch) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {c: [] for c in self.columns}
        for row in batch.rows:
            w, h = row.get("original_width"), row.get("original_height")
            if not w or not h:  # unknown size: the rule sees NULL and drops the sample
                for c in self.columns:
                    out[c].append(None)
                continue
            short, long = min(w, h), max(w, h)
            out["shorter_side"].append(short)
            out["longer_side"].append(long)
            # long side over short side: 1.0 is square, 3.0 is 3:1 either way round
            out["aspect_ratio"].append(long / short)
            out["megapixels"].append(w * h / 1e6)
        return out
