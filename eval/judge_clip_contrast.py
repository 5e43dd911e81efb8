"""CLIP zero-shot contrast between a category's normal and failure descriptions (an unvalidated baseline)."""

from __future__ import annotations

from pydantic import Field

from t2i_curate.eval.judge import Judge

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


class ClipContrastJudge(Judge):
    name = "clip_contrast"
    categories = tuple(DESCRIPTIONS)
    validated = False
    description = ("softmax over the eval CLIP's cosines to a normal and a failure description of the "
                   "category (temperature 100); P(failure) > 0.5 counts as failed. Not validated against "
                   "human labels.")

    class Options(Judge.Options):
        temperature: float = Field(100.0, gt=0)

    def __init__(self, bundle=None, labels=None, options=None, device="cpu"):
        super().__init__(bundle, labels, options, device)
        self.temperature = self.options.temperature
        self._text: dict[str, object] = {}

    def _descriptions(self, category: str):
        if category not in self._text:
            from t2i_curate.filters.clip import encode_texts

            self._text[category] = encode_texts(self.bundle, list(DESCRIPTIONS[category]))
        return self._text[category]

    def p_fail_embeddings(self, emb, category: str):
        """Softmax over (normal, failure) cosines; returns P(failure) per image."""
        import torch

        t = self._descriptions(category)
        logits = self.temperature * torch.nn.functional.normalize(emb.float(), dim=-1) @ t.T
        return torch.softmax(logits, dim=-1)[:, 1]

    def p_fail(self, category, rows, emb):
        return self.p_fail_embeddings(emb, category).tolist(), None
