"""Model-backed scorers: watermark probability, aesthetic score, CLIP similarity.

They share one :class:`ModelBank` per process: each CLIP loads once, and the
image embedding of a batch is computed once per CLIP and reused by every
scorer that needs it (aesthetic head, similarity, saved embeddings).
"""

from __future__ import annotations

from typing import Any

from filters.base import Batch, Scorer
from pipeline.config import ScoreConfig


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("score.device is 'cuda' but no CUDA device is visible")
    return requested


class ModelBank:
    """Loaded models of one process, and per-batch embedding memo."""

    def __init__(self, scfg: ScoreConfig):
        import torch

        self.cfg = scfg
        self.mcfg = scfg.models
        self.device = pick_device(scfg.device)
        self.dtype = torch.float16 if self.device == "cuda" else torch.float32
        self.clips: dict[str, Any] = {}

    def clip(self, name: str):
        from pipeline.models import load_clip

        if name not in self.clips:
            b = load_clip(name, self.mcfg)
            b.model.to(self.device, self.dtype)
            self.clips[name] = b
        return self.clips[name]

    def prepare(self, module):
        return module.to(self.device, self.dtype).eval()

    def input_key(self, name: str) -> str:
        """Name of the decoded input a CLIP needs; CLIPs with equal preprocessing share it."""
        return "clip:" + repr(self.clip(name).preprocess)

    def image_embedding(self, name: str, batch: Batch):
        """L2-normalised image embeddings (float32, CPU) for the batch, computed once."""
        import torch

        memo = ("image_embedding", name)
        if memo not in batch.inputs:
            b = self.clip(name)
            x = batch.inputs[self.input_key(name)].to(self.device, self.dtype)
            with torch.inference_mode():
                e = b.model.encode_image(x).float()
            batch.inputs[memo] = torch.nn.functional.normalize(e, dim=-1).cpu()
        return batch.inputs[memo]

    def text_embedding(self, name: str, captions: list[str]):
        import torch

        b = self.clip(name)
        tokens = b.tokenizer([c or "" for c in captions]).to(self.device)
        with torch.inference_mode():
            e = b.model.encode_text(tokens).float()
        return torch.nn.functional.normalize(e, dim=-1).cpu()

    def tiny(self) -> bool:
        return self.mcfg.preset == "tiny"


class AestheticScorer(Scorer):
    """LAION aesthetic predictor (V2 MLP or V1 linear) on normalised ViT-L/14 embeddings."""

    name = "aesthetic"
    columns = ("aesthetic_score",)
    needs_image = True

    def __init__(self, bank: ModelBank):
        from pipeline.models import load_aesthetic_head

        self.bank = bank
        self.clip_name = bank.mcfg.aesthetic_clip
        clip = bank.clip(self.clip_name)
        self.head = bank.prepare(load_aesthetic_head(bank.mcfg.aesthetic_head, clip.embed_dim, bank.mcfg))
        self.inputs = {bank.input_key(self.clip_name): clip.preprocess}

    def score(self, batch: Batch) -> dict[str, list[Any]]:
        import torch

        e = self.bank.image_embedding(self.clip_name, batch)
        with torch.inference_mode():
            s = self.head(e.to(self.bank.device, self.bank.dtype)).float().squeeze(-1).cpu()
        return {"aesthetic_score": s.tolist()}

    def metadata(self) -> dict[str, str]:
        return {"clip": self.clip_name, "head": self.bank.mcfg.aesthetic_head, "tiny": str(self.bank.tiny()).lower()}


class ClipSimilarityScorer(Scorer):
    """Cosine between CLIP image and caption embeddings (LAION's ``similarity``)."""

    name = "clip_similarity"
    columns = ("similarity", "similarity_model")
    needs_image = True

    def __init__(self, bank: ModelBank):
        self.bank = bank
        self.clip_name = bank.mcfg.similarity_clip
        clip = bank.clip(self.clip_name)
        self.inputs = {bank.input_key(self.clip_name): clip.preprocess}

    def score(self, batch: Batch) -> dict[str, list[Any]]:
        img = self.bank.image_embedding(self.clip_name, batch)
        txt = self.bank.text_embedding(self.clip_name, [r.get("caption") for r in batch.rows])
        sim = (img * txt).sum(-1)
        model = ("tiny:" if self.bank.tiny() else "") + self.clip_name
        return {"similarity": sim.tolist(), "similarity_model": [model] * len(batch.rows)}

    def metadata(self) -> dict[str, str]:
        return {"clip": self.clip_name, "tiny": str(self.bank.tiny()).lower()}


class WatermarkScorer(Scorer):
    """LAION watermark detector: EfficientNet-B3 + custom head, softmax index 0."""

    name = "watermark"
    columns = ("pwatermark",)
    needs_image = True

    def __init__(self, bank: ModelBank):
        from pipeline.models import load_watermark, watermark_transform

        self.bank = bank
        self.model = bank.prepare(load_watermark(bank.mcfg))
        self.inputs = {"watermark:256x256": watermark_transform()}

    def score(self, batch: Batch) -> dict[str, list[Any]]:
        import torch

        x = batch.inputs["watermark:256x256"].to(self.bank.device, self.bank.dtype)
        with torch.inference_mode():
            p = torch.softmax(self.model(x).float(), dim=-1)[:, 0].cpu()
        return {"pwatermark": p.tolist()}

    def metadata(self) -> dict[str, str]:
        arch = "test_efficientnet (tiny)" if self.bank.tiny() else "efficientnet_b3a + LAION head"
        return {"model": arch, "tiny": str(self.bank.tiny()).lower()}


SCORERS = {"aesthetic": AestheticScorer, "clip_similarity": ClipSimilarityScorer, "watermark": WatermarkScorer}


def build_model_scorers(names: list[str], scfg: ScoreConfig) -> list[Scorer]:
    bank = ModelBank(scfg)
    return [SCORERS[n](bank) for n in names]
