"""LAION aesthetic predictor (V2 MLP, or V1 linear) on L2-normalised CLIP image embeddings."""

from __future__ import annotations

from typing import Any

from t2i_curate.filters.base import Batch, Scorer
from t2i_curate.pipeline.core.config import ModelsConfig
from t2i_curate.pipeline.core.weights import WeightFile, resolve_weight

AESTHETIC_V2 = WeightFile(
    "aesthetic_v2", "sac+logos+ava1-l14-linearMSE.pth",
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth",
    "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0",
)
AESTHETIC_V1_L14 = WeightFile(
    "aesthetic_v1_l14", "sa_0_4_vit_l_14_linear.pth",
    "https://github.com/LAION-AI/aesthetic-predictor/raw/main/sa_0_4_vit_l_14_linear.pth",
    "2cd4e60f4f24ae3bcd57b847b13c1f3ba27edc28cc1a7f9ce74ee9f421243cba",
)
AESTHETIC_V1_B32 = WeightFile(
    "aesthetic_v1_b32", "sa_0_4_vit_b_32_linear.pth",
    "https://github.com/LAION-AI/aesthetic-predictor/raw/main/sa_0_4_vit_b_32_linear.pth",
    "c7b14cead230694acc7b9447974d3cad78003c72da032e402a303b6c2429e85f",
)


def head_file(mcfg: ModelsConfig) -> WeightFile:
    if mcfg.aesthetic_head == "v2":
        return AESTHETIC_V2
    return AESTHETIC_V1_L14 if mcfg.aesthetic_clip.startswith("ViT-L-14") else AESTHETIC_V1_B32


def aesthetic_mlp(input_size: int = 768):
    """LAION aesthetic predictor V2's MLP (no activations), layer names as in the checkpoint."""
    import torch.nn as nn

    class AestheticMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(
                nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
            )

        def forward(self, x):
            return self.layers(x)

    return AestheticMLP()


def load_aesthetic_head(version: str, embed_dim: int, mcfg: ModelsConfig, allow_download: bool = False):
    """V2 MLP or V1 linear head; tiny: the same class at the tiny CLIP's width, seeded."""
    import torch
    import torch.nn as nn

    if mcfg.preset == "tiny":
        torch.manual_seed(1)
        head = aesthetic_mlp(embed_dim) if version == "v2" else nn.Linear(embed_dim, 1)
        return head.eval()
    head = aesthetic_mlp(embed_dim) if version == "v2" else nn.Linear(embed_dim, 1)
    wf = AESTHETIC_V2 if version == "v2" else AESTHETIC_V1_L14 if embed_dim == 768 else AESTHETIC_V1_B32
    state = torch.load(resolve_weight(wf, mcfg, allow_download), map_location="cpu", weights_only=True)
    head.load_state_dict(state)
    return head.eval()


class AestheticScorer(Scorer):
    name = "aesthetic"
    columns = {"aesthetic_score": "DOUBLE"}
    uses_models = True
    description = "LAION aesthetic predictor on the L2-normalised CLIP image embedding (1-10)"

    @classmethod
    def clip_models(cls, mcfg: ModelsConfig) -> list[str]:
        return [mcfg.aesthetic_clip]

    @classmethod
    def weight_files(cls, mcfg: ModelsConfig) -> list[WeightFile]:
        return [head_file(mcfg)]

    @classmethod
    def all_weight_files(cls) -> list[WeightFile]:
        return [AESTHETIC_V2, AESTHETIC_V1_L14, AESTHETIC_V1_B32]

    def __init__(self, bank):
        super().__init__(bank)
        mcfg = bank.mcfg
        self.clip_name = mcfg.aesthetic_clip
        clip = bank.clip(self.clip_name)
        self.head = bank.prepare(load_aesthetic_head(mcfg.aesthetic_head, clip.embed_dim, mcfg))

    def score(self, batch: Batch) -> dict[str, list[Any]]:
        import torch

        e = self.bank.image_embedding(self.clip_name, batch)
        with torch.inference_mode():
            s = self.head(e.to(self.bank.device, self.bank.dtype)).float().squeeze(-1).cpu()
        return {"aesthetic_score": s.tolist()}

    def provenance(self) -> dict[str, str]:
        mcfg = self.bank.mcfg
        head = "tiny" if self.bank.tiny else f"{head_file(mcfg).filename} sha256 {head_file(mcfg).sha256}"
        return {"clip": self.bank.clip_label(self.clip_name), "clip_sha256": self.bank.clip(self.clip_name).sha256,
                "head": mcfg.aesthetic_head, "weights": head,
                "tiny": str(self.bank.tiny).lower()}
