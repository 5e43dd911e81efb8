"""Run the configured failure judges over the measured images: per-category rates with intervals and
agreement, the per-image verdicts and what each judge saw (the ``eval_judgements`` columns), and each
judge's description and models for ``metrics.json``.

A judge's P(failure) for an image may be None: it could not tell (no hand found, an answer that is
neither yes nor no). Such an image is counted as ``unknown`` in its category's row, never as a pass, and
the rate is over the images the judge could judge.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from t2i_curate.eval.stats import agreement, corrected_rate, wilson

log = logging.getLogger(__name__)
THRESHOLD = 0.5  # P(failure) above this is a failure verdict


def verdict(p: float | None) -> str:
    return "unknown" if p is None else ("failed" if p > THRESHOLD else "passed")


def rate_row(category: str, judge, p: list[float | None], lab_y: list[bool], lab_p: list[float | None]) -> dict:
    """One ``eval_failures`` row: the rate over judged images with its Wilson interval, the unknown count,
    and agreement with the labels where both a label and a verdict exist."""
    judged = [x for x in p if x is not None]
    k, n = sum(x > THRESHOLD for x in judged), len(judged)
    lo, hi = wilson(k, n) if n else (0.0, 1.0)
    row: dict[str, Any] = {"category": category, "judge": judge.name, "n": n, "failed": k,
                           "rate": k / n if n else None, "ci_low": lo, "ci_high": hi,
                           "unknown": len(p) - n, "validated": judge.validated}
    pairs = [(y, x) for y, x in zip(lab_y, lab_p, strict=True) if x is not None]
    if pairs and n:
        ag = agreement([y for y, _ in pairs], [x > THRESHOLD for _, x in pairs])
        row.update(ag)
        row["corrected_rate"] = corrected_rate(k / n, ag["recall"], ag["specificity"])
    return row


def _judge_category(judge, category, idx, rows, img_emb, labels, columns, out_rows) -> None:
    cat_rows = [rows[i] for i in idx]
    res = judge.p_fail(category, cat_rows, img_emb[idx])
    if res is None:
        return
    p, oof = res
    if len(p) != len(idx):
        raise RuntimeError(f"judge {judge.name} returned {len(p)} values for {len(idx)} {category} images")
    lab = [j for j, r in enumerate(cat_rows) if r["image_id"] in labels]
    lab_y = [labels[cat_rows[j]["image_id"]] for j in lab]
    for j, i in enumerate(idx):
        columns[f"p_fail_{judge.name}"][i] = p[j]
        columns[f"verdict_{judge.name}"][i] = verdict(p[j])
    for col, values in judge.observations().items():
        columns.setdefault(col, [None] * len(rows))
        for j, i in enumerate(idx):
            columns[col][i] = values[j]
    out_rows.append(rate_row(category, judge, p, lab_y, oof if oof is not None else [p[j] for j in lab]))


def run_judges(cfg, rows: list[dict], img_emb, bundle, out_dir: Path, device: str = "cpu",
               on_judged=None, columns_out: dict | None = None) -> tuple[list[dict], dict[str, list], dict[str, dict]]:
    """Each configured judge over the images of each category it covers.

    Returns the ``eval_failures`` rows, per-image columns (``p_fail_<judge>``, ``verdict_<judge>`` and the
    judges' observations; None where a judge did not look) and, per judge, its description, whether it
    ran, and the models that made its verdicts. ``on_judged(judge, category, idx)`` is called after each
    category, while the judge still holds what it saw (measure draws examples from it)."""
    from t2i_curate.eval.judge import configured_judges, read_labels

    labels = read_labels(cfg.eval.labels) if cfg.eval.labels else {}
    judges = configured_judges(cfg.eval.judges, bundle, labels, cfg.eval.judge_options, device)
    columns: dict[str, list] = {}
    if columns_out is not None:  # the caller's callback reads the columns as they fill
        columns_out["columns"] = columns
    for j in judges:
        j.image_dir = out_dir
        columns[f"p_fail_{j.name}"] = [None] * len(rows)
        columns[f"verdict_{j.name}"] = [None] * len(rows)
    out_rows: list[dict] = []
    for category in sorted({r["category"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["category"] == category]
        for judge in (j for j in judges if category in j.categories):
            _judge_category(judge, category, idx, rows, img_emb, labels, columns, out_rows)
            if on_judged is not None:
                on_judged(judge, category, idx)
    ran = {r["judge"] for r in out_rows}
    info = {j.name: {"description": j.description, "validated": j.validated, "categories": list(j.categories),
                     "ran": j.name in ran, "models": j.provenance() if j.name in ran else {}} for j in judges}
    return out_rows, columns, info
