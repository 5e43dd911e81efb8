"""LAION's CLIP-based NSFW detector (``punsafe``) on L2-normalised CLIP image embeddings.

A port of LAION-AI/CLIP-based-NSFW-Detector's Autokeras models (ViT-L/14: 768 -> 64 -> 512 ->
256 -> 1; ViT-B/32: 512 -> 32 -> 32 -> 1), run from our conversion of the zip's variables
(``laion_nsfw_*.safetensors``) and lookup tables (``laion_nsfw_*_categorical.json``).

The quirk a plain MLP port misses: Autokeras typed a few embedding dimensions as categorical.
Each such value (as float32, the model's input type) is formatted ``"%f"``, looked up in that
column's table and replaced by its index (0 when absent) before Keras' Normalization
``(x - mean) / max(sqrt(variance), 1e-7)``. The lookup and normalisation run in float64 on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from t2i_curate.filters.base import Batch, Scorer
from t2i_curate.filters.savedmodel import write_nsfw_tables, write_nsfw_weights
from t2i_curate.pipeline.core.config import ModelsConfig
from t2i_curate.pipeline.core.weights import WeightFile, resolve_weight, weight_digest

_ORIGIN = ("our conversion of LAION-AI/CLIP-based-NSFW-Detector's {zip} (sha256 {sha}, "
           "https://raw.githubusercontent.com/LAION-AI/CLIP-based-NSFW-Detector/main/{zip})")
_ZIP_URL = "https://raw.githubusercontent.com/LAION-AI/CLIP-based-NSFW-Detector/main/{zip}"
ZIP_L14 = WeightFile("nsfw_l14_zip", "clip_autokeras_binary_nsfw.zip",
                     _ZIP_URL.format(zip="clip_autokeras_binary_nsfw.zip"),
                     "905520bb0336accc73ee282c605d926aef90cf14248889d44b9cee50eef71f8a")
ZIP_B32 = WeightFile("nsfw_b32_zip", "clip_autokeras_nsfw_b32.zip",
                     _ZIP_URL.format(zip="clip_autokeras_nsfw_b32.zip"),
                     "78715ab9d64485167e8c9ade3b8e6761a17a16c24d114bd47431ac1dab46462b")


def _conversion(name: str, filename: str, sha256: str, zip_: WeightFile,
                built: str | None = None) -> WeightFile:
    """A converted file that `curate weights` builds from LAION's zip (filters/savedmodel.py, no
    TensorFlow). ``sha256``: the reference conversion (../shared/models; its safetensors also hold
    TensorFlow's reference inputs and outputs); ``built``: what the build writes when that differs
    (the same tensors, without the reference ones)."""
    build = write_nsfw_tables if filename.endswith(".json") else write_nsfw_weights
    return WeightFile(name, filename, None, sha256, origin=_ORIGIN.format(zip=zip_.filename, sha=zip_.sha256),
                      built_from=zip_, build=build, also_accept=(built,) if built else ())


NSFW_L14 = _conversion("nsfw_l14", "laion_nsfw_vit_l_14.safetensors",
                       "009e790d0fc3332eef004dc286709a4f86584c6e277a240f4548f34371500a54", ZIP_L14,
                       "b87986a6cda9bb7ec7f5a98dad2fdd71c7082b355b751ba77bb831f26202371c")
NSFW_L14_TABLES = _conversion("nsfw_l14_categorical", "laion_nsfw_vit_l_14_categorical.json",
                              "fb119ea49e63773994e242503207d9e9cf1c451af47c198e34f9cd716ab2eb84", ZIP_L14)
NSFW_B32 = _conversion("nsfw_b32", "laion_nsfw_vit_b_32.safetensors",
                       "1943c5fd20d6ab526460269748069f7af940b0676ff6a27ef11b16144712165e", ZIP_B32,
                       "4077c5eb841c85352723e82e259591664ed24110798cae3e0d10d33b2eb716db")
NSFW_B32_TABLES = _conversion("nsfw_b32_categorical", "laion_nsfw_vit_b_32_categorical.json",
                              "1145161d3a4c523859bcd2cdaf1e9cd8ff87bbd9862fc3f394d52abfeab42b25", ZIP_B32)
KERAS_EPSILON = 1e-7  # keras.backend.epsilon(): Normalization divides by max(sqrt(variance), epsilon)


def nsfw_files(mcfg: ModelsConfig) -> list[WeightFile]:
    """The variables and the lookup tables for ``score.models.nsfw_clip``."""
    return [NSFW_L14, NSFW_L14_TABLES] if mcfg.nsfw_clip.startswith("ViT-L-14") else [NSFW_B32, NSFW_B32_TABLES]


def nsfw_detector(dim: int, hidden: list[int], tables: dict[int, dict[str, int]] | None = None):
    """The detector: categorical lookup, Normalization, Dense+ReLU layers, last Dense, sigmoid."""
    import torch
    import torch.nn as nn

    class NsfwDetector(nn.Module):
        def __init__(self):
            super().__init__()
            self.tables = tables or {}  # column -> {"%f" string: index}
            self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
            self.register_buffer("variance", torch.ones(dim, dtype=torch.float64))
            sizes = [dim, *hidden, 1]
            pairs = zip(sizes[:-1], sizes[1:], strict=True)
            self.dense = nn.ModuleList(nn.Linear(a, b, dtype=torch.float64) for a, b in pairs)

        def lookup(self, x):
            """Categorical columns -> their table index (0 when absent); others unchanged.

            ``format(v, "f")`` is ``"%f" % v``: six decimals, as the SavedModel formats them.
            """
            x = x.to(torch.float32).to(torch.float64)  # the SavedModel's input is float32
            for col, table in self.tables.items():
                x[:, col] = torch.tensor([float(table.get(format(v, "f"), 0)) for v in x[:, col].tolist()],
                                         dtype=torch.float64)
            return x

        def forward(self, x, categorical: bool = True):
            h = self.lookup(x) if categorical else x.to(torch.float64)
            h = (h - self.mean) / torch.clamp(self.variance.sqrt(), min=KERAS_EPSILON)
            for layer in self.dense[:-1]:
                h = torch.relu(layer(h))
            return torch.sigmoid(self.dense[-1](h)).squeeze(-1)

    return NsfwDetector()


def _var(state: dict, layer: int, name: str):
    return state[f"layer_with_weights-{layer}/{name}/.ATTRIBUTES/VARIABLE_VALUE"]


def load_converted(weights_path, tables_path):
    """The detector from a converted ``.safetensors`` (Keras variables) and its ``*_categorical.json``."""
    import torch
    from safetensors.torch import load_file

    state = load_file(str(weights_path))
    spec = json.loads(Path(tables_path).read_text(encoding="utf-8"))
    tables = {int(c): spec["tables"][str(c)] for c in spec["columns"]}
    kernel = "/kernel/.ATTRIBUTES/VARIABLE_VALUE"
    dense = sorted(int(k.split("/")[0].rsplit("-", 1)[1]) for k in state if k.endswith(kernel))
    kernels = [_var(state, i, "kernel") for i in dense]
    head = nsfw_detector(kernels[0].shape[0], [k.shape[1] for k in kernels[:-1]], tables)
    with torch.no_grad():
        head.mean.copy_(_var(state, 1, "mean").double())
        head.variance.copy_(_var(state, 1, "variance").double())
        for layer, i, k in zip(head.dense, dense, kernels, strict=True):
            layer.weight.copy_(k.T.double())
            layer.bias.copy_(_var(state, i, "bias").double())
    return head.eval()


def load_nsfw_head(embed_dim: int, mcfg: ModelsConfig, allow_download: bool = False):
    """The real detector for ``score.models.nsfw_clip``; tiny: the same class, seeded, no tables."""
    import torch

    if mcfg.preset == "tiny":
        torch.manual_seed(3)
        head = nsfw_detector(embed_dim, [32, 32])
        with torch.no_grad():
            head.mean.copy_(torch.randn(embed_dim, dtype=torch.float64) * 0.05)
            head.variance.copy_(torch.rand(embed_dim, dtype=torch.float64) * 0.01 + 0.001)
        return head.eval()
    weights, tables = (resolve_weight(wf, mcfg, allow_download) for wf in nsfw_files(mcfg))
    head = load_converted(weights, tables)
    if head.mean.shape[0] != embed_dim:
        raise ValueError(f"NSFW detector {weights.name} takes {head.mean.shape[0]}-d embeddings; "
                         f"{mcfg.nsfw_clip} gives {embed_dim}-d")
    return head


class NsfwScorer(Scorer):
    name = "nsfw"
    columns = {"punsafe": "DOUBLE"}
    uses_models = True
    description = "LAION CLIP-based NSFW detector on the L2-normalised CLIP image embedding: P(NSFW)"

    @classmethod
    def clip_models(cls, mcfg: ModelsConfig) -> list[str]:
        return [mcfg.nsfw_clip]

    @classmethod
    def weight_files(cls, mcfg: ModelsConfig) -> list[WeightFile]:
        return nsfw_files(mcfg)

    @classmethod
    def all_weight_files(cls) -> list[WeightFile]:
        return [NSFW_L14, NSFW_L14_TABLES, NSFW_B32, NSFW_B32_TABLES]

    def __init__(self, bank):
        super().__init__(bank)
        self.clip_name = bank.mcfg.nsfw_clip
        self.head = load_nsfw_head(bank.clip(self.clip_name).embed_dim, bank.mcfg)  # float64, CPU

    def score(self, batch: Batch) -> dict[str, list[Any]]:
        import torch

        e = self.bank.image_embedding(self.clip_name, batch)
        with torch.inference_mode():
            p = self.head(e.cpu())
        return {"punsafe": p.tolist()}

    def provenance(self) -> dict[str, str]:
        clip = self.bank.clip_label(self.clip_name)
        if self.bank.tiny:
            return {"clip": clip, "model": "laion_nsfw (tiny)", "tiny": "true"}
        mcfg = self.bank.mcfg  # the digest of the file that ran (a built file differs from the reference one)
        files = "; ".join(f"{wf.filename} sha256 {weight_digest(resolve_weight(wf, mcfg))}"
                          for wf in nsfw_files(mcfg))
        return {"clip": clip, "clip_sha256": self.bank.clip(self.clip_name).sha256,
                "model": "LAION CLIP-based-NSFW-Detector", "weights": files, "tiny": "false"}
