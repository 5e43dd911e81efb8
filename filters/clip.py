"""CLIP models: the real OpenAI / open_clip ones of MODELS.md, a tiny seeded stand-in, and the one
"encode and L2-normalise" that scoring, eval metrics and judges share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from t2i_curate.pipeline.core.config import ModelsConfig
from t2i_curate.pipeline.core.weights import clip_checkpoint, split_clip_name

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# the CLIPs of MODELS.md: ViT-L/14 under the aesthetic and NSFW heads, ViT-B/32 for LAION's similarity
KNOWN_CLIPS = ("ViT-L-14/openai", "ViT-B-32/openai")


@dataclass
class ClipBundle:
    name: str
    model: Any
    preprocess: Any
    tokenizer: Any
    embed_dim: int
    tiny: bool
    sha256: str = ""  # of the checkpoint file that ran; "tiny" for the seeded stand-in

    def provenance(self) -> dict[str, str]:
        """What every output names: the CLIP and its weights' sha256, or tiny."""
        return {"name": self.name, "weights_sha256": "tiny" if self.tiny else self.sha256}


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
    return ClipBundle(f"tiny:{name}", model, preprocess, tokenizer, 32, True, "tiny")


def is_torchscript(path: str | Path) -> bool:
    """OpenAI's own ``ViT-L-14.pt`` (as the ``clip`` package caches it) is a TorchScript archive."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())


def openai_sha256(arch: str, tag: str) -> str | None:
    """The sha256 OpenAI publishes for a checkpoint: the folder name in its download URL."""
    from open_clip import pretrained as ocp

    url = (ocp.get_pretrained_cfg(arch, tag) or {}).get("url", "")
    parts = url.rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 and len(parts[-2]) == 64 else None


def _load_torchscript_state(path: str, name: str) -> dict:
    """The tensors of OpenAI's TorchScript CLIP archive. ``torch.jit.load`` can run code an archive
    carries, so only a file whose sha256 is the one OpenAI published for ``name`` is loaded."""
    import torch

    from t2i_curate.pipeline.core.io import sha256_file
    from t2i_curate.pipeline.core.weights import WeightsMismatchError

    want, got = openai_sha256(*split_clip_name(name)), sha256_file(path)
    if got != want:
        raise WeightsMismatchError(
            f"{path}: a TorchScript archive whose sha256 {got} is not the one OpenAI published for {name} "
            f"({want or 'none known'}); TorchScript can carry code, so only OpenAI's own files are loaded. "
            f"Convert it to a state dict or safetensors and pass that as score.models.local_weights.{name}")
    state = torch.jit.load(path, map_location="cpu").state_dict()
    for k in ("input_resolution", "context_length", "vocab_size", "attn_mask"):  # not parameters
        state.pop(k, None)
    return {k: v.float() for k, v in state.items()}


def load_clip(name: str, mcfg: ModelsConfig, allow_download: bool = False) -> ClipBundle:
    if mcfg.preset == "tiny":
        return tiny_clip(name)
    import open_clip
    from open_clip import pretrained as ocp

    arch, tag = split_clip_name(name)
    path = clip_checkpoint(name, mcfg, allow_download)
    pcfg = ocp.get_pretrained_cfg(arch, tag) or {}
    jit = is_torchscript(path)
    model, _, preprocess = open_clip.create_model_and_transforms(
        arch, pretrained=None if jit else path, force_quick_gelu=bool(pcfg.get("quick_gelu", False)),
        image_mean=pcfg.get("mean"), image_std=pcfg.get("std"),
        image_interpolation=pcfg.get("interpolation"), image_resize_mode=pcfg.get("resize_mode"),
        weights_only=True,
    )
    if jit:
        model.load_state_dict(_load_torchscript_state(path, name))
    model.eval()
    embed_dim = open_clip.get_model_config(arch)["embed_dim"]
    from t2i_curate.pipeline.core.weights import weight_digest

    return ClipBundle(name, model, preprocess, open_clip.get_tokenizer(arch), embed_dim, False,
                      weight_digest(Path(path)))


def _placement(bundle: ClipBundle):
    """The device and dtype the model's weights are on (measure and the model bank move it to CUDA fp16)."""
    p = next(bundle.model.parameters())
    return p.device, p.dtype


def encode_images(bundle: ClipBundle, x) -> Any:
    """L2-normalised float32 image embeddings, on the CPU, of a preprocessed batch (moved to the model's
    device and dtype first, so a caller never has to know where the model is)."""
    import torch

    device, dtype = _placement(bundle)
    with torch.inference_mode():
        e = bundle.model.encode_image(x.to(device, dtype)).float()
    return torch.nn.functional.normalize(e, dim=-1).cpu()


def encode_texts(bundle: ClipBundle, texts: list[str]) -> Any:
    """L2-normalised float32 text embeddings, on the CPU (an empty string for a missing caption); the
    tokens go to the model's device."""
    import torch

    tokens = bundle.tokenizer([t or "" for t in texts]).to(_placement(bundle)[0])
    with torch.inference_mode():
        e = bundle.model.encode_text(tokens).float()
    return torch.nn.functional.normalize(e, dim=-1).cpu()
