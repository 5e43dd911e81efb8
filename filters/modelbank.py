"""The model bank of one scoring process: device, dtype, each CLIP loaded once, and the image
embedding of a batch computed once per CLIP and shared by every scorer that reads it
(aesthetic head, similarity, saved embeddings)."""

from __future__ import annotations

from typing import Any

from t2i_curate.filters.base import Batch
from t2i_curate.filters.clip import ClipBundle, encode_images, encode_texts, load_clip
from t2i_curate.pipeline.core.config import ScoreConfig
from t2i_curate.pipeline.core.devices import model_dtype, pick_device


class ModelBank:
    def __init__(self, scfg: ScoreConfig):
        self.cfg = scfg
        self.mcfg = scfg.models
        self.device = pick_device(scfg.device)
        self.dtype = model_dtype(self.device)
        self.clips: dict[str, ClipBundle] = {}

    @property
    def tiny(self) -> bool:
        return self.mcfg.preset == "tiny"

    def clip(self, name: str) -> ClipBundle:
        if name not in self.clips:
            b = load_clip(name, self.mcfg)
            b.model.to(self.device, self.dtype)
            self.clips[name] = b
        return self.clips[name]

    def clip_label(self, name: str) -> str:
        """The CLIP's name as outputs record it: ``tiny:`` in front when it is the tiny stand-in."""
        return self.clip(name).name

    def prepare(self, module):
        return module.to(self.device, self.dtype).eval()

    def input_key(self, name: str) -> str:
        """Key of the decoded input a CLIP needs; CLIPs with equal preprocessing share it."""
        return "clip:" + repr(self.clip(name).preprocess)

    def clip_transforms(self, names: list[str]) -> dict[str, Any]:
        return {self.input_key(n): self.clip(n).preprocess for n in names}

    def clip_input_size(self, name: str) -> int:
        size = getattr(self.clip(name).model.visual, "image_size", 224)
        return int(max(size) if isinstance(size, (tuple, list)) else size)

    def image_embedding(self, name: str, batch: Batch):
        """L2-normalised image embeddings (float32, CPU) for the batch, computed once per batch."""
        memo = ("image_embedding", name)
        if memo not in batch.inputs:
            x = batch.inputs[self.input_key(name)].to(self.device, self.dtype)
            batch.inputs[memo] = encode_images(self.clip(name), x)
        return batch.inputs[memo]

    def text_embedding(self, name: str, captions: list[str]):
        return encode_texts(self.clip(name), captions)
