"""Cosine between CLIP image and caption embeddings (LAION's ``similarity``); the CLIP's name is
stored beside it, since a threshold (0.28) only means something for the model it was set on."""

from __future__ import annotations

from typing import Any

from t2i_curate.filters.base import Batch, Scorer
from t2i_curate.pipeline.core.config import ModelsConfig


class ClipSimilarityScorer(Scorer):
    name = "clip_similarity"
    columns = {"similarity": "DOUBLE", "similarity_model": "VARCHAR"}
    uses_models = True
    description = "image-caption cosine of score.models.similarity_clip (ViT-B/32 as LAION)"

    @classmethod
    def clip_models(cls, mcfg: ModelsConfig) -> list[str]:
        return [mcfg.similarity_clip]

    def __init__(self, bank):
        super().__init__(bank)
        self.clip_name = bank.mcfg.similarity_clip

    def score(self, batch: Batch) -> dict[str, list[Any]]:
        img = self.bank.image_embedding(self.clip_name, batch)
        txt = self.bank.text_embedding(self.clip_name, [r.get("caption") for r in batch.rows])
        sim = (img * txt).sum(-1)
        return {"similarity": sim.tolist(), "similarity_model": [self.bank.clip_label(self.clip_name)] * len(batch.rows)}

    def provenance(self) -> dict[str, str]:
        return {"clip": self.bank.clip_label(self.clip_name), "clip_sha256": self.bank.clip(self.clip_name).sha256,
                "tiny": str(self.bank.tiny).lower()}
