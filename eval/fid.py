"""FID and KID (torchmetrics): reference images, feature extractors, protocols, reference cache.

How images reach the feature extractor is a named protocol (``eval.fid_protocol``):

- ``torch-fidelity`` (default; pytorch-fid / torch-fidelity compatible): RGB uint8 at its own size, no
  crop; the network resizes to 299 itself (TensorFlow-1.x bilinear, no antialias).
- ``clean`` (clean-fid ``mode="clean"``): no crop; each channel resized to 299 with PIL bicubic in
  float32, not quantised; the network gets those floats.
- ``legacy-crop`` (this project before protocols): centre square crop, PIL bicubic to 299, uint8.

Features come from torch-fidelity's Inception when its weights file is given, otherwise from a CLIP
image encoder (which then resizes to 224 itself); the ``protocol`` dict recorded with every score names
the protocol, the features, N and versions, and :func:`check_comparable` refuses to compare different ones.
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
PROTOCOLS = ("torch-fidelity", "clean", "legacy-crop")
_PREPROCESS = {
    "torch-fidelity": "full decode, RGB uint8 at its own size, no crop, no resize by us (torch-fidelity / pytorch-fid)",
    "clean": f"full decode, RGB uint8, no crop; each channel PIL bicubic to {FID_SIZE}px in float32, "
             f"not quantised (clean-fid mode=clean)",
    "legacy-crop": f"full decode, centre-crop square, PIL bicubic {FID_SIZE}px, uint8 (ours before protocols)",
}


class ProtocolMismatchError(UserError):
    pass


# --- images for FID / KID -----------------------------------------------------------------------


def to_fid_uint8(img) -> Any:
    """PIL image -> uint8 CHW tensor: centre square crop, bicubic resize to 299, rounded once (legacy-crop)."""
    import numpy as np
    import torch
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    img = img.resize((FID_SIZE, FID_SIZE), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def to_clean_float(img) -> Any:
    """PIL image -> float32 CHW tensor in [0, 255]: each channel resized to 299 with PIL bicubic in
    float mode, clipped, not quantised (clean-fid's ``make_resizer("PIL", False, "bicubic", (299, 299))``)."""
    import numpy as np
    import torch
    from PIL import Image

    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    chans = [np.asarray(Image.fromarray(arr[:, :, c].astype(np.float32), mode="F")
                        .resize((FID_SIZE, FID_SIZE), resample=Image.BICUBIC)).clip(0, 255) for c in range(3)]
    return torch.from_numpy(np.stack(chans).astype(np.float32))


def fid_input(img, protocol_name: str) -> Any:
    """One PIL image as the protocol feeds it to the feature extractor (CHW tensor)."""
    import numpy as np
    import torch

    if protocol_name == "legacy-crop":
        return to_fid_uint8(img)
    if protocol_name == "clean":
        return to_clean_float(img)
    if protocol_name == "torch-fidelity":
        return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
    raise UserError(f"eval.fid_protocol {protocol_name!r}: expected one of {', '.join(PROTOCOLS)}")


def update_metrics(metrics: list, images: Iterable, protocol_name: str, real: bool) -> int:
    """Feed PIL images (or paths) to the metrics, prepared by the protocol; images of one size go in
    one batch (an image's features do not depend on its batch). Returns the number fed."""
    import torch
    from PIL import Image

    groups: dict[tuple, list] = {}
    n = 0
    for img in images:
        if isinstance(img, (str, Path)):
            with Image.open(img) as im:
                img = im.convert("RGB")
        t = fid_input(img, protocol_name)
        groups.setdefault(tuple(t.shape), []).append(t)
        n += 1
    for ts in groups.values():
        x = torch.stack(ts)
        for m in metrics:
            m.update(x, real=real)
    return n


def iter_reference_images(source: str, run_dir: Any, limit: int) -> Iterator[tuple[str, Any]]:
    """``(id, PIL image)`` from the run's curated shards (``run_dir`` local or on an object store: its tars
    are read through fsspec), a local folder of images, or local tar files."""
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


_POOL3_LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                 "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                 "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")


def inception_pool3_299(weights_path: str):
    """torch-fidelity's Inception (weights from ``weights_path``) taking images already at 299 px, uint8 or
    float in [0, 255], with no resize of its own: pool3 features (N, 2048). This is what clean-fid's
    ``InceptionV3W(resize_inside=False)`` does: ``(x - 128) / 128``, then the network."""
    import torch
    import torch.nn as nn
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                             feature_extractor_weights_path=weights_path, antialias=False)

    class Pool3(nn.Module):
        num_features = 2048

        def __init__(self):
            super().__init__()
            self.net = net

        @torch.inference_mode()
        def forward(self, x):
            if x.shape[-2:] != (FID_SIZE, FID_SIZE):
                raise ValueError(f"expected images resized to {FID_SIZE}px, got {tuple(x.shape)}")
            x = (x.float() - 128) / 128
            for name in _POOL3_LAYERS:
                x = getattr(self.net, name)(x)
            return torch.flatten(x, 1)

    return Pool3().eval()


INCEPTION_SHA256_PREFIX = "6726825d"  # torch-fidelity's file name carries its sha256's first 8 hex digits


def inception_label(path: Path) -> str:
    """What the Inception weights file is, from its content: the torch-fidelity release only when its
    sha256 matches the release's, else the file's own digest. The file must load as plain tensors
    (torch-fidelity itself loads it with ``weights_only=False``, so nothing else is handed to it)."""
    import torch

    from t2i_curate.pipeline.io import sha256_file

    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that is not plain tensors never reaches torch-fidelity's loader
        raise UserError(f"eval.inception_weights: {path} does not load as plain tensors "
                        f"(weights_only=True): {type(e).__name__}: {e}") from None
    digest = sha256_file(path)
    if digest.startswith(INCEPTION_SHA256_PREFIX):
        return "inception-v3 (torch-fidelity 2015-12-05, pool3 2048)"
    return f"inception-v3 architecture, weights {path.name} sha256 {digest[:16]} (not the torch-fidelity release)"


def feature_spec(ecfg, tiny: bool) -> dict[str, Any]:
    """What the features are and which protocol prepares the images: part of the protocol and cache key."""
    proto = ecfg.fid_protocol
    if ecfg.inception_weights:
        if not Path(ecfg.inception_weights).is_file():
            from t2i_curate.pipeline.weights import WeightsMissingError

            raise WeightsMissingError(f"eval.inception_weights: {ecfg.inception_weights} does not exist")
        net = ("none (images are 299 px already)" if proto == "clean" else
               "the network's own resize to 299 (TensorFlow-1.x bilinear, no antialias)")
        return {"feature": inception_label(Path(ecfg.inception_weights)), "protocol": proto,
                "network_resize": net}
    name = ("tiny:" if tiny else "") + ecfg.feature_clip
    return {"feature": f"clip:{name}", "protocol": proto,
            "network_resize": "CLIP's own resize to 224 (bicubic, antialias), OpenAI mean/std"}


def resize_protocol(spec: dict) -> str:
    """How images reach the features; part of every protocol and of the reference cache key."""
    return f"{spec['protocol']}: {_PREPROCESS[spec['protocol']]}; then {spec['network_resize']}"


def protocol(spec: dict, n_ref: int, n_gen: int) -> dict[str, Any]:
    import torch
    import torchmetrics

    return {"library": "torchmetrics", "torchmetrics": torchmetrics.__version__, "torch": torch.__version__,
            "protocol": spec["protocol"], "feature": spec["feature"], "resize": resize_protocol(spec),
            "n_reference": n_ref, "n_generated": n_gen}


def check_comparable(a: dict, b: dict) -> None:
    """Refuse to compare two FID/KID protocols that differ in anything but N (a score without a
    protocol name, from before protocols, compares with none that has one)."""
    keys = ("protocol", "library", "torchmetrics", "feature", "resize")
    diff = {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)}
    if diff:
        raise ProtocolMismatchError(f"FID/KID computed differently, not comparable: {diff}")


def build_fid_kid(ecfg, mcfg, tiny: bool, n_min: int):
    """torchmetrics FID and KID sharing one feature extractor, as ``eval.fid_protocol`` needs it."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    subset = max(2, min(1000, n_min))
    if ecfg.inception_weights and ecfg.fid_protocol == "clean":
        module = inception_pool3_299(ecfg.inception_weights)
    elif ecfg.inception_weights:  # uint8 at any size; the network's TF-1.x bilinear resize (as torch-fidelity)
        fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=ecfg.inception_weights,
                                       antialias=False, reset_real_features=False)
        kid = KernelInceptionDistance(feature=fid.inception, subsets=50, subset_size=subset,
                                      reset_real_features=False)
        return fid, kid
    else:
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


def reference_cache_key(source: str, run_dir: Any, spec: dict, limit: int) -> str:
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


def _reference_features(fid, kid, ecfg, run_dir: Any, cache: Path) -> int:
    """Reference statistics into ``fid`` and ``kid``: from the cache, or computed and cached. Returns N."""
    import torch

    if cache.exists():
        state = torch.load(cache, map_location="cpu", weights_only=True)
        fid.real_features_sum = state["fid_sum"]
        fid.real_features_cov_sum = state["fid_cov_sum"]
        fid.real_features_num_samples = state["fid_n"]
        kid.real_features = [state["kid_features"]]
        log.info("reference statistics from cache %s (N=%d)", cache.name, int(state["fid_n"]))
        return int(state["fid_n"])
    from tqdm import tqdm

    n_ref = 0
    for batch in tqdm(_batches(iter_reference_images(ecfg.reference, run_dir, ecfg.max_reference), 32),
                      desc="reference features", unit="batch"):
        n_ref += update_metrics([fid, kid], (img for _, img in batch), ecfg.fid_protocol, real=True)
    if n_ref < 2:
        raise UserError(f"eval.reference: expected at least 2 reference images, found {n_ref}")
    from t2i_curate.pipeline.io import atomic_path

    with atomic_path(cache) as tmp:
        torch.save({"fid_sum": fid.real_features_sum, "fid_cov_sum": fid.real_features_cov_sum,
                    "fid_n": fid.real_features_num_samples, "kid_features": torch.cat(kid.real_features),
                    "protocol": ecfg.fid_protocol}, tmp)
    return n_ref


def fid_kid(ecfg, mcfg, tiny: bool, run_dir: Any, generated: list, cache_dir: Path) -> dict[str, Any]:
    """FID and KID of ``generated`` (image paths, or PIL images) against the reference set, with the
    protocol. ``run_dir`` may be on an object store; ``cache_dir`` is local (torch.load / torch.save).
    Paths are opened 32 at a time and dropped after their features are taken."""
    spec = feature_spec(ecfg, tiny)
    key = reference_cache_key(ecfg.reference, run_dir, spec, ecfg.max_reference)
    fid, kid = build_fid_kid(ecfg, mcfg, tiny, n_min=len(generated))
    n_ref = _reference_features(fid, kid, ecfg, run_dir, cache_dir / f"reference-{key}.pt")
    for batch in _batches(generated, 32):
        update_metrics([fid, kid], batch, ecfg.fid_protocol, real=False)
    n_kid = min(n_ref, len(generated))
    kid.subset_size = max(2, min(kid.subset_size, n_kid))
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "protocol": protocol(spec, n_ref, len(generated))}
