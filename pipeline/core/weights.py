"""The weight registry: where a real model's weight file lies, and whether it is the right one.

A weight resolves to a local path from ``score.models.local_weights``, else the
cache (``score.models.cache_dir`` / ``$CURATE_WEIGHTS`` / ``~/.cache/t2i-curate``;
for open_clip checkpoints also the Hugging Face cache), else -- only in ``curate
weights`` -- a download, checked against its sha256. Nothing downloads at import
time or while scoring: a missing weight raises :class:`WeightsMissingError` at
once, naming the file and how to provide it. Which files a run needs is declared
by each scorer (``filters/``) and each eval model.
"""

from __future__ import annotations

import functools
import logging
import os
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from t2i_curate.pipeline.core.config import ModelsConfig
from t2i_curate.pipeline.core.errors import UserError
from t2i_curate.pipeline.core.io import atomic_path, sha256_file

log = logging.getLogger(__name__)


class WeightsMissingError(UserError):
    """A real model's weights are not on this machine."""


class WeightsMismatchError(UserError):
    """A weight file's sha256 is not the pinned one."""


@dataclass(frozen=True)
class WeightFile:
    name: str  # the key for score.models.local_weights
    filename: str
    url: str | None  # None: no public download (e.g. our conversion of an upstream file)
    sha256: str | None  # None: unknown upstream; recorded on first download and pinned
    origin: str = ""  # where a file without a url comes from (said when it is missing)
    # a file `curate weights` builds (no url): from the downloadable ``built_from``, by
    # ``build(source_path, destination_path)``
    built_from: WeightFile | None = None
    build: Callable[[Path, Path], None] | None = None
    also_accept: tuple[str, ...] = ()  # other sha256 of the same weights (e.g. a copy with extra tensors)


def cache_dir(mcfg: ModelsConfig) -> Path:
    d = mcfg.cache_dir or os.environ.get("CURATE_WEIGHTS") or "~/.cache/t2i-curate"
    return Path(os.path.expanduser(d))


def _how_to_provide(name: str, path: Path) -> str:
    return (f"expected {path}. Run `make weights` (or `curate weights --config <your config>`) on a "
            f"machine with internet, or point at a local copy with "
            f"`--set \"score.models.local_weights={{{name}: /path/to/file}}\"`, or set "
            f"score.models.cache_dir / $CURATE_WEIGHTS to where the file lies")


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def weight_digest(path: Path) -> str:
    """sha256 of a weight file, hashed once per process while its size and mtime stay the same
    (preflight, loading and provenance all ask for it)."""
    st = Path(path).stat()
    return _digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def verify(path: Path, wf: WeightFile, mcfg: ModelsConfig) -> str:
    """Check ``path`` against the known sha256, or the one pinned at first download."""
    digest = weight_digest(path)
    pinned = wf.sha256
    pin_file = cache_dir(mcfg) / f"{wf.filename}.sha256"
    if pinned is None and pin_file.exists():
        pinned = pin_file.read_text().split()[0]
    if pinned is not None and digest != pinned and digest not in wf.also_accept:
        also = f" (or {', '.join(wf.also_accept)})" if wf.also_accept else ""
        raise WeightsMismatchError(f"{path}: sha256 {digest} but {wf.name} is pinned to {pinned}{also}")
    return digest


def resolve_weight(wf: WeightFile, mcfg: ModelsConfig, allow_download: bool = False) -> Path:
    """The local path of a weight file; downloads only when ``allow_download``."""
    local = mcfg.local_weights.get(wf.name)
    if local:
        p = Path(os.path.expanduser(local))
        if not p.is_file():
            raise WeightsMissingError(f"score.models.local_weights.{wf.name}: {p} does not exist")
        verify(p, wf, mcfg)
        return p
    p = cache_dir(mcfg) / wf.filename
    if not p.is_file():
        if wf.build is not None and wf.built_from is not None:
            raise WeightsMissingError(
                f"weights for {wf.name} are missing ({p}): {wf.filename} is {wf.origin}; `curate weights` "
                f"builds it from {wf.built_from.filename} (downloaded, or named with `--set "
                f"\"score.models.local_weights={{{wf.built_from.name}: /path/to/{wf.built_from.filename}}}\"`"
                f"), or pass the file itself with "
                f"`--set \"score.models.local_weights={{{wf.name}: /path/to/{wf.filename}}}\"`")
        if wf.url is None:  # no download exists: `make weights` would not help either
            raise WeightsMissingError(
                f"weights for {wf.name} are missing ({p}): {wf.filename} is "
                f"{wf.origin or 'not downloadable'}, which `curate weights` cannot build yet; pass it with "
                f"`--set \"score.models.local_weights={{{wf.name}: /path/to/{wf.filename}}}\"` "
                f"or put it in {p.parent}")
        if not allow_download:
            raise WeightsMissingError(f"weights for {wf.name} are missing: " + _how_to_provide(wf.name, p))
        download(wf.url, p)
        if wf.sha256 is None:  # unknown upstream: pin what we got
            digest = sha256_file(p)
            (p.parent / f"{wf.filename}.sha256").write_text(f"{digest}  {wf.filename}\n")
            log.info("%s: recorded sha256 %s (pinned for later loads)", wf.filename, digest)
    verify(p, wf, mcfg)
    return p


def download(url: str, dest: Path, timeout: float = 60.0) -> None:
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s", url)
    with urllib.request.urlopen(url, timeout=timeout) as r, atomic_path(dest) as tmp:  # noqa: S310 (fixed https URLs)
        total = int(r.headers.get("Content-Length") or 0) or None
        with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))


def split_clip_name(name: str) -> tuple[str, str]:
    if "/" not in name:
        raise UserError(f"CLIP model name {name!r}: expected 'ARCH/PRETRAINED', e.g. 'ViT-L-14/openai'")
    arch, tag = name.split("/", 1)
    return arch, tag


def clip_checkpoint(name: str, mcfg: ModelsConfig, allow_download: bool = False) -> str:
    """Local path of an open_clip checkpoint (cache or local_weights); never downloads unless asked."""
    import open_clip
    from open_clip import pretrained as ocp

    local = mcfg.local_weights.get(name)
    if local:
        p = Path(os.path.expanduser(local))
        if not p.is_file():
            raise WeightsMissingError(f"score.models.local_weights.{name}: {p} does not exist")
        return str(p)
    arch, tag = split_clip_name(name)
    pcfg = ocp.get_pretrained_cfg(arch, tag)
    if not pcfg:
        known = ", ".join(f"{a}/{t}" for a, t in open_clip.list_pretrained()[:8])
        raise UserError(f"unknown open_clip model {name!r}; e.g. {known}, ...")
    hf_cache = cache_dir(mcfg) / "open_clip"
    hub = pcfg.get("hf_hub", "")
    model_id, fname = os.path.split(hub)  # "org/repo/" -> ("org/repo", ""): default file names
    candidates = [fname] if fname else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    if hub:
        from huggingface_hub import try_to_load_from_cache

        # our cache first, then the Hugging Face default (HF_HUB_CACHE / HF_HOME), where open_clip
        # users already have their checkpoints
        for where, c in ((w, c) for w in (str(hf_cache), None) for c in candidates):
            hit = try_to_load_from_cache(model_id, c, cache_dir=where)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
    if allow_download:
        return ocp.download_pretrained(pcfg, cache_dir=str(hf_cache))
    where = hf_cache / f"models--{model_id.replace('/', '--')}" if hub else hf_cache
    raise WeightsMissingError(f"weights for CLIP {name} are missing: " + _how_to_provide(name, where))


def fetch_all(mcfg: ModelsConfig, clip_names: list[str], files: list[WeightFile]) -> dict[str, str]:
    """Download every listed weight into the cache (``curate weights``); return name -> path."""
    out = {}
    for n in clip_names:
        out[n] = clip_checkpoint(n, mcfg, allow_download=True)
    # downloadable files first, then the ones built from them; a missing file with neither a URL nor a
    # build stops here with how to provide it
    for wf in sorted(files, key=lambda w: (w.url is None, w.build is None)):
        built = wf.build is not None
        out[wf.name] = str(build_weight(wf, mcfg) if built else resolve_weight(wf, mcfg, allow_download=True))
    return out


def build_weight(wf: WeightFile, mcfg: ModelsConfig) -> Path:
    """A built weight file (``wf.build``): the cached or local copy when it is there, else built into the
    cache from ``wf.built_from`` (downloaded when missing) and checked before it takes its place."""
    if wf.name in mcfg.local_weights or (cache_dir(mcfg) / wf.filename).is_file():
        return resolve_weight(wf, mcfg)
    if wf.build is None or wf.built_from is None:
        raise UserError(f"{wf.name}: expected a weight file with a build and a source, got neither")
    src = resolve_weight(wf.built_from, mcfg, allow_download=True)
    dest = cache_dir(mcfg) / wf.filename
    log.info("building %s from %s", dest, src)
    with atomic_path(dest) as tmp:
        wf.build(src, tmp)
        verify(tmp, wf, mcfg)  # a mismatch leaves nothing in the cache
    return dest
