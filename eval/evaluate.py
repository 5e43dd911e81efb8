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

from t2i_curate.eval import bias as B  # noqa: N812
from t2i_curate.eval.fid import fid_kid
from t2i_curate.eval.stats import (
    CLIP_SCORE_DEFINITION,
    CLIP_SCORE_TORCHMETRICS,
    agreement,
    clip_cosine,
    clip_score_torchmetrics,
    corrected_rate,
    wilson,
)
from t2i_curate.pipeline.config import RunConfig
from t2i_curate.pipeline.io import write_json, write_parquet

log = logging.getLogger(__name__)
MEASURE_COLUMNS = ("clip_score", "perceived_gender", "monk_tone")  # and p_fail_<judge>: rewritten by measure


def _clip_bundle(name: str, mcfg):
    """The eval CLIP; its ``name`` says ``tiny:`` when the tiny stand-in ran."""
    from t2i_curate.filters.clip import load_clip

    return load_clip(name, mcfg)


def _embed(bundle, images, prompts):
    """L2-normalised image and prompt embeddings, in batches of 32."""
    import torch

    from t2i_curate.filters.clip import encode_images, encode_texts

    img_e, txt_e = [], []
    for i in range(0, len(images), 32):
        img_e.append(encode_images(bundle, torch.stack([bundle.preprocess(im) for im in images[i : i + 32]])))
        txt_e.append(encode_texts(bundle, prompts[i : i + 32]))
    return torch.cat(img_e), torch.cat(txt_e)


def _rate_row(category: str, judge, p: list[float], lab_y: list[bool], lab_p: list[float]) -> dict[str, Any]:
    """One ``eval_failures`` row: rate with its Wilson interval, and agreement when labels exist."""
    failed = [x > 0.5 for x in p]
    k, n = sum(failed), len(failed)
    lo, hi = wilson(k, n)
    row: dict[str, Any] = {"category": category, "judge": judge.name, "n": n, "failed": k, "rate": k / n,
                           "ci_low": lo, "ci_high": hi, "validated": judge.validated}
    if lab_y:
        ag = agreement(lab_y, [x > 0.5 for x in lab_p])
        row.update(ag)
        row["corrected_rate"] = corrected_rate(k / n, ag["recall"], ag["specificity"])
    return row


def _failures(cfg, rows, img_emb, bundle, out_dir: Path) -> tuple[list[dict], dict[str, list], dict]:
    """Per-category failure rates for each configured judge, with agreement when labels exist."""
    from t2i_curate.eval.judge import configured_judges, read_labels

    labels = read_labels(cfg.eval.labels) if cfg.eval.labels else {}
    judges = configured_judges(cfg.eval.judges, bundle, labels)
    for j in judges:
        j.image_dir = out_dir
    out_rows, per_image = [], {f"p_fail_{j.name}": [None] * len(rows) for j in judges}
    for category in sorted({r["category"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["category"] == category]
        cat_rows = [rows[i] for i in idx]
        lab = [j for j, r in enumerate(cat_rows) if r["image_id"] in labels]
        lab_y = [labels[cat_rows[j]["image_id"]] for j in lab]
        for judge in (j for j in judges if category in j.categories):
            res = judge.p_fail(category, cat_rows, img_emb[idx])
            if res is None:
                continue
            p, oof = res
            for j, i in enumerate(idx):
                per_image[f"p_fail_{judge.name}"][i] = p[j]
            out_rows.append(_rate_row(category, judge, p, lab_y, oof if oof is not None else [p[j] for j in lab]))
    ran = {r["judge"] for r in out_rows}
    info = {j.name: {"description": j.description, "validated": j.validated, "categories": list(j.categories),
                     "ran": j.name in ran, **j.provenance()} for j in judges}
    return out_rows, per_image, info


def _bias(cfg, rows, images, img_emb, bundle) -> tuple[list[dict], dict[str, list], dict[str, Any]]:
    import torch

    idx = [i for i, r in enumerate(rows) if r.get("occupation")]
    per_image: dict[str, list] = {"perceived_gender": [None] * len(rows), "monk_tone": [None] * len(rows)}
    if not idx:
        return [], per_image, {}
    from t2i_curate.filters.clip import encode_texts

    t = encode_texts(bundle, list(B.GENDER_PROMPTS.values()))
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


def eval_models(cfg: RunConfig):
    """Eval's own model settings: tiny CLIPs only for the tiny pipeline (``eval.models: auto``) or when
    asked; the weight locations are the scoring ones. Every output names the models that ran."""
    tiny_pipeline = cfg.eval.model == "tiny" and not cfg.eval.images
    preset = cfg.eval.models if cfg.eval.models != "auto" else ("tiny" if tiny_pipeline else "real")
    return cfg.score.models.model_copy(update={"preset": preset})


class _LazyImages:
    """The eval PNGs as a read-only sequence, each opened when indexed (a slice: a list), so that measure
    never holds every image at once."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        with Image.open(self.paths[i]) as im:
            return im.convert("RGB")


def _load_images(out_dir: Path) -> tuple[list[dict], _LazyImages]:
    import pyarrow.parquet as pq

    table = pq.read_table(out_dir / "eval_images.parquet")
    rows = [{k: v for k, v in r.items() if k not in MEASURE_COLUMNS and not k.startswith("p_fail_")}
            for r in table.to_pylist()]
    if not rows:
        from t2i_curate.pipeline.errors import UserError

        raise UserError(f"{out_dir}/eval_images.parquet has no images; run the sampler first")
    return rows, _LazyImages([out_dir / r["file"] for r in rows])


def _metric_rows(tag: str, rows: list[dict], fk: dict, bias_summary: dict) -> list[dict]:
    """The ``eval_metrics`` table: FID/KID, CLIP score overall, per category and prompt, bias MADs."""
    n = len(rows)
    out = [{"model": tag, "metric": m, "scope": "all", "value": fk[m], "n": n} for m in ("fid", "kid_mean", "kid_std")]
    out.append({"model": tag, "metric": "clip_score", "scope": "all",
                "value": float(np.mean([r["clip_score"] for r in rows])), "n": n})
    for key in ("category", "prompt_id"):
        groups: dict[str, list[float]] = {}
        for r in rows:
            groups.setdefault(r[key], []).append(r["clip_score"])
        out += [{"model": tag, "metric": "clip_score", "scope": f"{key}:{g}", "value": float(np.mean(v)),
                 "n": len(v)} for g, v in sorted(groups.items())]
    for k in ("gender_mad", "skin_tone_mad"):
        if bias_summary.get(k) is not None:
            out.append({"model": tag, "metric": k, "scope": "occupations", "value": bias_summary[k],
                        "n": bias_summary["n"]})
    return out


def _input_problems(out_dir: Path) -> dict | None:
    """Counts of images without prompts, prompts without images and unreadable images (``--images``)."""
    path = out_dir / "input_problems.json"
    return json.loads(path.read_text()) if path.exists() else None


def _versions() -> dict[str, str]:
    import diffusers
    import torch
    import torchmetrics

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "torchmetrics": torchmetrics.__version__, "python": platform.python_version()}


def measure(cfg: RunConfig, run_dir: Path, out_dir: Path) -> dict[str, Any]:
    """CLIP score, FID/KID, failure rates and bias of the sampled images in ``out_dir``; writes the
    tables and ``metrics.json`` and returns its content."""
    import pyarrow as pa

    from t2i_curate.pipeline.layout import RunLayout

    rows, images = _load_images(out_dir)
    mcfg = eval_models(cfg)
    tiny = mcfg.preset == "tiny"
    bundle = _clip_bundle(cfg.eval.clip_score_model, mcfg)
    img_emb, txt_emb = _embed(bundle, images, [r["prompt"] for r in rows])
    cos = clip_cosine(img_emb, txt_emb)
    scores = (100 * cos.clamp(min=0)).tolist()  # stats.clip_score: the paper's per-image clamp
    # CLIP, FID/KID and bias open the PNGs from disk, 32 (or one) at a time
    fk = fid_kid(cfg.eval, mcfg, tiny, run_dir, images.paths, RunLayout(run_dir).reference_cache)
    failures, fail_cols, judges = _failures(cfg, rows, img_emb, bundle, out_dir)
    bias_rows, bias_cols, bias_summary = _bias(cfg, rows, images, img_emb, bundle)
    tag = out_dir.name
    for i, r in enumerate(rows):
        r["clip_score"] = scores[i]
        r.update({col: vals[i] for col, vals in {**fail_cols, **bias_cols}.items()})
        r["model_tag"] = tag
    for r in failures + bias_rows:
        r["model"] = tag
    write_parquet(out_dir / "eval_images.parquet", pa.Table.from_pylist(rows))
    write_parquet(out_dir / "eval_metrics.parquet", pa.Table.from_pylist(_metric_rows(tag, rows, fk, bias_summary)))
    write_parquet(out_dir / "eval_failures.parquet", _table(failures, _empty_failure(tag)))
    write_parquet(out_dir / "eval_bias.parquet", _table(bias_rows, _empty_bias(tag)))
    result = {
        "model": f"images in {cfg.eval.images}" if cfg.eval.images else cfg.eval.model, "tag": tag,
        "tiny_model": cfg.eval.model == "tiny" and not cfg.eval.images, "tiny_eval_models": tiny,
        "n_images": len(rows), "fid": fk["fid"], "kid_mean": fk["kid_mean"], "kid_std": fk["kid_std"],
        "fid_protocol": fk["protocol"], "clip_score": float(np.mean(scores)), "clip_score_model": bundle.name,
        "clip_score_definition": CLIP_SCORE_DEFINITION,
        "clip_score_torchmetrics": clip_score_torchmetrics(cos), "clip_score_torchmetrics_definition":
            CLIP_SCORE_TORCHMETRICS,
        "failures": failures, "judges": judges, "bias": bias_summary, "labels": cfg.eval.labels,
        "input_problems": _input_problems(out_dir),
        "provenance": {"config": json.loads(cfg.eval.model_dump_json()), "seed": cfg.eval.seed,
                       "eval_models": "tiny" if tiny else "real", "versions": _versions()},
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


def eval_dir(cfg: RunConfig) -> Path:
    """``runs/<name>/eval/<tag>``; the tag defaults to the model name made file-safe."""
    from t2i_curate.pipeline.layout import RunLayout

    source = f"images-{Path(cfg.eval.images).resolve().name}" if cfg.eval.images else cfg.eval.model.strip("/")
    tag = cfg.eval.tag or "".join(c if c.isalnum() or c in "-_." else "_" for c in source)
    return RunLayout(cfg.run_dir).eval_dir(tag)


def run_eval(cfg: RunConfig) -> dict[str, Any]:
    """``curate eval``: sample the model over the suites, measure, report, register the tables.

    Returns ``metrics.json``'s content plus ``seconds`` per step and the ``report`` path.
    """
    import time

    from t2i_curate.eval.report import build_report
    from t2i_curate.eval.sampler import sample
    from t2i_curate.eval.suites import load_suites
    from t2i_curate.pipeline.catalog import refresh_catalog
    from t2i_curate.pipeline.layout import RunLayout

    if cfg.eval.reference == "run" and not RunLayout(cfg.run_dir).manifest.exists():
        from t2i_curate.pipeline.selection import StageOrderError

        raise StageOrderError(f"eval.reference=run but {cfg.run_dir} has no curated shards: run `make filter` "
                              f"(curate run) first, or set eval.reference to a folder")
    out = eval_dir(cfg)
    t = time.perf_counter()
    external = None
    if cfg.eval.images:  # images made elsewhere: measured as they are
        from t2i_curate.eval.external import external_images

        if not cfg.eval.prompts:
            from t2i_curate.pipeline.errors import UserError

            raise UserError("--images needs --prompts FILE: which prompt and category each image file answers")
        external = external_images(Path(cfg.eval.images), Path(cfg.eval.prompts), out)
    else:
        prompts = load_suites(cfg.eval.suites, cfg.eval.max_prompts_per_suite)
        sample(cfg.eval, prompts, out, executor=cfg.executor, workers=cfg.workers, ray_cfg=cfg.ray)
    seconds = {"sample": time.perf_counter() - t}
    t = time.perf_counter()
    m = measure(cfg, cfg.run_dir, out)
    seconds["measure"] = time.perf_counter() - t
    html_path, _ = build_report(out)
    refresh_catalog(cfg.run_dir)
    return {**m, "seconds": seconds, "report": str(html_path), "input_problems": external}
