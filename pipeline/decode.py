"""Decode each image of a shard once and build every model's input tensor from it.

A torch ``IterableDataset`` reads the tar, decodes with JPEG draft mode to the
largest size any model needs, and applies each
model's transform. With ``decode_workers > 0`` a DataLoader runs it in worker
processes ahead of the models. Samples that fail to decode come back as
errors, never dropped.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch.utils.data as tud

log = logging.getLogger(__name__)

IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tiff"}
DRAFT_SIZE = 256  # the largest input any of our models takes (watermark: 256x256)
MAX_PIXELS = 16_000 * 16_000  # beyond this a declared size is treated as a decompression bomb


def decode_image(data: bytes, draft: int = DRAFT_SIZE):
    """Bytes -> RGB PIL image (JPEG-drafted to >= ``draft`` px); raises on bad data.

    EXIF orientation is deliberately not applied: img2dataset reports sizes of the
    stored pixel grid (and its re-encode drops the tag), so every stage sees the
    same grid and the same width/height.
    """
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    if img.width * img.height > MAX_PIXELS:
        raise ValueError(f"image declares {img.width}x{img.height} pixels, over the {MAX_PIXELS} limit")
    if img.format == "JPEG":
        img.draft("RGB", (draft, draft))  # decode at 1/2, 1/4 or 1/8 scale when that is still large enough
    img.load()
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA", "P", "PA"):
            img = img.convert("RGBA")
            bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, img)
        img = img.convert("RGB")
    return img


class TarImages(tud.IterableDataset):
    """Iterates ``(key, tensors | None, error | None)`` for the wanted keys of one tar."""

    def __init__(self, tar_path: Path, keys: list[str], transforms: dict[str, Callable]):
        self.tar_path = str(tar_path)
        self.keys = set(keys)
        self.transforms = transforms

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
        wi = tud.get_worker_info()
        n, i = (wi.num_workers, wi.id) if wi else (1, 0)
        seen = 0
        with tarfile.open(self.tar_path) as tf:
            try:
                for m in tf:
                    key, _, ext = m.name.partition(".")
                    if not m.isfile() or key not in self.keys or ext.lower() not in IMAGE_EXTS:
                        continue
                    seen += 1
                    if (seen - 1) % n != i:
                        continue
                    yield self._one(key, tf.extractfile(m).read())
            except (tarfile.ReadError, EOFError, OSError) as e:
                # a truncated tar: what was read is scored, the rest is recorded as missing
                log.warning("%s: tar ends early (%s); the remaining samples are recorded as failed",
                            self.tar_path, e)

    def _one(self, key: str, data: bytes):
        try:
            img = decode_image(data)
            return key, {name: t(img) for name, t in self.transforms.items()}, None
        except Exception as e:  # a per-sample failure is data: keep the reason
            return key, None, f"decode: {type(e).__name__}: {e}"


def _collate(items):
    import torch

    keys = [k for k, _, _ in items]
    errors = {k: e for k, _, e in items if e is not None}
    ok = [t for _, t, e in items if e is None]
    inputs = {name: torch.stack([t[name] for t in ok]) for name in ok[0]} if ok else {}
    return keys, inputs, errors


def iter_decoded_batches(rows: list[dict], tar_path: Path, scorers, cfg):
    """Yield ``(rows, inputs, errors)`` batches; rows missing from the tar become errors."""
    import torch

    transforms: dict[str, Callable] = {}
    for s in scorers:
        transforms.update(getattr(s, "inputs", {}))
    by_key = {r["key"]: r for r in rows}
    workers = cfg.decode_workers

    loader = tud.DataLoader(TarImages(tar_path, list(by_key), transforms), batch_size=cfg.batch_size, num_workers=workers, collate_fn=_collate,
                            persistent_workers=False, prefetch_factor=4 if workers else None,
                            pin_memory=torch.cuda.is_available())
    seen: set[str] = set()
    for keys, inputs, errors in loader:
        seen.update(keys)
        yield [by_key[k] for k in keys], inputs, errors
    missing = [k for k in sorted(by_key) if k not in seen]
    if missing:
        yield [by_key[k] for k in missing], {}, {k: "decode: image missing from the download tar (truncated or damaged tar?)"
                                                  for k in missing}
