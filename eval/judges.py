"""Failure judges: decide, per generated image, whether its category's known failure shows.

A judge maps ``(image embeddings, rows)`` to a probability of failure per
image. Three kinds:

- :class:`ClipContrastJudge`: CLIP zero-shot contrast between a category's
  normal and failure descriptions. The baseline; **not validated** against
  human labels unless a labels file is given.
- :class:`ProbeJudge`: a logistic-regression probe on image embeddings trained
  from the user's labels file (image id, category, failed yes/no).
- :class:`VQAJudge`: the interface for a visual question answering model: give
  it a callable ``ask(image_path, question) -> str``; answers starting with
  "yes" count as failures.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

# category -> (normal description, failure description)
DESCRIPTIONS = {
    "human_limbs": (
        "a photo of a person with normal, well-formed hands, arms and legs",
        "a photo of a person with deformed hands, extra fingers, and missing or extra arms or legs",
    ),
    "horses": (
        "a photo of a horse with four normal legs and a well-formed body",
        "a photo of a horse with deformed, extra or missing legs and a malformed body",
    ),
    "quadrupeds": (
        "a photo of an animal with four normal legs and a well-formed body",
        "a photo of an animal with deformed, extra or missing legs and a malformed body",
    ),
}
VQA_QUESTIONS = {
    "human_limbs": "Does any person in this image have malformed hands, extra fingers or missing or extra limbs?",
    "horses": "Does the horse in this image have malformed, extra or missing legs?",
    "quadrupeds": "Does the animal in this image have malformed, extra or missing legs?",
}


class LabelsError(ValueError):
    pass


def read_labels(path: str | Path) -> dict[str, bool]:
    """``image_id,category,failed`` CSV -> {image_id: failed}; yes/no, true/false, 1/0 accepted."""
    out: dict[str, bool] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"image_id", "failed"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise LabelsError(f"{path}: expected columns image_id, category, failed; got {reader.fieldnames}")
        for i, r in enumerate(reader):
            v = (r["failed"] or "").strip().lower()
            if v not in ("yes", "no", "true", "false", "1", "0"):
                raise LabelsError(f"{path}:{i + 2}: failed must be yes/no, got {r['failed']!r}")
            out[r["image_id"]] = v in ("yes", "true", "1")
    return out


class ClipContrastJudge:
    name = "clip_contrast"
    validated = False

    def __init__(self, bundle, temperature: float = 100.0):
        self.bundle = bundle
        self.temperature = temperature
        self._text: dict[str, object] = {}

    def _descriptions(self, category: str):
        import torch

        if category not in self._text:
            normal, failure = DESCRIPTIONS[category]
            tok = self.bundle.tokenizer([normal, failure])
            with torch.inference_mode():
                e = self.bundle.model.encode_text(tok).float()
            self._text[category] = torch.nn.functional.normalize(e, dim=-1)
        return self._text[category]

    def p_fail(self, emb, category: str):
        """Softmax over (normal, failure) cosines; returns P(failure) per image."""
        import torch

        t = self._descriptions(category)
        logits = self.temperature * torch.nn.functional.normalize(emb.float(), dim=-1) @ t.T
        return torch.softmax(logits, dim=-1)[:, 1]


class ProbeJudge:
    """Logistic regression on normalised image embeddings, fitted on labelled images."""

    name = "probe"
    validated = True

    def __init__(self, l2: float = 1e-3, steps: int = 300):
        self.l2, self.steps = l2, steps
        self.w = None
        self.b = None

    def fit(self, emb, labels):
        import torch

        x = torch.nn.functional.normalize(emb.float(), dim=-1)
        y = torch.as_tensor(labels, dtype=torch.float32)
        w = torch.zeros(x.shape[1], requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=0.5, max_iter=self.steps)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + self.l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.w, self.b = w.detach(), b.detach()
        return self

    def p_fail(self, emb, category: str | None = None):
        import torch

        x = torch.nn.functional.normalize(emb.float(), dim=-1)
        return torch.sigmoid(x @ self.w + self.b)

    @staticmethod
    def cross_validated(emb, labels: list[bool], folds: int = 5) -> list[float]:
        """Out-of-fold P(failure) for every labelled image (for honest agreement figures)."""
        n = len(labels)
        out = [0.0] * n
        for f in range(min(folds, n)):
            test = [i for i in range(n) if i % folds == f]
            train = [i for i in range(n) if i % folds != f]
            if len({labels[i] for i in train}) < 2:
                p = float(sum(labels[i] for i in train) / max(1, len(train)))
                for i in test:
                    out[i] = p
                continue
            j = ProbeJudge().fit(emb[train], [labels[i] for i in train])
            for i, p in zip(test, j.p_fail(emb[test]).tolist(), strict=True):
                out[i] = p
        return out


class VQAJudge:
    """Wraps any VQA model: ``ask(image_path, question) -> answer``; 'yes...' means failed."""

    name = "vqa"
    validated = False

    def __init__(self, ask: Callable[[str, str], str]):
        self.ask = ask

    def p_fail_paths(self, paths: list[str], category: str) -> list[float]:
        q = VQA_QUESTIONS[category]
        return [1.0 if self.ask(p, q).strip().lower().startswith("yes") else 0.0 for p in paths]
