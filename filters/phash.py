"""Perceptual hash (``phash``): the 64-bit DCT pHash of the image the scoring pass decoded.

Definition (the ``imagehash`` library's ``phash(image, hash_size=8, highfreq_factor=4)``,
reimplemented with numpy so that neither imagehash nor scipy is needed):

1. the decoded RGB image is converted to 8-bit grayscale with ``Image.convert("L")``
   (ITU-R 601-2 luma) and resized to 32x32 with ``Image.LANCZOS``;
2. the 2-D DCT-II of the 32x32 pixels (float64), columns then rows, unnormalised as
   ``scipy.fftpack.dct`` computes it (the scale does not change the bits);
3. the top-left 8x8 block of the coefficients (the DC term included, as imagehash does);
4. bit = coefficient > median of those 64 coefficients;
5. the 64 bits row-major, the first bit most significant, written as 16 lowercase hex
   digits (``str(imagehash.phash(img))``).

The input is the pipeline's decoded image (``Image.convert("RGB")`` of the file, or a JPEG
draft with ``score.decode: fast``), so a file with an alpha channel is hashed after its alpha
is dropped, where imagehash would convert RGBA to L directly. Images whose 64 coefficients
tie with their median (a flat image) get bits from float rounding, as with imagehash.

The ``near_duplicate_phash`` rule (``filters/dedup.py``) groups samples whose hashes lie
within ``select.dedup.phash.max_distance`` bits of each other.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

from t2i_curate.filters.base import Batch, Scorer

INPUT = "phash:gray32"
HASH_SIZE = 8
IMG_SIZE = HASH_SIZE * 4  # imagehash's highfreq_factor 4


@cache
def dct_matrix(n: int = IMG_SIZE):
    """``D`` with ``D @ x`` = ``scipy.fftpack.dct(x, type=2, norm=None)`` along axis 0:
    ``y[k] = 2 * sum_n x[n] cos(pi * k * (2n + 1) / (2N))``."""
    import numpy as np

    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    return 2.0 * np.cos(np.pi * k * (2 * i + 1) / (2 * n))


def gray32(img):
    """Decoded PIL image -> the 32x32 uint8 grayscale pixels pHash reads."""
    import numpy as np
    from PIL import Image

    return np.asarray(img.convert("L").resize((IMG_SIZE, IMG_SIZE), Image.LANCZOS), dtype=np.uint8)


def phash_bits(pixels):
    """32x32 grayscale pixels -> the 8x8 boolean pHash (row-major bit order)."""
    import numpy as np

    d = dct_matrix()
    coeffs = d @ np.asarray(pixels, dtype=np.float64) @ d.T  # dct along axis 0, then axis 1
    low = coeffs[:HASH_SIZE, :HASH_SIZE]
    return low > np.median(low)


def bits_to_hex(bits) -> str:
    """64 booleans (first = most significant) -> 16 lowercase hex digits."""
    value = 0
    for b in bits.ravel():
        value = (value << 1) | int(bool(b))
    return f"{value:016x}"


def phash_hex(img) -> str:
    """The pHash of a PIL image, as 16 lowercase hex digits (``str(imagehash.phash(img))``)."""
    return bits_to_hex(phash_bits(gray32(img)))


def hamming(a: str, b: str) -> int:
    """Bits that differ between two hex pHashes."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


class PhashScorer(Scorer):
    name = "phash"
    columns = {"phash": "VARCHAR"}
    description = "64-bit DCT perceptual hash (imagehash's phash), 16 hex digits; near_duplicate_phash groups them"

    @classmethod
    def image_inputs(cls, mcfg) -> dict[str, int]:
        return {INPUT: IMG_SIZE}

    def transforms(self) -> dict[str, Callable]:
        return {INPUT: gray32}

    def score(self, batch: Batch) -> dict[str, list[Any]]:
        return {"phash": [bits_to_hex(phash_bits(p)) for p in batch.inputs[INPUT]]}

    def provenance(self) -> dict[str, str]:
        return {"model": "pHash: 32x32 LANCZOS grayscale, DCT-II, 8x8 low frequencies > median "
                         "(imagehash.phash definition)", "tiny": "false"}
