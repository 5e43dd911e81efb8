"""Measure a sampled model: CLIP score, FID/KID, per-category failure rates, bias audit.

Reads ``eval/<tag>/eval_images.parquet`` and the PNGs; writes
``metrics.json`` and the parquet tables ``eval_metrics``, ``eval_failures``,
``eval_bias`` (and adds per-image columns to ``eval_images``), all of which the
run's catalog registers.
"""

from __future__ import annotations

import json
import logging
import platform
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from eval import bias as B  # noqa: N812
from eval.judges import DESCRIPTIONS, ClipContrastJudge, ProbeJudge, read_labels
from eval.metrics import agreement, clip_score, corrected_rate, fid_kid, wilson
from pipeline.config import RunConfig
from pipeline.io import write_json, write_parquet

log = logging.getLogger(__name__)
MEASURE_COLUMNS = ("clip_score", "perceived_gender", "monk_tone", "p_fail_clip_contrast", "p_fail_probe")


def _clip_bundle(cfg: RunConfig, tiny: bool):
    from pipeline.models import load_clip, tiny_clip

    return tiny_clip(cfg.eval.clip_score_model) if tiny else load_clip(cfg.eval.clip_score_model, cfg.score.models)


def _embed(bundle, images, prompts):
    import torch

    img_e, txt_e = [], []
    for i in range(0, len(images), 32):
        x = torch.stack([bundle.preprocess(im) for im in images[i : i + 32]])
        t = bundle.tokenizer(prompts[i : i + 32])
        with torch.inference_mode():
            img_e.append(bundle.model.encode_image(x).float())
            txt_e.append(bundle.model.encode_text(t).float())
    return torch.cat(img_e), torch.cat(txt_e)


def _failures(cfg, rows, img_emb, bundle) -> tuple[list[dict], dict[str, list]]:
    """Per-category failure rates for each judge, with agreement when labels exist."""
    labels = read_labels(cfg.eval.labels) if cfg.eval.labels else {}
    out_rows, per_image = [], {"p_fail_clip_contrast": [None] * len(rows), "p_fail_probe": [None] * len(rows)}
    contrast = ClipContrastJudge(bundle)
    for category in sorted({r["category"] for r in rows} & set(DESCRIPTIONS)):
        idx = [i for i, r in enumerate(rows) if r["category"] == category]
        emb = img_emb[idx]
        judged: dict[str, tuple[list[float], list[float] | None]] = {}
        if "clip_contrast" in cfg.eval.judges:
            p = contrast.p_fail(emb, category).tolist()
            judged["clip_contrast"] = (p, None)
        lab_idx = [j for j, i in enumerate(idx) if rows[i]["image_id"] in labels]
        lab_y = [labels[rows[idx[j]]["image_id"]] for j in lab_idx]
        if "probe" in cfg.eval.judges and len(set(lab_y)) == 2 and len(lab_y) >= 4:
            probe = ProbeJudge().fit(emb[lab_idx], lab_y)
            oof = ProbeJudge.cross_validated(emb[lab_idx], lab_y)
            judged["probe"] = (probe.p_fail(emb).tolist(), oof)
        elif "probe" in cfg.eval.judges and cfg.eval.labels:
            log.info("probe judge skipped for %s: needs >= 4 labelled images of both outcomes", category)
        for judge, (p, oof) in judged.items():
            for j, i in enumerate(idx):
                per_image[f"p_fail_{judge}"][i] = p[j]
            failed = [x > 0.5 for x in p]
            k, n = sum(failed), len(failed)
            lo, hi = wilson(k, n)
            row: dict[str, Any] = {"category": category, "judge": judge, "n": n, "failed": k, "rate": k / n,
                                   "ci_low": lo, "ci_high": hi, "validated": judge == "probe"}
            if lab_y:
                pred = [x > 0.5 for x in (oof if oof is not None else [p[j] for j in lab_idx])]
                ag = agreement(lab_y, pred)
                row.update(ag)
                row["corrected_rate"] = corrected_rate(k / n, ag["recall"], ag["specificity"])
            out_rows.append(row)
    return out_rows, per_image


def _bias(cfg, rows, images, img_emb, bundle) -> tuple[list[dict], dict[str, list], dict[str, Any]]:
    import torch

    idx = [i for i, r in enumerate(rows) if r.get("occupation")]
    per_image: dict[str, list] = {"perceived_gender": [None] * len(rows), "monk_tone": [None] * len(rows)}
    if not idx:
        return [], per_image, {}
    tok = bundle.tokenizer(list(B.GENDER_PROMPTS.values()))
    with torch.inference_mode():
        t = torch.nn.functional.normalize(bundle.model.encode_text(tok).float(), dim=-1)
    probs = torch.softmax(100 * torch.nn.functional.normalize(img_emb[idx], dim=-1) @ t.T, dim=-1).numpy()
    by_occ: dict[str, dict[str, list]] = {}
    for j, i in enumerate(idx):
        g = B.perceived_gender(probs[j])
        tone = B.monk_tone(np.asarray(images[i].convert("RGB")))
        per_image["perceived_gender"][i] = g
        per_image["monk_tone"][i] = str(tone)
        occ = by_occ.setdefault(rows[i]["occupation"], {"gender": [], "tone": []})
        occ["gender"].append(g)
        occ["tone"].append(tone)
    ref = B.read_reference(cfg.eval.bias_reference) if cfg.eval.bias_reference else {}
    table, summary = [], {"gender_imbalance": {}, "skin_tone_imbalance": {},
                          "reference": cfg.eval.bias_reference or "parity (0.5) and uniform Monk 1-10"}
    for occ, v in sorted(by_occ.items()):
        n = len(v["gender"])
        for attr, values in (("perceived gender", v["gender"]), ("perceived skin tone (Monk)", v["tone"])):
            for value, c in sorted(Counter(map(str, values)).items()):
                table.append({"occupation": occ, "attribute": attr, "value": value, "count": c, "n": n,
                              "share": c / n})
        occ_ref = ref.get(occ, {})
        woman = occ_ref.get("gender", {}).get("woman", 0.5)
        tones = {int(k): s for k, s in occ_ref.get("skin_tone", {}).items()} or None
        summary["gender_imbalance"][occ] = B.gender_imbalance(v["gender"], woman)
        summary["skin_tone_imbalance"][occ] = B.skin_tone_imbalance(v["tone"], tones)
    summary["gender_mad"] = B.mean_absolute_deviation(list(summary["gender_imbalance"].values()))
    summary["skin_tone_mad"] = B.mean_absolute_deviation(list(summary["skin_tone_imbalance"].values()))
    summary["unclear"] = sum(g == B.UNCLEAR for v in by_occ.values() for g in v["gender"])
    summary["undetected"] = sum(t == B.UNDETECTED for v in by_occ.values() for t in v["tone"])
    summary["n"] = len(idx)
    return table, per_image, summary


def measure(cfg: RunConfig, run_dir: Path, out_dir: Path) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    table = pq.read_table(out_dir / "eval_images.parquet")
    rows = [{k: v for k, v in r.items() if k not in MEASURE_COLUMNS} for r in table.to_pylist()]
    if not rows:
        raise ValueError(f"{out_dir}/eval_images.parquet has no images; run the sampler first")
    tiny = cfg.eval.model == "tiny"
    images = [Image.open(out_dir / r["file"]).convert("RGB") for r in rows]
    bundle = _clip_bundle(cfg, tiny)
    img_emb, txt_emb = _embed(bundle, images, [r["prompt"] for r in rows])
    scores = clip_score(img_emb, txt_emb).tolist()
    fk = fid_kid(cfg.eval, cfg.score.models, tiny, run_dir, images, run_dir / "eval" / "_reference")
    failures, fail_cols = _failures(cfg, rows, img_emb, bundle)
    bias_rows, bias_cols, bias_summary = _bias(cfg, rows, images, img_emb, bundle)
    for i, r in enumerate(rows):
        r["clip_score"] = scores[i]
        for col, vals in {**fail_cols, **bias_cols}.items():
            r[col] = vals[i]
    tag = out_dir.name
    metrics = [{"model": tag, "metric": "fid", "scope": "all", "value": fk["fid"], "n": len(rows)},
               {"model": tag, "metric": "kid_mean", "scope": "all", "value": fk["kid_mean"], "n": len(rows)},
               {"model": tag, "metric": "kid_std", "scope": "all", "value": fk["kid_std"], "n": len(rows)},
               {"model": tag, "metric": "clip_score", "scope": "all", "value": float(np.mean(scores)),
                "n": len(rows)}]
    for key in ("category", "prompt_id"):
        groups: dict[str, list[float]] = {}
        for r in rows:
            groups.setdefault(r[key], []).append(r["clip_score"])
        metrics += [{"model": tag, "metric": "clip_score", "scope": f"{key}:{g}", "value": float(np.mean(v)),
                     "n": len(v)} for g, v in sorted(groups.items())]
    for k in ("gender_mad", "skin_tone_mad"):
        if bias_summary.get(k) is not None:
            metrics.append({"model": tag, "metric": k, "scope": "occupations", "value": bias_summary[k],
                            "n": bias_summary["n"]})
    for r in failures:
        r["model"] = tag
    for r in bias_rows:
        r["model"] = tag
    for r in rows:
        r["model_tag"] = tag
    write_parquet(out_dir / "eval_images.parquet", pa.Table.from_pylist(rows))
    write_parquet(out_dir / "eval_metrics.parquet", pa.Table.from_pylist(metrics))
    write_parquet(out_dir / "eval_failures.parquet", _table(failures, _empty_failure(tag)))
    write_parquet(out_dir / "eval_bias.parquet", _table(bias_rows, _empty_bias(tag)))
    import diffusers
    import torchmetrics

    result = {
        "model": cfg.eval.model, "tag": tag, "tiny_model": tiny, "n_images": len(rows),
        "fid": fk["fid"], "kid_mean": fk["kid_mean"], "kid_std": fk["kid_std"], "fid_protocol": fk["protocol"],
        "clip_score": float(np.mean(scores)), "clip_score_model": ("tiny:" if tiny else "") + cfg.eval.clip_score_model,
        "failures": failures, "bias": bias_summary, "labels": cfg.eval.labels,
        "provenance": {"config": json.loads(cfg.eval.model_dump_json()), "seed": cfg.eval.seed,
                       "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                                    "torchmetrics": torchmetrics.__version__, "python": platform.python_version()}},
    }
    write_json(out_dir / "metrics.json", result)
    return result


def _table(rows: list[dict], example: dict):
    """Rows as a table; with no rows, an empty table with the example row's column types."""
    import pyarrow as pa

    return pa.Table.from_pylist(rows) if rows else pa.Table.from_pylist([example]).slice(0, 0)


def _empty_failure(tag: str) -> dict:
    return {"model": tag, "category": "", "judge": "", "n": 0, "failed": 0, "rate": 0.0, "ci_low": 0.0,
            "ci_high": 1.0, "validated": False}


def _empty_bias(tag: str) -> dict:
    return {"model": tag, "occupation": "", "attribute": "", "value": "", "count": 0, "n": 0, "share": 0.0}
