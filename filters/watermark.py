"""LAION watermark detector (``pwatermark``): EfficientNet-B3 + LAION's head, softmax index 0."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from t2i_curate.filters.base import Batch, Scorer
from t2i_curate.pipeline.core.config import ModelsConfig
from t2i_curate.pipeline.core.weights import WeightFile, resolve_weight

WATERMARK = WeightFile(
    "watermark", "watermark_model_v1.pt",
    "https://github.com/LAION-AI/LAION-5B-WatermarkDetection/raw/main/models/watermark_model_v1.pt",
    None,  # unknown upstream: recorded at first download and pinned
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT = "watermark:256x256"


def watermark_model(arch: str = "efficientnet_b3", hidden: tuple[int, int] = (625, 256)):
    """timm EfficientNet with LAION's classifier head; softmax index 0 is P(watermark)."""
    import timm
    import torch.nn as nn

    model = timm.create_model(arch, pretrained=False, num_classes=2)
    model.classifier = nn.Sequential(
        nn.Linear(model.num_features, hidden[0]), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(hidden[0], hidden[1]), nn.ReLU(), nn.Linear(hidden[1], 2),
    )
    return model


def load_watermark(mcfg: ModelsConfig, allow_download: bool = False):
    import torch

    if mcfg.preset == "tiny":
        torch.manual_seed(2)
        return watermark_model("test_efficientnet", hidden=(16, 8)).eval()
    model = watermark_model()
    state = torch.load(resolve_weight(WATERMARK, mcfg, allow_download), map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model.load_state_dict(state)
    return model.eval()


def watermark_transform():
    """LAION's watermark preprocessing: stretch to 256x256, ToTensor, ImageNet mean/std."""
    from torchvision import transforms as T  # noqa: N812 (torchvision convention)

    return T.Compose([T.Resize((256, 256)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class WatermarkScorer(Scorer):
    name = "watermark"
    columns = {"pwatermark": "DOUBLE"}
    uses_models = True
    description = "LAION watermark probability (EfficientNet-B3 + LAION head, softmax index 0)"

    @classmethod
    def weight_files(cls, mcfg: ModelsConfig) -> list[WeightFile]:
        return [WATERMARK]

    @classmethod
    def all_weight_files(cls) -> list[WeightFile]:
        return [WATERMARK]

    @classmethod
    def image_inputs(cls, mcfg: ModelsConfig) -> dict[str, int]:
        return {INPUT: 256}

    def __init__(self, bank):
        super().__init__(bank)
        self.model = bank.prepare(load_watermark(bank.mcfg))
        self.digest = None
        if not bank.tiny:  # the pinned digest of the file that was loaded (checked while loading)
            from t2i_curate.pipeline.core.weights import verify

            self.digest = verify(resolve_weight(WATERMARK, bank.mcfg), WATERMARK, bank.mcfg)

    def transforms(self) -> dict[str, Callable]:
        return {INPUT: watermark_transform()}

    def score(self, batch: Batch) -> dict[str, list[Any]]:
        import torch

        x = batch.inputs[INPUT].to(self.bank.device, self.bank.dtype)
        with torch.inference_mode():
            p = torch.softmax(self.model(x).float(), dim=-1)[:, 0].cpu()
        return {"pwatermark": p.tolist()}

    def provenance(self) -> dict[str, str]:
        if self.bank.tiny:
            return {"model": "test_efficientnet (tiny)", "tiny": "true"}
        return {"model": "efficientnet_b3a + LAION head", "weights": f"{WATERMARK.filename} sha256 {self.digest}",
                "tiny": "false"}
