"""Skin tone from pixels: CIELAB, the individual typology angle (ITA) and the Monk Skin Tone scale.

Two measures, kept side by side for comparison:

- **HEIM-style, whole image** (:func:`monk_tone`): every pixel in the classic YCrCb skin box, median
  colour, nearest Monk swatch in CIELAB. Walls, sand and wood count as skin; kept for comparison only.
- **DALL-Eval-style, face skin** (:func:`skin_ita` then :func:`monk_from_ita`): the cheek and forehead
  pixels that face-mesh landmarks select (``eval/faces.py``), ITA from their median L* and b*, then the
  Monk tone by the stated ITA bins below.

All of it is a *perceived*, pixel-level colour under unknown lighting and camera processing, not a
person's identity or a colorimetric measurement of skin.
"""

from __future__ import annotations

import math

import numpy as np

UNDETECTED = "undetected"
# Monk Skin Tone scale (Monk 2019, skintone.google), swatches 1 (lightest) to 10 (darkest), sRGB
MONK = ["#f6ede4", "#f3e7db", "#f7ead0", "#eadaba", "#d7bd96", "#a07e56", "#825c43", "#604134", "#3a312a",
        "#292420"]

# Chardon, Cretois & Hourseau (1991), "Skin colour typology and suntanning pathways", Int J Cosmet Sci 13:
# the standard ITA skin categories (degrees), as (lower edge, name), darkest last.
ITA_CATEGORIES = [(55.0, "very light"), (41.0, "light"), (28.0, "intermediate"), (10.0, "tan"),
                  (-30.0, "brown"), (-math.inf, "dark")]

# ITA -> Monk: the Monk tone whose swatch ITA is nearest. The swatch ITAs (sRGB -> CIELAB, D65) are
# 83.0, 80.2, 71.8, 64.7, 50.3, 10.9, -20.2, -55.4, -78.4, -84.3 degrees for Monk 1..10 (monotonic),
# and these edges are the midpoints between neighbours (tests recompute them from MONK). The swatches
# fall in Chardon's categories as: 1-4 "very light", 5 "light", 6 "tan", 7 "brown", 8-10 "dark" (none is
# "intermediate"), so both scales are reported. Here ITA is of sRGB pixels under unknown light, not the
# colorimeter reading the categories were made for: compare images with each other, not with skin studies.
MONK_ITA_EDGES = [(81.6, 1), (76.0, 2), (68.2, 3), (57.5, 4), (30.6, 5), (-4.6, 6), (-37.8, 7), (-66.9, 8),
                  (-81.3, 9), (-math.inf, 10)]


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB values in 0-255, any leading shape."""
    c = np.asarray(rgb, dtype=float) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


MONK_RGB = np.array([[int(h[i : i + 2], 16) for i in (1, 3, 5)] for h in MONK], dtype=float)
MONK_LAB = srgb_to_lab(MONK_RGB)


def ita(lightness: float, b: float) -> float:
    """Individual typology angle in degrees: atan2(L* - 50, b*) * 180 / pi."""
    return math.degrees(math.atan2(lightness - 50.0, b))


def ita_category(angle: float) -> str:
    """Chardon et al. (1991) category of an ITA (``very light`` .. ``dark``)."""
    return next(name for edge, name in ITA_CATEGORIES if angle > edge)


def monk_from_ita(angle: float) -> int:
    """Monk tone 1-10 of an ITA by :data:`MONK_ITA_EDGES` (a value on an edge goes to the darker tone)."""
    return next(tone for edge, tone in MONK_ITA_EDGES if angle > edge)


def skin_ita(pixels: np.ndarray, min_pixels: int = 20) -> float | None:
    """ITA of skin pixels (N x 3 sRGB): the L* 10th-90th percentile band is kept (dropping specular
    highlights, shadow, stray hair, brow or glasses), then ITA of the median L* and median b*. ``None``
    with fewer than ``min_pixels`` pixels."""
    lab = srgb_to_lab(np.asarray(pixels, dtype=float).reshape(-1, 3))
    if len(lab) < min_pixels:
        return None
    lo, hi = np.percentile(lab[:, 0], [10, 90])
    keep = lab[(lab[:, 0] >= lo) & (lab[:, 0] <= hi)]
    return ita(float(np.median(keep[:, 0])), float(np.median(keep[:, 2])))


def skin_mask(rgb: np.ndarray) -> np.ndarray:
    """HEIM-style skin pixels: the classic YCrCb box (Cr 133-173, Cb 77-127) plus a brightness floor."""
    r, g, b = (rgb[..., i].astype(float) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cr = (r - y) * 0.713 + 128
    cb = (b - y) * 0.564 + 128
    return (cr >= 133) & (cr <= 173) & (cb >= 77) & (cb <= 127) & (y > 30)


def monk_tone(rgb: np.ndarray, min_fraction: float = 0.02) -> int | str:
    """HEIM-style whole-image measure: Monk 1-10 of the nearest swatch (CIELAB) to the median colour of
    :func:`skin_mask`'s pixels, or ``undetected`` when under ``min_fraction`` of the image is skin."""
    mask = skin_mask(rgb)
    if mask.mean() < min_fraction:
        return UNDETECTED
    skin = np.median(rgb[mask].astype(float), axis=0)
    lab = srgb_to_lab(skin[None])[0]
    return int(np.argmin(((MONK_LAB - lab) ** 2).sum(-1))) + 1
