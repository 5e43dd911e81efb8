"""The small formulas of evaluation, each tested against an independent reference: Wilson
intervals, judge agreement (precision, recall, Cohen's kappa), the Rogan-Gladen corrected rate,
and the per-image CLIP score."""

from __future__ import annotations

import math


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def agreement(truth: list[bool], pred: list[bool]) -> dict[str, float | None]:
    """Precision, recall, specificity and Cohen's kappa of ``pred`` against ``truth``."""
    tp = sum(t and p for t, p in zip(truth, pred, strict=True))
    fp = sum((not t) and p for t, p in zip(truth, pred, strict=True))
    fn = sum(t and (not p) for t, p in zip(truth, pred, strict=True))
    tn = len(truth) - tp - fp - fn
    n = len(truth)
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    specificity = tn / (tn + fp) if tn + fp else None
    po = (tp + tn) / n if n else None
    pe = (((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / (n * n)) if n else None
    kappa = None if po is None or pe is None or pe == 1 else (po - pe) / (1 - pe)
    return {"precision": precision, "recall": recall, "specificity": specificity, "kappa": kappa, "n_labelled": n}


def corrected_rate(observed: float, sensitivity: float | None, specificity: float | None) -> float | None:
    """Rogan-Gladen: the true rate implied by an observed rate and the judge's error rates."""
    if sensitivity is None or specificity is None or sensitivity + specificity <= 1:
        return None
    return min(1.0, max(0.0, (observed + specificity - 1) / (sensitivity + specificity - 1)))


# --- CLIP score -----------------------------------------------------------------------------


CLIP_SCORE_DEFINITION = "CLIPScore paper corpus score (per-image clamp, then mean)"
CLIP_SCORE_TORCHMETRICS = "torchmetrics CLIPScore aggregate (mean, then clamp)"


def clip_cosine(image_emb, text_emb):
    """Per-image cosine of image and text embeddings (which need not be normalised)."""
    import torch

    return torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)


def clip_score(image_emb, text_emb):
    """Per-image CLIP score: 100 * max(cos(image, text), 0). Embeddings need not be normalised.
    Its mean is the CLIPScore paper's corpus score (Hessel et al. 2021, w = 100 here)."""
    return 100 * clip_cosine(image_emb, text_emb).clamp(min=0)


def clip_score_torchmetrics(cosines) -> float:
    """torchmetrics' ``CLIPScore`` aggregate of the same cosines: max(100 * mean(cos), 0), the clamp after
    the mean. Differs from the paper's corpus score whenever some cosine is negative."""
    import torch

    return float(max(100 * torch.as_tensor(cosines, dtype=torch.float64).mean(), 0.0))
