"""Opt-in JPEG decode on the GPU (``score.decode: gpu``): nvJPEG decode, resize, crop, normalise on the device.

DataLoader workers read the tar as in the other modes; a JPEG the device can take is handed over as its
raw bytes, and the scoring process decodes the batch with ``torchvision.io.decode_jpeg(list, device=...)``
(nvJPEG on CUDA), then builds each *tensor-able* input on the device, batched.

The rule for which inputs run on the device: an input whose transform is a torchvision ``Compose`` (or a
single transform) of ``Resize`` (bilinear or bicubic), ``CenterCrop``, RGB conversion, ``ToTensor`` and
``Normalize`` -- the CLIP preprocessing of open_clip and the watermark transform -- is tensor-able
(:func:`plan_of` reads it). Every other input (a function of the PIL image: the text detector's RGB array,
pHash's grayscale, NudeNet's letterbox) keeps getting the CPU-decoded ("exact") image, so a JPEG is
decoded twice only when such a scorer is configured.

Falls back to the CPU ``exact`` path, per image: non-JPEG members (PNG, WebP, ...), JPEGs that are not
YCbCr/RGB or grayscale (CMYK), that do not end with the EOI marker (truncated), that declare more than
:data:`~.decode.MAX_PIXELS`, and any JPEG the device decoder rejects. A fallback image's inputs equal
``exact`` bit for bit; an image the CPU cannot decode either is a per-sample error, as in ``exact``.

EXIF orientation is not applied (``apply_exif_orientation=False``), as in ``exact`` (see
:func:`.decode.decode_image`). Resizing follows Pillow: antialiased, horizontal pass, rounded to 8 bits,
vertical pass, rounded. Device inputs then differ from ``exact`` only by resampling rounding (Pillow
computes in fixed point, here in float32) and, on CUDA, nvJPEG's IDCT and chroma upsampling;
``bench/run.py`` (step ``decode_gpu``) measures the difference.

Without CUDA, ``gpu`` is refused (:func:`decode_device`); ``allow_cpu=True`` runs the very same code with
torchvision's CPU decoder, for tests and benchmarks.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from t2i_curate.pipeline.core.errors import UserError
from t2i_curate.pipeline.core.images import MAX_PIXELS, decode_image
from t2i_curate.pipeline.core.tars import IMAGE_SHA256, MISSING, image_sha256
from t2i_curate.pipeline.score.decode import TarImages, _stack

log = logging.getLogger(__name__)
JPEG_EOI = b"\xff\xd9"
_RESAMPLE = {"bilinear": "bilinear", "bicubic": "bicubic"}  # InterpolationMode.value -> F.interpolate mode


@dataclass(frozen=True)
class TensorPlan:
    """A transform as device ops: ``ops`` in order (``("resize", size, max_size, mode)``,
    ``("crop", (h, w))``) on the uint8 image, then /255 and ``(x - mean) / std`` when ``mean`` is set."""

    ops: tuple
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def _parts(transform) -> list:
    from torchvision import transforms as T  # noqa: N812 (torchvision convention)

    return list(transform.transforms) if isinstance(transform, T.Compose) else [transform]


def _is_rgb_convert(t) -> bool:
    """open_clip's ``MaybeConvertMode("RGB")`` or its older ``_convert_to_rgb``: a no-op on an RGB image."""
    if type(t).__name__ == "MaybeConvertMode":
        return getattr(t, "mode", None) == "RGB"
    return getattr(t, "__name__", "") == "_convert_to_rgb"


def plan_of(transform: Callable) -> TensorPlan | None:
    """The device plan of a transform of the decoded PIL image, or None when it is not tensor-able."""
    from torchvision import transforms as T  # noqa: N812

    ops: list = []
    parts = _parts(transform)
    for i, t in enumerate(parts):
        if isinstance(t, T.Resize) and t.interpolation.value in _RESAMPLE:
            size = (t.size,) if isinstance(t.size, int) else tuple(t.size)
            ops.append(("resize", size, t.max_size, _RESAMPLE[t.interpolation.value]))
        elif isinstance(t, T.CenterCrop):
            ops.append(("crop", tuple(t.size)))
        elif _is_rgb_convert(t):
            continue
        elif isinstance(t, T.ToTensor):  # MaybeToTensor too
            rest = parts[i + 1:]
            if not rest:
                return TensorPlan(tuple(ops))
            if len(rest) == 1 and isinstance(rest[0], T.Normalize):
                return TensorPlan(tuple(ops), tuple(map(float, rest[0].mean)), tuple(map(float, rest[0].std)))
            return None
        else:
            return None
    return None  # no ToTensor: the transform returns a PIL image or an array


def split_transforms(transforms: dict[str, Callable]) -> tuple[dict[str, TensorPlan], dict[str, Callable]]:
    """Inputs built on the device (name -> plan) and inputs built from the CPU image (name -> transform)."""
    plans, cpu = {}, {}
    for name, t in transforms.items():
        plan = plan_of(t)
        if plan is None:
            cpu[name] = t
        else:
            plans[name] = plan
    return plans, cpu


def decode_device(scfg, allow_cpu: bool = False) -> str:
    """The device ``score.decode: gpu`` decodes on: CUDA, else a UserError (``allow_cpu``: the CPU)."""
    import torch

    if scfg.device != "cpu" and torch.cuda.is_available():
        return "cuda"
    if allow_cpu:
        return "cpu"
    why = "score.device is 'cpu'" if scfg.device == "cpu" else "no CUDA device is visible"
    raise UserError(f"score.decode is 'gpu' (nvJPEG decode on a CUDA device) but {why}; set score.decode "
                    "to 'exact' or 'fast' on machines without a GPU")


def is_device_jpeg(data: bytes) -> bool:
    """A complete baseline/progressive JPEG in YCbCr/RGB or grayscale, within the pixel limit."""
    from PIL import Image, UnidentifiedImageError

    if data[:3] != b"\xff\xd8\xff" or data[-2:] != JPEG_EOI:
        return False
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
    except (OSError, UnidentifiedImageError, ValueError):
        return False  # the CPU path reports why
    return img.format == "JPEG" and img.mode in ("RGB", "L") and img.width * img.height <= MAX_PIXELS


def resized_size(h: int, w: int, size: tuple, max_size: int | None) -> tuple[int, int]:
    """Output (h, w) of torchvision's ``Resize(size, max_size=...)`` for an h x w image."""
    if len(size) == 2:
        return int(size[0]), int(size[1])
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = int(size[0]), int(size[0] * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _resize_like_pil(x, out: tuple[int, int], mode: str):
    """Antialiased resize as Pillow does it: horizontal pass, stored as uint8, then vertical pass."""
    import torch.nn.functional as F  # noqa: N812

    h, w = x.shape[-2:]
    for size in ((h, out[1]), out):
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True).round_().clamp_(0, 255)
    return x


def apply_plan(x, plan: TensorPlan):
    """uint8 images ``[N, 3, H, W]`` (one size, any device) -> float32 inputs as the PIL transform makes them."""
    import torch
    from torchvision.transforms import functional as TF  # noqa: N812

    x = x.float()
    for op in plan.ops:
        if op[0] == "resize":
            out = resized_size(x.shape[-2], x.shape[-1], op[1], op[2])
            if out != tuple(x.shape[-2:]):  # torchvision skips a resize to the same size
                x = _resize_like_pil(x, out, op[3])
        else:
            x = TF.center_crop(x, list(op[1]))
    x = x / 255
    if plan.mean is not None:
        mean = torch.tensor(plan.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(plan.std, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x


def apply_plans(images: list, plans: dict[str, TensorPlan]) -> dict[str, list]:
    """Each plan on each uint8 ``[3, H, W]`` image; images of one size go through as one batch."""
    import torch

    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    out: dict[str, list] = {name: [None] * len(images) for name in plans}
    for idx in groups.values():
        x = torch.stack([images[i] for i in idx])
        for name, plan in plans.items():
            for i, y in zip(idx, apply_plan(x, plan), strict=True):
                out[name][i] = y
    return out


def decode_jpegs(datas: list, device: str) -> list:
    """uint8 byte tensors -> RGB uint8 ``[3, H, W]`` on ``device``, or the exception, per image. One batched
    call; when it fails (one bad image fails the batch), each image alone."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    try:
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=False))
    except (RuntimeError, ValueError) as e:
        log.debug("batched decode_jpeg failed (%s); decoding one by one", e)
    out: list = []
    for d in datas:
        try:
            out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=False))
        except (RuntimeError, ValueError) as e:
            out.append(e)
    return out


class GpuTarImages(TarImages):
    """Iterates ``(key, payload | None, error | None)``: a JPEG the device can take as ``{"jpeg": bytes,
    "cpu": its CPU-only inputs}``, any other image as ``{"jpeg": None, "cpu": every input, built on the
    CPU}`` (the ``exact`` path)."""

    def __init__(self, tar_path: Path, keys: list[str], transforms: dict[str, Callable]):
        super().__init__(tar_path, keys, transforms, None)
        plans, cpu = split_transforms(transforms)
        self.on_device, self.cpu_names = bool(plans), list(cpu)

    def _one(self, key: str, data: bytes):
        if not (self.on_device and is_device_jpeg(data)):
            key, inputs, err = super()._one(key, data)
            return key, (None if err else {"jpeg": None, "cpu": inputs}), err
        try:
            cpu: dict[str, Any] = {IMAGE_SHA256: image_sha256(data)}
            if self.cpu_names:  # a scorer needs the PIL image: decode it on the CPU too
                img = decode_image(data)
                cpu = {name: self.transforms[name](img) for name in self.cpu_names}
            return key, {"jpeg": data, "cpu": cpu}, None
        except Exception as e:  # a per-sample failure is data: keep the reason
            return key, None, f"decode: {type(e).__name__}: {e}"


def _items(items: list) -> list:
    return items  # batches are assembled in the scoring process, after the device decode


class DeviceBatcher:
    """Turns a batch of :class:`GpuTarImages` items into ``(keys, inputs, errors)``, as
    :func:`.decode.iter_decoded_batches` yields them, with the tensor-able inputs stacked on ``device``."""

    def __init__(self, transforms: dict[str, Callable], device: str):
        self.transforms, self.device = transforms, device
        self.plans, cpu = split_transforms(transforms)
        self.cpu_names = list(cpu)

    def _fallback(self, data: bytes) -> dict[str, Any]:
        """The device decoder rejected it: the ``exact`` inputs, from the CPU decode."""
        img = decode_image(data)
        return {name: self.transforms[name](img) for name in self.plans}

    def _device_inputs(self, ok: list, errors: dict[str, str]) -> dict[str, dict[str, Any]]:
        """key -> tensor-able inputs, for the items of ``ok`` that decode (on the device or the CPU)."""
        import torch

        jpegs = [(k, p["jpeg"]) for k, p in ok if p["jpeg"] is not None]
        decoded = decode_jpegs([torch.frombuffer(bytearray(d), dtype=torch.uint8) for _, d in jpegs], self.device)
        good = [(k, im) for (k, _), im in zip(jpegs, decoded, strict=True) if not isinstance(im, Exception)]
        built = apply_plans([im for _, im in good], self.plans)
        out = {k: {name: built[name][j] for name in self.plans} for j, (k, _) in enumerate(good)}
        for (k, data), im in zip(jpegs, decoded, strict=True):
            if isinstance(im, Exception):
                log.debug("%s: device decoder rejected it (%s); CPU exact path", k, im)
                try:
                    out[k] = self._fallback(data)
                except Exception as e:  # a per-sample failure is data: keep the reason
                    errors[k] = f"decode: {type(e).__name__}: {e}"
        for k, p in ok:
            if p["jpeg"] is None:
                out[k] = {name: p["cpu"][name] for name in self.plans}
        return out

    def finish(self, items: list) -> tuple[list[str], dict[str, Any], dict[str, str]]:
        import torch

        keys = [k for k, _, _ in items]
        errors = {k: e for k, _, e in items if e is not None}
        ok = [(k, p) for k, p, e in items if e is None]
        dev = self._device_inputs(ok, errors)
        ok = [(k, p) for k, p in ok if k not in errors]
        inputs: dict[str, Any] = {}
        if ok:
            for name in self.plans:
                inputs[name] = torch.stack([dev[k][name].to(self.device) for k, _ in ok])
            for name in self.cpu_names:
                inputs[name] = _stack([p["cpu"][name] for _, p in ok])
            inputs[IMAGE_SHA256] = [p["cpu"].get(IMAGE_SHA256) for _, p in ok]
        return keys, inputs, errors


def iter_gpu_batches(rows: list[dict], tar_path: Path, transforms: dict[str, Callable], cfg,
                     device: str | None = None):
    """``score.decode: gpu``: yield ``(rows, inputs, errors)`` batches as :func:`.decode.iter_decoded_batches`
    does; ``device`` None: CUDA or a UserError (:func:`decode_device`)."""
    import torch.utils.data as tud

    device = device or decode_device(cfg)
    by_key = {r["key"]: r for r in rows}
    batcher = DeviceBatcher(transforms, device)
    workers = cfg.decode_workers
    loader = tud.DataLoader(GpuTarImages(tar_path, list(by_key), transforms), batch_size=cfg.batch_size,
                            num_workers=workers, collate_fn=_items, persistent_workers=False,
                            prefetch_factor=4 if workers else None)
    seen: set[str] = set()
    for items in loader:
        keys, inputs, errors = batcher.finish(items)
        seen.update(keys)
        yield [by_key[k] for k in keys], inputs, errors
    missing = [k for k in sorted(by_key) if k not in seen]
    if missing:
        yield [by_key[k] for k in missing], {}, {k: MISSING for k in missing}
