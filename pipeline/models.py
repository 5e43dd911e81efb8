"""Model loading: the real LAION / OpenAI models of MODELS.md, and tiny stand-ins.

One code path for both: a real spec resolves a weight file (local path from
``score.models.local_weights``, else the cache, else -- only in ``curate
weights`` -- a download with sha256 check), a tiny spec builds the same class
at toy size with seeded random weights. Nothing downloads at import time or
while scoring: a missing weight raises :class:`WeightsMissingError` at once,
naming the file and how to provide it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ModelsConfig

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsMissingError(FileNotFoundError):
    """A real model's weights are not on this machine."""


class WeightsMismatchError(ValueError):
    """A weight file's sha256 is not the pinned one."""


@dataclass(frozen=True)
class WeightFile:
    name: str  # the key for score.models.local_weights
    filename: str
    url: str
    sha256: str | None  # None: unknown upstream; recorded on first download and pinned


AESTHETIC_V2 = WeightFile(
    "aesthetic_v2", "sac+logos+ava1-l14-linearMSE.pth",
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth",
    "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0",
)
AESTHETIC_V1_L14 = WeightFile(
    "aesthetic_v1_l14", "sa_0_4_vit_l_14_linear.pth",
    "https://github.com/LAION-AI/aesthetic-predictor/raw/main/sa_0_4_vit_l_14_linear.pth",
    "2cd4e60f4f24ae3bcd57b847b13c1f3ba27edc28cc1a7f9ce74ee9f421243cba",
)
AESTHETIC_V1_B32 = WeightFile(
    "aesthetic_v1_b32", "sa_0_4_vit_b_32_linear.pth",
    "https://github.com/LAION-AI/aesthetic-predictor/raw/main/sa_0_4_vit_b_32_linear.pth",
    "c7b14cead230694acc7b9447974d3cad78003c72da032e402a303b6c2429e85f",
)
WATERMARK = WeightFile(
    "watermark", "watermark_model_v1.pt",
    "https://github.com/LAION-AI/LAION-5B-WatermarkDetection/raw/main/models/watermark_model_v1.pt",
    None,
)
WEIGHT_FILES = {w.name: w for w in (AESTHETIC_V2, AESTHETIC_V1_L14, AESTHETIC_V1_B32, WATERMARK)}


def cache_dir(mcfg: ModelsConfig) -> Path:
    d = mcfg.cache_dir or os.environ.get("CURATE_WEIGHTS") or "~/.cache/t2i-curate"
    return Path(os.path.expanduser(d))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _how_to_provide(name: str, path: Path) -> str:
    return (f"expected {path}. Run `make weights` (or `curate weights --config <your config>`) on a "
            f"machine with internet, or point at a local copy with "
            f"`--set \"score.models.local_weights={{{name}: /path/to/file}}\"`, or set "
            f"score.models.cache_dir / $CURATE_WEIGHTS to where the file lies")


def verify(path: Path, wf: WeightFile, mcfg: ModelsConfig) -> str:
    """Check ``path`` against the known sha256, or the one pinned at first download."""
    digest = _sha256(path)
    pinned = wf.sha256
    pin_file = cache_dir(mcfg) / f"{wf.filename}.sha256"
    if pinned is None and pin_file.exists():
        pinned = pin_file.read_text().split()[0]
    if pinned is not None and digest != pinned:
        raise WeightsMismatchError(f"{path}: sha256 {digest} but {wf.name} is pinned to {pinned}")
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
        if not allow_download:
            raise WeightsMissingError(f"weights for {wf.name} are missing: " + _how_to_provide(wf.name, p))
        download(wf.url, p)
        if wf.sha256 is None:  # unknown upstream: pin what we got
            digest = _sha256(p)
            (p.parent / f"{wf.filename}.sha256").write_text(f"{digest}  {wf.filename}\n")
            log.info("%s: recorded sha256 %s (pinned for later loads)", wf.filename, digest)
    verify(p, wf, mcfg)
    return p


def download(url: str, dest: Path, timeout: float = 60.0) -> None:
    from tqdm import tqdm

    from pipeline.io import atomic_path

    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s", url)
    with urllib.request.urlopen(url, timeout=timeout) as r, atomic_path(dest) as tmp:  # noqa: S310 (fixed https URLs)
        total = int(r.headers.get("Content-Length") or 0) or None
        with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))


# --- CLIP ------------------------------------------------------------------------------------


def split_clip_name(name: str) -> tuple[str, str]:
    if "/" not in name:
        raise ValueError(f"CLIP model name {name!r}: expected 'ARCH/PRETRAINED', e.g. 'ViT-L-14/openai'")
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
        raise ValueError(f"unknown open_clip model {name!r}; e.g. {known}, ...")
    hf_cache = cache_dir(mcfg) / "open_clip"
    hub = pcfg.get("hf_hub", "")
    model_id, fname = os.path.split(hub)  # "org/repo/" -> ("org/repo", ""): default file names
    candidates = [fname] if fname else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    if hub:
        from huggingface_hub import try_to_load_from_cache

        for c in candidates:
            hit = try_to_load_from_cache(model_id, c, cache_dir=str(hf_cache))
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
    if allow_download:
        return ocp.download_pretrained(pcfg, cache_dir=str(hf_cache))
    where = hf_cache / f"models--{model_id.replace('/', '--')}" if hub else hf_cache
    raise WeightsMissingError(f"weights for CLIP {name} are missing: " + _how_to_provide(name, where))


@dataclass
class ClipBundle:
    name: str
    model: Any
    preprocess: Any
    tokenizer: Any
    embed_dim: int
    tiny: bool


def tiny_clip(name: str, seed: int = 0) -> ClipBundle:
    """open_clip.CLIP at toy size, seeded; same preprocessing as the real OpenAI models."""
    import open_clip
    import torch

    torch.manual_seed(seed + sum(map(ord, name)))
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 224, "patch_size": 32, "width": 64, "layers": 1, "head_width": 32},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        quick_gelu=True,
    ).eval()
    preprocess = open_clip.image_transform(224, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    return ClipBundle(f"tiny:{name}", model, preprocess, tokenizer, 32, True)


def load_clip(name: str, mcfg: ModelsConfig, allow_download: bool = False) -> ClipBundle:
    if mcfg.preset == "tiny":
        return tiny_clip(name)
    import open_clip
    from open_clip import pretrained as ocp

    arch, tag = split_clip_name(name)
    path = clip_checkpoint(name, mcfg, allow_download)
    pcfg = ocp.get_pretrained_cfg(arch, tag) or {}
    model, _, preprocess = open_clip.create_model_and_transforms(
        arch, pretrained=path, force_quick_gelu=bool(pcfg.get("quick_gelu", False)),
        image_mean=pcfg.get("mean"), image_std=pcfg.get("std"),
        image_interpolation=pcfg.get("interpolation"), image_resize_mode=pcfg.get("resize_mode"),
        weights_only=True,
    )
    model.eval()
    embed_dim = open_clip.get_model_config(arch)["embed_dim"]
    return ClipBundle(name, model, preprocess, open_clip.get_tokenizer(arch), embed_dim, False)


# --- aesthetic heads ---------------------------------------------------------------------------


def aesthetic_mlp(input_size: int = 768):
    """LAION aesthetic predictor V2's MLP (no activations), layer names as in the checkpoint."""
    import torch.nn as nn

    class AestheticMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(
                nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
            )

        def forward(self, x):
            return self.layers(x)

    return AestheticMLP()


def load_aesthetic_head(version: str, embed_dim: int, mcfg: ModelsConfig, allow_download: bool = False):
    """V2 MLP or V1 linear head on L2-normalised CLIP image embeddings."""
    import torch
    import torch.nn as nn

    if mcfg.preset == "tiny":
        torch.manual_seed(1)
        head = aesthetic_mlp(embed_dim) if version == "v2" else nn.Linear(embed_dim, 1)
        return head.eval()
    if version == "v2":
        wf, head = AESTHETIC_V2, aesthetic_mlp(embed_dim)
    else:
        wf = AESTHETIC_V1_L14 if embed_dim == 768 else AESTHETIC_V1_B32
        head = nn.Linear(embed_dim, 1)
    state = torch.load(resolve_weight(wf, mcfg, allow_download), map_location="cpu", weights_only=True)
    head.load_state_dict(state)
    return head.eval()


# --- watermark ---------------------------------------------------------------------------------


def watermark_model(arch: str = "efficientnet_b3", hidden: tuple[int, int] = (625, 256)):
    """timm EfficientNet with LAION's classifier head; softmax index 0 is P(watermark)."""
    import timm
    import torch.nn as nn

    model = timm.create_model(arch, pretrained=False, num_classes=2)
    model.classifier = nn.Sequential(
        nn.Linear(model.num_features, hidden[0]), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(hidden[0], hidden[1]), nn.ReLU(), nn.Linear(hidden[1], 2),
    )
    return model


def load_watermark(mcfg: ModelsConfig, allow_download: bool = False):
    import torch

    if mcfg.preset == "tiny":
        torch.manual_seed(2)
        return watermark_model("test_efficientnet", hidden=(16, 8)).eval()
    model = watermark_model()
    state = torch.load(resolve_weight(WATERMARK, mcfg, allow_download), map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model.load_state_dict(state)
    return model.eval()


def watermark_transform():
    """LAION's watermark preprocessing: stretch to 256x256, ToTensor, ImageNet mean/std."""
    from torchvision import transforms as T  # noqa: N812 (torchvision convention)

    return T.Compose([T.Resize((256, 256)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def needed_weights(scfg) -> tuple[list[str], list[WeightFile]]:
    """The CLIP names and head files a score config needs (real preset)."""
    clips, heads = [], []
    names = set(scfg.scorers)
    m = scfg.models
    if "aesthetic" in names:
        clips.append(m.aesthetic_clip)
        if m.aesthetic_head == "v2":
            heads.append(AESTHETIC_V2)
        else:
            heads.append(AESTHETIC_V1_L14 if m.aesthetic_clip.startswith("ViT-L-14") else AESTHETIC_V1_B32)
    if "clip_similarity" in names and m.similarity_clip not in clips:
        clips.append(m.similarity_clip)
    if "watermark" in names:
        heads.append(WATERMARK)
    return clips, heads


def preflight(scfg) -> None:
    """Fail within seconds, before any work, if a real weight is missing or mismatched."""
    if scfg.models.preset == "tiny":
        return
    clips, heads = needed_weights(scfg)
    for n in clips:
        clip_checkpoint(n, scfg.models)
    for wf in heads:
        resolve_weight(wf, scfg.models)


def fetch_all(mcfg: ModelsConfig, clip_names: list[str], heads: list[WeightFile]) -> dict[str, str]:
    """Download every real weight the config needs into the cache; return name -> path."""
    out = {}
    for n in clip_names:
        out[n] = clip_checkpoint(n, mcfg, allow_download=True)
    for wf in heads:
        out[wf.name] = str(resolve_weight(wf, mcfg, allow_download=True))
    return out
