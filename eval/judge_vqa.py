"""A visual-question-answering judge: any model's ``ask(image_path, question) -> answer``."""

from __future__ import annotations

import logging
from collections.abc import Callable

from t2i_curate.eval.judge import Judge

log = logging.getLogger(__name__)

VQA_QUESTIONS = {
    "human_limbs": "Does any person in this image have malformed hands, extra fingers or missing or extra limbs?",
    "horses": "Does the horse in this image have malformed, extra or missing legs?",
    "quadrupeds": "Does the animal in this image have malformed, extra or missing legs?",
}


class VQAJudge(Judge):
    """Answers starting with "yes" count as failed. Not selectable from config yet: it needs a model
    (``ask``), which only code can give today."""

    name = "vqa"
    categories = tuple(VQA_QUESTIONS)
    validated = False
    description = "a VQA model asked the category's yes/no question; 'yes...' counts as failed."

    def __init__(self, ask: Callable[[str, str], str] | None = None, bundle=None, labels=None,
                 image_dir=None):
        super().__init__(bundle, labels)
        self.ask = ask
        self.image_dir = image_dir

    def p_fail_paths(self, paths: list[str], category: str) -> list[float]:
        q = VQA_QUESTIONS[category]
        return [1.0 if self.ask(p, q).strip().lower().startswith("yes") else 0.0 for p in paths]

    def p_fail(self, category, rows, emb):
        if self.ask is None or self.image_dir is None:
            log.warning("vqa judge: no VQA model is configured (only code can give one today); skipped")
            return None
        return self.p_fail_paths([str(self.image_dir / r["file"]) for r in rows], category), None
