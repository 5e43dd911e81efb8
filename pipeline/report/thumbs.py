"""Report thumbnails: small JPEGs of chosen samples, read from the download tars, cached per run.

``ensure_thumbs(run_dir, keys, px)`` makes ``report/thumbs/<px>/<key>.jpg`` for the keys that have
an image and no cached thumbnail yet, reading each needed download tar once (only the wanted
members are read); it returns the keys that have a thumbnail. :class:`Embedder` turns cached
thumbnails into ``data:`` URIs under a byte budget, so a page never grows past its size limit.
"""

from __future__ import annotations

import base64
import io
import logging
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from t2i_curate.pipeline.core.io import atomic_path
from t2i_curate.pipeline.core.layout import RunLayout, shard_of_key
from t2i_curate.pipeline.core.tars import IMAGE_EXTS, iter_members

log = logging.getLogger(__name__)

THUMB_PX = 128
JPEG_QUALITY = 80
_SAFE_KEY = re.compile(r"^[0-9A-Za-z_-]{1,64}$")


def _thumb_bytes(data: bytes, px: int) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (px, px))  # JPEG: decode at a reduced scale
        img = img.convert("RGB")
        img.thumbnail((px, px))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _by_shard(keys: Iterable[str]) -> dict[int, set[str]]:
    out: dict[int, set[str]] = defaultdict(set)
    for k in keys:
        if _SAFE_KEY.match(k) and k[:5].isdigit():  # refused rows ('refused-...') have no image
            out[shard_of_key(k)].add(k)
    return out


def ensure_thumbs(run_dir: Path, keys: Iterable[str], px: int = THUMB_PX) -> set[str]:
    """Make the missing thumbnails of ``keys``; return the keys that have one (cached or new).

    A key with no image in its download tar (a failed download, a damaged tar) has none.
    """
    lay = RunLayout(run_dir)
    folder = lay.report_thumbs(px)
    wanted = _by_shard(keys)
    have = {k for ks in wanted.values() for k in ks if (folder / f"{k}.jpg").exists()}
    made = 0
    for shard, ks in sorted(wanted.items()):
        todo = ks - have
        tar = lay.download_tar(shard)
        if not todo or not tar.exists():
            continue
        for key, _ext, data in iter_members(tar, keys=todo, exts=IMAGE_EXTS):
            if key in have:
                continue
            try:
                thumb = _thumb_bytes(data, px)
            except (OSError, ValueError, SyntaxError) as e:  # PIL: unreadable image data
                log.warning("report: no thumbnail for %s (%s)", key, e)
                continue
            with atomic_path(folder / f"{key}.jpg") as tmp:
                tmp.write_bytes(thumb)
            have.add(key)
            made += 1
    if made:
        log.info("report: %d new thumbnails in %s", made, folder)
    return have


class Embedder:
    """``data:`` URIs of cached thumbnails, until ``budget`` bytes of them have been handed out."""

    def __init__(self, run_dir: Path, available: set[str], budget: int, px: int = THUMB_PX) -> None:
        self.folder = RunLayout(run_dir).report_thumbs(px)
        self.available = available
        self.budget = budget
        self.used = 0
        self.given = 0
        self.refused = 0

    def uri(self, key: str) -> str | None:
        """The thumbnail of ``key`` as a data URI, or None (no image, or the budget is spent)."""
        if key not in self.available:
            return None
        data = (self.folder / f"{key}.jpg").read_bytes()
        uri = "data:image/jpeg;base64," + base64.b64encode(data).decode()
        if self.used + len(uri) > self.budget:
            self.refused += 1
            return None
        self.used += len(uri)
        self.given += 1
        return uri
