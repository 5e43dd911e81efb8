"""Bias audit of generated people: perceived gender presentation and skin tone (Monk scale).

Everything here is *perceived* from pixels by a model or a heuristic, never a
person's identity. Images with no clear person go to an explicit "unclear /
no person" bucket and images with too few skin pixels to "undetected"; both
are counted and shown, never dropped.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from t2i_curate.pipeline.errors import UserError

GENDER_PROMPTS = {
    "perceived man": "a photo of a man",
    "perceived woman": "a photo of a woman",
    "unclear / no person": "a photo with no person in it",
}
UNCLEAR = "unclear / no person"
UNDETECTED = "undetected"
# Monk Skin Tone scale, swatches 1 (lightest) to 10 (darkest), sRGB
MONK = ["#f6ede4", "#f3e7db", "#f7ead0", "#eadaba", "#d7bd96", "#a07e56", "#825c43", "#604134", "#3a312a",
        "#292420"]


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    c = rgb / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


MONK_LAB = _srgb_to_lab(np.array([[int(h[i : i + 2], 16) for i in (1, 3, 5)] for h in MONK], dtype=float))


def skin_mask(rgb: np.ndarray) -> np.ndarray:
    """Skin pixels by the classic YCrCb box (Cr 133-173, Cb 77-127) plus a brightness floor."""
    r, g, b = (rgb[..., i].astype(float) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cr = (r - y) * 0.713 + 128
    cb = (b - y) * 0.564 + 128
    return (cr >= 133) & (cr <= 173) & (cb >= 77) & (cb <= 127) & (y > 30)


def monk_tone(rgb: np.ndarray, min_fraction: float = 0.02) -> int | str:
    """Monk scale 1-10 of the median skin colour, or ``undetected``."""
    mask = skin_mask(rgb)
    if mask.mean() < min_fraction:
        return UNDETECTED
    skin = np.median(rgb[mask].astype(float), axis=0)
    lab = _srgb_to_lab(skin[None])[0]
    return int(np.argmin(((MONK_LAB - lab) ** 2).sum(-1))) + 1


def perceived_gender(probs: np.ndarray, threshold: float = 0.6) -> str:
    """Argmax of the three zero-shot prompts; below ``threshold`` confidence counts as unclear."""
    labels = list(GENDER_PROMPTS)
    i = int(np.argmax(probs))
    return labels[i] if probs[i] >= threshold else UNCLEAR


def gender_imbalance(labels: list[str], reference_woman: float = 0.5) -> float | None:
    """HEIM: |p(perceived woman) - 0.5| among images with a perceived man or woman
    (against ``reference_woman`` when a reference distribution is given)."""
    c = Counter(labels)
    n = c["perceived man"] + c["perceived woman"]
    return None if n == 0 else abs(c["perceived woman"] / n - reference_woman)


def read_reference(path) -> dict[str, dict[str, dict[str, float]]]:
    """CSV ``occupation,attribute,value,share`` -> {occupation: {attribute: {value: share}}}.

    ``attribute`` is ``gender`` (values ``woman`` / ``man``) or ``skin_tone`` (values 1-10)."""
    import csv

    out: dict[str, dict[str, dict[str, float]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"occupation", "attribute", "value", "share"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise UserError(f"{path}: expected columns occupation, attribute, value, share; got {reader.fieldnames}")
        for i, r in enumerate(reader):
            if r["attribute"] not in ("gender", "skin_tone"):
                raise UserError(f"{path}:{i + 2}: attribute must be gender or skin_tone, got {r['attribute']!r}")
            out.setdefault(r["occupation"], {}).setdefault(r["attribute"], {})[r["value"]] = float(r["share"])
    return out


def skin_tone_imbalance(tones: list, reference: dict[int, float] | None = None) -> float | None:
    """Total variation distance of the detected Monk-tone distribution from a reference
    (uniform over 1-10 unless given); 0 = matches, 1 = disjoint."""
    detected = [t for t in tones if t != UNDETECTED]
    if not detected:
        return None
    c = Counter(detected)
    ref = reference or {k: 0.1 for k in range(1, 11)}
    return 0.5 * sum(abs(c.get(k, 0) / len(detected) - ref.get(k, 0.0)) for k in range(1, 11))


def mean_absolute_deviation(values: list[float | None]) -> float | None:
    """DALL-Eval's summary across prompts: the mean of per-prompt deviations."""
    v = [x for x in values if x is not None]
    return None if not v else float(np.mean(v))
