"""Aspect-ratio buckets for training (SDXL / NovelAI-style multi-aspect batches).

``write.buckets`` names a bucket list (``sdxl``, ``sd1``) or gives one (``[[width, height], ...]``).
Each written sample gets ``bucket_width`` / ``bucket_height``: the bucket whose aspect ratio is
nearest the stored image's (``width`` / ``height``, as img2dataset wrote it) by log-ratio, i.e. the
bucket minimising ``|ln(w / h) - ln(bw / bh)|``, so 2:1 and 1:2 are equally far from 1:1. On a tie,
the bucket first in (aspect ratio, area) order wins. ``write.group_by_bucket`` cuts the curated
shards per bucket (each shard holds one bucket; ``manifest.json`` names it), so a loader can batch
one bucket at a time.
"""

from __future__ import annotations

import math
from typing import Any

# SDXL's multi-aspect training buckets: the table in the appendix of Podell et al., "SDXL: Improving
# Latent Diffusion Models for High-Resolution Image Synthesis" (arXiv:2307.01952), listed there as
# height x width from 512 x 2048 to 2048 x 512, sides in steps of 64, about 1024^2 pixels each.
# 40 buckets (the table has 704 x 1344 but not 1344 x 704). Stored here as (width, height).
_SDXL_HW = [
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664),
    (640, 1600), (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280),
    (832, 1216), (832, 1152), (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024),
    (1024, 960), (1088, 960), (1088, 896), (1152, 896), (1152, 832), (1216, 832), (1280, 768),
    (1344, 768), (1408, 704), (1472, 704), (1536, 640), (1600, 640), (1664, 576), (1728, 576),
    (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
]
SDXL = [(w, h) for h, w in _SDXL_HW]


def area_buckets(area: int, step: int = 64, min_side: int = 256, max_side: int = 1024) -> list[tuple[int, int]]:
    """NovelAI's bucket procedure ("NovelAI Improvements on Stable Diffusion", 2022): each width from
    ``min_side`` to ``max_side`` in ``step``s with the largest height (a multiple of ``step``, at most
    ``max_side``) keeping ``width * height <= area``, and every such bucket transposed too."""
    out = set()
    for w in range(min_side, max_side + 1, step):
        h = min(max_side, area // w // step * step)
        if h >= min_side:
            out |= {(w, h), (h, w)}
    return sorted(out, key=lambda b: (b[0] / b[1], b[0] * b[1]))


# SD 1.x trained at 512 x 512: the same procedure at 512^2 pixels, sides 256..1024 (17 buckets)
SD1 = area_buckets(512 * 512)

NAMED: dict[str, list[tuple[int, int]]] = {"sdxl": SDXL, "sd1": SD1}


def resolve_buckets(spec: str | list) -> list[tuple[int, int]]:
    """A bucket list name or ``[[w, h], ...]`` -> (width, height) pairs in (aspect ratio, area) order.
    Raises ValueError (config validation turns it into a message naming the key)."""
    if isinstance(spec, str):
        if spec not in NAMED:
            raise ValueError(f"unknown bucket list {spec!r}; expected one of {sorted(NAMED)} or [[width, height], ...]")
        pairs = NAMED[spec]
    else:
        pairs = [tuple(p) for p in spec]
    if not pairs:
        raise ValueError("the bucket list is empty; expected at least one [width, height]")
    bad = [p for p in pairs if len(p) != 2 or not all(isinstance(x, int) and x > 0 for x in p)]
    if bad:
        raise ValueError(f"buckets must be [width, height] with positive integer sides; got {bad[:3]}")
    if len(set(pairs)) != len(pairs):
        raise ValueError("the bucket list repeats a bucket")
    return sorted(pairs, key=lambda b: (b[0] / b[1], b[0] * b[1]))


def assign(widths, heights, buckets: list[tuple[int, int]]) -> tuple[list[int | None], list[int | None]]:
    """For each (width, height), the nearest bucket by |ln aspect difference| (first of equals in the
    list's order); None for a missing or non-positive size."""
    import numpy as np

    w = np.array([x if x and x > 0 else np.nan for x in widths], dtype=np.float64)
    h = np.array([x if x and x > 0 else np.nan for x in heights], dtype=np.float64)
    logs = np.array([math.log(bw / bh) for bw, bh in buckets])
    if len(w) == 0:
        return [], []
    dist = np.abs(np.log(w / h)[:, None] - logs[None, :])
    best = np.argmin(np.nan_to_num(dist, nan=np.inf), axis=1)
    ok = ~np.isnan(w / h)
    bw = [buckets[i][0] if k else None for i, k in zip(best.tolist(), ok.tolist(), strict=True)]
    bh = [buckets[i][1] if k else None for i, k in zip(best.tolist(), ok.tolist(), strict=True)]
    return bw, bh


def with_buckets(meta, wcfg):
    """The write plan's metadata with ``bucket_width`` / ``bucket_height`` appended (unchanged when
    ``write.buckets`` is unset), sorted by (bucket, key) when shards are grouped by bucket."""
    import pyarrow as pa

    if wcfg.buckets is None:
        return meta
    buckets = resolve_buckets(wcfg.buckets)
    bw, bh = assign(meta["width"].to_pylist(), meta["height"].to_pylist(), buckets)
    meta = meta.append_column("bucket_width", pa.array(bw, pa.int64()))
    meta = meta.append_column("bucket_height", pa.array(bh, pa.int64()))
    if wcfg.group_by_bucket:
        meta = meta.sort_by([("bucket_width", "ascending"), ("bucket_height", "ascending"), ("key", "ascending")])
    return meta


def shard_slices(meta, per: int, group: bool) -> list[tuple[int, int]]:
    """(offset, length) of each output shard in ``meta``: ``per`` rows each, or, grouped, ``per`` rows
    of one bucket each (``meta`` sorted by bucket, as ``with_buckets`` leaves it)."""
    n = meta.num_rows
    if not group:
        return [(i, min(per, n - i)) for i in range(0, n, per)]
    labels = list(zip(meta["bucket_width"].to_pylist(), meta["bucket_height"].to_pylist(), strict=True))
    out, start = [], 0
    for i in range(1, n + 1):
        if i == n or labels[i] != labels[start]:
            out += [(j, min(per, i - j)) for j in range(start, i, per)]
            start = i
    return out


def bucket_of_shard(rows_meta, offset: int) -> str | None:
    """``"WxH"`` of the shard starting at ``offset`` (grouped shards hold one bucket)."""
    w, h = rows_meta["bucket_width"][offset].as_py(), rows_meta["bucket_height"][offset].as_py()
    return None if w is None else f"{w}x{h}"


def manifest_info(meta, wcfg) -> dict[str, Any]:
    """What the manifest says about buckets: the list, the rule and the samples per bucket."""
    if wcfg.buckets is None:
        return {}
    counts: dict[str, int] = {}
    for w, h in zip(meta["bucket_width"].to_pylist(), meta["bucket_height"].to_pylist(), strict=True):
        counts[f"{w}x{h}"] = counts.get(f"{w}x{h}", 0) + 1
    return {"buckets": {
        "list": wcfg.buckets if isinstance(wcfg.buckets, str) else "custom",
        "sizes": [list(b) for b in resolve_buckets(wcfg.buckets)],
        "rule": "nearest aspect ratio by |ln(w/h) - ln(bw/bh)| of the stored image; ties: first in (ratio, area) order",
        "grouped": wcfg.group_by_bucket,
        "samples": dict(sorted(counts.items())),
    }}
