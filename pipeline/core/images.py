"""Decoding one stored image: the one place image bytes become pixels (scoring, eval's reference images)."""

from __future__ import annotations

import io

MAX_PIXELS = 89_478_485  # as Pillow and download.max_image_pixels: a larger declared size is a bomb


def decode_image(data: bytes, draft: int | None = None):
    """Bytes -> RGB PIL image; raises on bad data.

    ``draft=None`` ("exact" mode) decodes the full image and converts it with
    ``Image.convert("RGB")``, as LAION's reference scripts do before their
    transforms. ``draft=N`` ("fast" mode) lets a JPEG decode at 1/2, 1/4 or 1/8
    scale while both sides stay >= N.

    EXIF orientation is deliberately not applied: img2dataset reports sizes of the
    stored pixel grid (and its re-encode drops the tag), so every stage sees the
    same grid and the same width/height.
    """
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    if img.width * img.height > MAX_PIXELS:
        raise ValueError(f"too many pixels: image declares {img.width}x{img.height}, over the "
                         f"{MAX_PIXELS} pixel limit")
    if draft is not None and img.format == "JPEG":
        img.draft("RGB", (draft, draft))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")
