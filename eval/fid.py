"""FID and KID (torchmetrics): reference images, feature extractors, protocols, reference cache.

FID and KID run on uint8 images, centre-cropped to a square and resized to
299 px once (bicubic, rounded). Features come from torch-fidelity's Inception
when its weights file is given, otherwise from a CLIP image encoder; the
``protocol`` dict recorded with every score names which, with N, versions and
the resize, and :func:`check_comparable` refuses to compare different ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from t2i_curate.pipeline.errors import UserError
from t2i_curate.pipeline.io import shard_ids
from t2i_curate.pipeline.layout import RunLayout

log = logging.getLogger(__name__)

FID_SIZE = 299


class ProtocolMismatchError(UserError):
    pass


# --- images for FID / KID -----------------------------------------------------------------------


def to_fid_uint8(img) -> Any:
    """PIL image -> uint8 CHW tensor: centre square crop, bicubic resize to 299, rounded once."""
    import numpy as np
    import torch
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    img = img.resize((FID_SIZE, FID_SIZE), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def iter_reference_images(source: str, run_dir: Path, limit: int) -> Iterator[tuple[str, Any]]:
    """``(id, PIL image)`` from the run's curated shards, a folder of images, or tar files."""
    import glob

    from PIL import Image

    from t2i_curate.pipeline.decode import decode_image
    from t2i_curate.pipeline.tars import IMAGE_EXTS, iter_members

    if source == "run":
        lay = RunLayout(run_dir)
        tars = [lay.selected_tar(i) for i in shard_ids(lay.selected, ".tar")]
        if not tars:
            from t2i_curate.pipeline.selection import StageOrderError

            raise StageOrderError(f"eval.reference=run: {run_dir}/selected has no curated shards; run `make filter` "
                                  f"(or `curate run`) first, or set eval.reference to a folder of images")
    elif Path(source).is_dir():
        tars = []
        files = sorted(p for p in Path(source).rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS)
        for n, p in enumerate(files):
            if n >= limit:
                return
            yield p.name, Image.open(p).convert("RGB")
        return
    else:
        tars = sorted(Path(p) for p in glob.glob(source))
        if not tars:
            raise UserError(f"eval.reference {source!r}: expected 'run', a folder of images or a .tar glob; "
                            f"no such folder and no tar files match")
    n = 0
    for t in tars:
        for key, _, data in iter_members(t, exts=IMAGE_EXTS):
            yield key, decode_image(data)  # full decode, as the other sources
            n += 1
            if n >= limit:
                return


# --- feature extractors ---------------------------------------------------------------------------


def clip_feature_module(bundle):
    """A torchmetrics-compatible extractor: uint8 (N,3,H,W) -> CLIP image features (N, d)."""
    import torch
    import torch.nn as nn

    from t2i_curate.filters.clip import OPENAI_MEAN, OPENAI_STD

    class ClipFeatures(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = bundle.model
            self.num_features = int(bundle.embed_dim)
            self.register_buffer("mean", torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(OPENAI_STD).view(1, 3, 1, 1))

        @torch.inference_mode()
        def forward(self, x):
            x = x.float() / 255.0
            x = nn.functional.interpolate(x, size=(224, 224), mode="bicubic", antialias=True, align_corners=False)
            return self.model.encode_image((x - self.mean) / self.std).float()

    return ClipFeatures().eval()


def feature_spec(ecfg, tiny: bool) -> dict[str, Any]:
    if ecfg.inception_weights:
        if not Path(ecfg.inception_weights).is_file():
            from t2i_curate.pipeline.weights import WeightsMissingError

            raise WeightsMissingError(f"eval.inception_weights: {ecfg.inception_weights} does not exist")
        return {"feature": "inception-v3 (torch-fidelity 2015-12-05, pool3 2048)", "antialias": ecfg.fid_antialias}
    name = ("tiny:" if tiny else "") + ecfg.feature_clip
    return {"feature": f"clip:{name}", "antialias": True}


def resize_protocol(spec: dict) -> str:
    """How images reach the feature extractor; part of every protocol and of the reference cache key."""
    return (f"full decode, centre-crop square, PIL bicubic {FID_SIZE}px, uint8 (ours); "
            f"then the extractor's own resize (antialias={spec['antialias']})")


def protocol(spec: dict, n_ref: int, n_gen: int) -> dict[str, Any]:
    import torch
    import torchmetrics

    return {"library": "torchmetrics", "torchmetrics": torchmetrics.__version__, "torch": torch.__version__,
            "feature": spec["feature"], "resize": resize_protocol(spec),
            "n_reference": n_ref, "n_generated": n_gen}


def check_comparable(a: dict, b: dict) -> None:
    """Refuse to compare two FID/KID protocols that differ in anything but N."""
    keys = ("library", "torchmetrics", "feature", "resize")
    diff = {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}
    if diff:
        raise ProtocolMismatchError(f"FID/KID computed differently, not comparable: {diff}")


def build_fid_kid(ecfg, mcfg, tiny: bool, n_min: int):
    """torchmetrics FID and KID sharing one feature extractor."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    subset = max(2, min(1000, n_min))
    if ecfg.inception_weights:
        fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=ecfg.inception_weights,
                                       antialias=ecfg.fid_antialias, reset_real_features=False)
        kid = KernelInceptionDistance(feature=fid.inception, subsets=50, subset_size=subset,
                                      reset_real_features=False)
        return fid, kid
    from t2i_curate.filters.clip import load_clip, tiny_clip

    bundle = tiny_clip(ecfg.feature_clip) if tiny else load_clip(ecfg.feature_clip, mcfg)
    module = clip_feature_module(bundle)
    fid = FrechetInceptionDistance(feature=module, reset_real_features=False)
    kid = KernelInceptionDistance(feature=module, subsets=50, subset_size=subset, reset_real_features=False)
    return fid, kid


def _batches(items: Iterable, size: int):
    batch = []
    for x in items:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def reference_cache_key(source: str, run_dir: Path, spec: dict, limit: int) -> str:
    """Keyed by what the reference statistics depend on: the images, their number, the features,
    and how images are decoded and resized before the features."""
    import torchmetrics

    if source == "run":
        manifest = RunLayout(run_dir).manifest
        ident = json.loads(manifest.read_text())["shards"] if manifest.exists() else []
    else:
        ident = source
    blob = json.dumps({"ref": ident, "limit": limit, "spec": spec, "resize": resize_protocol(spec),
                       "tm": torchmetrics.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fid_kid(ecfg, mcfg, tiny: bool, run_dir: Path, generated: list, cache_dir: Path) -> dict[str, Any]:
    """FID and KID of ``generated`` (PIL images) against the reference set, with the protocol."""
    import torch

    spec = feature_spec(ecfg, tiny)
    key = reference_cache_key(ecfg.reference, run_dir, spec, ecfg.max_reference)
    cache = cache_dir / f"reference-{key}.pt"
    fid, kid = build_fid_kid(ecfg, mcfg, tiny, n_min=len(generated))
    if cache.exists():
        state = torch.load(cache, map_location="cpu", weights_only=True)
        fid.real_features_sum = state["fid_sum"]
        fid.real_features_cov_sum = state["fid_cov_sum"]
        fid.real_features_num_samples = state["fid_n"]
        kid.real_features = [state["kid_features"]]
        n_ref = int(state["fid_n"])
        log.info("reference statistics from cache %s (N=%d)", cache.name, n_ref)
    else:
        n_ref = 0
        from tqdm import tqdm

        for batch in tqdm(_batches(iter_reference_images(ecfg.reference, run_dir, ecfg.max_reference), 32),
                          desc="reference features", unit="batch"):
            x = torch.stack([to_fid_uint8(img) for _, img in batch])
            fid.update(x, real=True)
            kid.update(x, real=True)
            n_ref += len(batch)
        if n_ref < 2:
            raise UserError(f"eval.reference: expected at least 2 reference images, found {n_ref}")
        from t2i_curate.pipeline.io import atomic_path

        with atomic_path(cache) as tmp:
            torch.save({"fid_sum": fid.real_features_sum, "fid_cov_sum": fid.real_features_cov_sum,
                        "fid_n": fid.real_features_num_samples,
                        "kid_features": torch.cat(kid.real_features), "spec": json.dumps(spec)}, tmp)
    for batch in _batches(generated, 32):
        x = torch.stack([to_fid_uint8(img) for img in batch])
        fid.update(x, real=False)
        kid.update(x, real=False)
    n_kid = min(n_ref, len(generated))
    kid.subset_size = max(2, min(kid.subset_size, n_kid))
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "protocol": protocol(spec, n_ref, len(generated))}
