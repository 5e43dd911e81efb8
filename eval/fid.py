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

from t2i_curate.pipeline.core.errors import UserError
from t2i_curate.pipeline.core.layout import RunLayout

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


def reference_files(source: str, run_dir: Any, limit: int) -> tuple[str, list, list]:
    """What ``eval.reference`` names, as the reference reads it: ``(kind, files, identity)``.

    ``kind`` is ``run`` (the run's curated tars, ``run_dir`` local or on an object store), ``folder`` (the
    first ``limit`` image files of a local folder, by relative path) or ``tars`` (local tar files matching
    a glob). ``identity`` names each file's content for the reference cache key: for ``run``, each curated
    tar's name, size and mtime from one listing of ``selected/`` plus its sha256 as ``manifest.json``
    records it (a stale manifest after an interrupted write still changes the key: the tars' stamps do); for
    a folder, each image's relative path, size, mtime and ctime (ns; ctime also changes when a copy keeps
    the old mtime); for tars, each tar's path, size, mtime and ctime. A source that does not exist gives no
    files (:func:`iter_reference_images` refuses it)."""
    import glob

    from t2i_curate.pipeline.core.io import TMP_MARK, file_stats
    from t2i_curate.pipeline.core.tars import IMAGE_EXTS

    if source == "run":
        lay = RunLayout(run_dir)
        stats = file_stats(lay.selected)  # one listing (one LIST request on a store)
        names = sorted((n for n in stats if n.endswith(".tar") and n[:-4].isdigit() and not n.startswith(TMP_MARK)),
                       key=lambda n: int(n[:-4]))
        try:
            shas = {e["shard"]: e["sha256"] for e in json.loads(lay.manifest.read_text())["shards"]}
        except Exception:  # no manifest, or an unreadable one: the tars' stamps alone key them
            shas = {}
        return "run", [lay.selected / n for n in names], [[n, *stats[n], shas.get(n[:-4])] for n in names]

    def stamp(p: Path) -> list[int]:
        st = p.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]

    folder = Path(source)
    if folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTS and p.is_file())
        files = files[:limit]
        return "folder", files, [[p.relative_to(folder).as_posix(), *stamp(p)] for p in files]
    tars = sorted(Path(p) for p in glob.glob(source) if Path(p).is_file())
    return "tars", tars, [[str(p), *stamp(p)] for p in tars]


def iter_reference_images(source: str, run_dir: Any, limit: int,
                          listing: tuple | None = None) -> Iterator[tuple[str, Any]]:
    """``(id, PIL image)`` from the run's curated shards (``run_dir`` local or on an object store: its tars
    are read through fsspec), a local folder of images, or local tar files (``listing``: their
    :func:`reference_files`, when the caller has it). An image that does not decode is skipped
    with a warning (N counts the images used)."""
    from PIL import Image

    from t2i_curate.pipeline.core.images import decode_image
    from t2i_curate.pipeline.core.tars import IMAGE_EXTS, iter_members

    kind, files, _ = listing or reference_files(source, run_dir, limit)
    if kind == "run" and not files:
        from t2i_curate.pipeline.core.errors import StageOrderError

        raise StageOrderError(f"eval.reference=run: {run_dir}/selected has no curated shards; run `make filter` "
                              f"(or `curate run`) first, or set eval.reference to a folder of images")
    if kind == "folder":
        for p in files:
            try:
                with Image.open(p) as im:
                    img = im.convert("RGB")
            except Exception as e:  # any decode failure: this image is left out, said so
                log.warning("eval.reference: %s does not decode (%s: %s); left out", p, type(e).__name__, e)
                continue
            yield p.name, img
        return
    if not files:
        raise UserError(f"eval.reference {source!r}: expected 'run', a folder of images or a .tar glob; "
                        f"no such folder and no tar files match")
    n = 0
    for t in files:
        for key, _, data in iter_members(t, exts=IMAGE_EXTS):
            try:
                img = decode_image(data)  # full decode, as the other sources
            except Exception as e:  # any decode failure: this image is left out, said so
                log.warning("eval.reference: %s in %s does not decode (%s: %s); left out", key, t,
                            type(e).__name__, e)
                continue
            yield key, img
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

    from t2i_curate.pipeline.core.io import sha256_file

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
            from t2i_curate.pipeline.core.weights import WeightsMissingError

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


def feature_weights(ecfg, mcfg, spec: dict) -> str:
    """The feature extractor's weights: ``tiny``, or the sha256 of the CLIP checkpoint or Inception file
    (hashed once per process while the file's size and mtime stay the same)."""
    from t2i_curate.pipeline.core.weights import weight_digest

    if spec["feature"].startswith("clip:tiny:"):
        return "tiny"
    if spec["feature"].startswith("clip:"):
        from t2i_curate.pipeline.core.weights import clip_checkpoint

        return weight_digest(Path(clip_checkpoint(ecfg.feature_clip, mcfg)))
    return weight_digest(Path(ecfg.inception_weights))


def reference_cache_covers(source: str, run_dir: Any, spec: dict, limit: int, weights: str | None = None,
                           identity: tuple | None = None) -> dict[str, Any]:
    """Everything the reference statistics depend on: the reference files (:func:`reference_files`: names
    with sizes and mtimes, or sha256s), ``eval.max_reference``, the features (name and weights' sha256, or
    tiny), the protocol and how images are decoded and resized, and the library versions."""
    import torch
    import torchmetrics

    kind, _, ident = identity or reference_files(source, run_dir, limit)
    return {"reference": {"source": source, "kind": kind, "files": ident}, "max_reference": limit,
            "feature": spec["feature"], "feature_weights": weights, "protocol": spec["protocol"],
            "resize": resize_protocol(spec), "spec": spec, "torchmetrics": torchmetrics.__version__,
            "torch": torch.__version__}


def cache_key(covers: dict) -> str:
    blob = json.dumps(covers, sort_keys=True, default=str)  # ensure_ascii: any file name encodes
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def reference_cache_key(source: str, run_dir: Any, spec: dict, limit: int, weights: str | None = None) -> str:
    """The reference cache key (16 hex digits of the sha256 of :func:`reference_cache_covers`)."""
    return cache_key(reference_cache_covers(source, run_dir, spec, limit, weights))


def _describe(covers: dict) -> str:
    """What a cache key covers, in one line for the log."""
    ref = covers["reference"]
    files = ref["files"]
    what = {"run": "curated tars (name, size, mtime, manifest sha256)", "folder": "images (path, size, mtime, ctime)",
            "tars": "tar files (path, size, mtime, ctime)"}[ref["kind"]]
    return (f"{len(files)} {what} of {ref['source']}, max_reference {covers['max_reference']}, features "
            f"{covers['feature']} (weights {str(covers['feature_weights'])[:16]}), protocol {covers['protocol']}, "
            f"torchmetrics {covers['torchmetrics']}")


def _reference_features(fid, kid, ecfg, run_dir: Any, cache: Path, covers: dict | None = None,
                        listing: tuple | None = None) -> int:
    """Reference statistics into ``fid`` and ``kid``: from the cache, or computed and cached. Returns N.
    The cache file also holds what its key covers; a file whose record differs is not used."""
    import torch

    key = cache.stem.removeprefix("reference-")
    state = None
    if cache.exists():
        state = torch.load(cache, map_location="cpu", weights_only=True)
        if covers is not None and state.get("covers") != json.dumps(covers, sort_keys=True, default=str):
            log.warning("reference cache %s was made from other inputs; computing again", cache.name)
            state = None
    if state is not None:
        fid.real_features_sum = state["fid_sum"]
        fid.real_features_cov_sum = state["fid_cov_sum"]
        fid.real_features_num_samples = state["fid_n"]
        kid.real_features = [state["kid_features"]]
        log.info("reference statistics from cache %s (key %s, N=%d: %s)", cache.name, key, int(state["fid_n"]),
                 _describe(covers) if covers else "")
        return int(state["fid_n"])
    from tqdm import tqdm

    if covers:
        log.info("reference statistics: computing (key %s: %s)", key, _describe(covers))
    n_ref = 0
    images = iter_reference_images(ecfg.reference, run_dir, ecfg.max_reference, listing=listing)
    for batch in tqdm(_batches(images, 32), desc="reference features", unit="batch"):
        n_ref += update_metrics([fid, kid], (img for _, img in batch), ecfg.fid_protocol, real=True)
    if n_ref < 2:
        raise UserError(f"eval.reference: expected at least 2 reference images, found {n_ref}")
    from t2i_curate.pipeline.core.io import atomic_path

    with atomic_path(cache) as tmp:
        torch.save({"fid_sum": fid.real_features_sum, "fid_cov_sum": fid.real_features_cov_sum,
                    "fid_n": fid.real_features_num_samples, "kid_features": torch.cat(kid.real_features),
                    "protocol": ecfg.fid_protocol,
                    "covers": json.dumps(covers, sort_keys=True, default=str) if covers else ""}, tmp)
    return n_ref


def fid_kid(ecfg, mcfg, tiny: bool, run_dir: Any, generated: list, cache_dir: Path) -> dict[str, Any]:
    """FID and KID of ``generated`` (image paths, or PIL images) against the reference set, with the
    protocol. ``run_dir`` may be on an object store; ``cache_dir`` is local (torch.load / torch.save).
    Paths are opened 32 at a time and dropped after their features are taken."""
    spec = feature_spec(ecfg, tiny)
    weights = feature_weights(ecfg, mcfg, spec)
    identity = reference_files(ecfg.reference, run_dir, ecfg.max_reference)
    covers = reference_cache_covers(ecfg.reference, run_dir, spec, ecfg.max_reference, weights, identity)
    fid, kid = build_fid_kid(ecfg, mcfg, tiny, n_min=len(generated))
    n_ref = _reference_features(fid, kid, ecfg, run_dir, cache_dir / f"reference-{cache_key(covers)}.pt", covers,
                                listing=identity)
    for batch in _batches(generated, 32):
        update_metrics([fid, kid], batch, ecfg.fid_protocol, real=False)
    n_kid = min(n_ref, len(generated))
    kid.subset_size = max(2, min(kid.subset_size, n_kid))
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "protocol": protocol(spec, n_ref, len(generated)), "feature_weights": weights}
