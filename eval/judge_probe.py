"""A logistic-regression probe on eval-CLIP image embeddings, trained from the labels file."""

from __future__ import annotations

import logging

from pydantic import Field

from t2i_curate.eval.judge import Judge

log = logging.getLogger(__name__)


class ProbeJudge(Judge):
    name = "probe"
    validated = True
    description = ("logistic regression (L2 1e-3, LBFGS) on L2-normalised eval-CLIP image embeddings, fitted "
                   "on the category's labelled images; agreement figures are 5-fold out-of-fold.")

    class Options(Judge.Options):
        l2: float = Field(1e-3, ge=0)
        steps: int = Field(300, ge=1)

    def __init__(self, bundle=None, labels=None, options=None, device="cpu"):
        super().__init__(bundle, labels, options, device)
        self.l2, self.steps = self.options.l2, self.options.steps
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

    def p_fail_embeddings(self, emb):
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
            for i, p in zip(test, j.p_fail_embeddings(emb[test]).tolist(), strict=True):
                out[i] = p
        return out

    def p_fail(self, category, rows, emb):
        lab_idx = [j for j, r in enumerate(rows) if r["image_id"] in self.labels]
        lab_y = [self.labels[rows[j]["image_id"]] for j in lab_idx]
        if len(set(lab_y)) < 2 or len(lab_y) < 4:
            if self.labels:
                log.info("probe judge skipped for %s: needs >= 4 labelled images of both outcomes", category)
            return None
        self.fit(emb[lab_idx], lab_y)
        return self.p_fail_embeddings(emb).tolist(), self.cross_validated(emb[lab_idx], lab_y)
