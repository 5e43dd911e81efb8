"""Decode each image of a shard once and build every declared input tensor from it.

A torch ``IterableDataset`` reads the tar (:mod:`.tars`), decodes each image in
full ("exact": the reference inputs) or with JPEG draft mode to the largest size
any model needs ("fast"), and applies each input's transform. With
``decode_workers > 0`` a DataLoader runs it in worker processes ahead of the
models. Samples that fail to decode come back as errors, never dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch.utils.data as tud

from t2i_curate.pipeline.core.images import decode_image
from t2i_curate.pipeline.core.io import as_path
from t2i_curate.pipeline.core.tars import IMAGE_EXTS, IMAGE_SHA256, MISSING, image_sha256, iter_members


class TarImages(tud.IterableDataset):
    """Iterates ``(key, tensors | None, error | None)`` for the wanted keys of one tar."""

    def __init__(self, tar_path: Path, keys: list[str], transforms: dict[str, Callable], draft: int | None = None):
        self.tar_path = as_path(tar_path)
        self.keys = set(keys)
        self.transforms = transforms
        self.draft = draft

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
        wi = tud.get_worker_info()
        n, i = (wi.num_workers, wi.id) if wi else (1, 0)
        # a truncated tar: what was read is scored, the rest is recorded as missing by the caller
        # in key order: each image's batch and position (and so its float rounding) do not depend on the
        # order the downloader wrote the tar in
        members = iter_members(self.tar_path, keys=self.keys, exts=IMAGE_EXTS, ordered=True)
        for j, (key, _, data) in enumerate(members):
            if j % n == i:
                yield self._one(key, data)

    def _one(self, key: str, data: bytes):
        try:
            img = decode_image(data, self.draft)
            return key, {**{name: t(img) for name, t in self.transforms.items()}, IMAGE_SHA256: image_sha256(data)}, None
        except Exception as e:  # a per-sample failure is data: keep the reason
            return key, None, f"decode: {type(e).__name__}: {e}"


def _collate(items):
    keys = [k for k, _, _ in items]
    errors = {k: e for k, _, e in items if e is not None}
    ok = [t for _, t, e in items if e is None]
    inputs = {name: _stack([t[name] for t in ok]) for name in ok[0]} if ok else {}
    return keys, inputs, errors


def _stack(values: list):
    """Tensors (same shape) are stacked; other inputs (e.g. arrays of each image's own size) stay a list."""
    import torch

    return torch.stack(values) if isinstance(values[0], torch.Tensor) else values


def iter_decoded_batches(rows: list[dict], tar_path: Path, transforms: dict[str, Callable], cfg,
                         draft: int | None = None):
    """Yield ``(rows, inputs, errors)`` batches; rows missing from the tar become errors."""
    import torch

    by_key = {r["key"]: r for r in rows}
    workers = cfg.decode_workers
    loader = tud.DataLoader(TarImages(tar_path, list(by_key), transforms, draft), batch_size=cfg.batch_size,
                            num_workers=workers, collate_fn=_collate, persistent_workers=False,
                            prefetch_factor=4 if workers else None, pin_memory=torch.cuda.is_available())
    seen: set[str] = set()
    for keys, inputs, errors in loader:
        seen.update(keys)
        yield [by_key[k] for k in keys], inputs, errors
    missing = [k for k in sorted(by_key) if k not in seen]
    if missing:
        yield [by_key[k] for k in missing], {}, {k: MISSING for k in missing}
