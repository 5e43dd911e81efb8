"""The one device picker for scoring and evaluation."""

from __future__ import annotations

from t2i_curate.pipeline.core.errors import UserError


def pick_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` without a GPU is refused."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("device is 'cuda' but no CUDA device is visible; set it to 'auto' or 'cpu'")
    return requested


def model_dtype(device: str):
    """fp16 on CUDA, fp32 on CPU."""
    import torch

    return torch.float16 if device == "cuda" else torch.float32
