"""Measure a sampled model: CLIP score, FID/KID, per-category failure rates, bias audit.

Reads ``eval/<tag>/eval_images.parquet`` and the PNGs; writes
``metrics.json`` and the parquet tables ``eval_metrics``, ``eval_failures``,
``eval_bias`` (and adds per-image columns to ``eval_images``), all of which the
run's catalog registers.

A run folder on an object store (``runs_dir=s3://...``) is evaluated in a local staging folder,
``$XDG_CACHE_HOME/t2i_curate/eval/<run>/<tag>`` (:func:`staging_dir`; a rerun on the same machine
resumes there), by the same code as a local run; the finished folder is then uploaded to the run's
``eval/<tag>`` (:func:`publish`), ``metrics.json`` last: it marks a complete eval folder, and the
catalog reads only eval folders that have it.
"""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path
from typing import Any

import numpy as np

from t2i_curate.eval.external import shown
from t2i_curate.eval.fid import fid_kid
from t2i_curate.eval.stats import (
    CLIP_SCORE_DEFINITION,
    CLIP_SCORE_TORCHMETRICS,
    clip_cosine,
    clip_score_torchmetrics,
)
from t2i_curate.pipeline.core.config import RunConfig
from t2i_curate.pipeline.core.io import TMP_MARK, as_path, is_remote, upload, write_json, write_parquet

log = logging.getLogger(__name__)
# columns measure adds to eval_images (older eval folders also have the bias ones); stripped when re-measuring.
# Everything else measured per image is in eval_judgements.
MEASURE_COLUMNS = ("clip_score", "perceived_gender", "monk_tone", "model_tag")  # and p_fail_<judge>


def _clip_bundle(name: str, mcfg, device: str = "cpu"):
    """The eval CLIP, on ``device`` (fp16 on CUDA); its ``name`` says ``tiny:`` when the tiny stand-in ran
    and its ``sha256`` names the weights."""
    from t2i_curate.filters.clip import load_clip
    from t2i_curate.pipeline.core.devices import model_dtype

    bundle = load_clip(name, mcfg)
    bundle.model.to(device, model_dtype(device))
    return bundle


def _embed(bundle, images, prompts, batch: int = 32):
    """L2-normalised image and prompt embeddings (float32, CPU), in batches; images opened per batch."""
    import torch

    from t2i_curate.filters.clip import encode_images, encode_texts

    img_e, txt_e = [], []
    for i in range(0, len(images), batch):  # encode_* move each batch to the model's device and dtype
        img_e.append(encode_images(bundle, torch.stack([bundle.preprocess(im) for im in images[i : i + batch]])))
        txt_e.append(encode_texts(bundle, prompts[i : i + batch]))
    return torch.cat(img_e), torch.cat(txt_e)


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
        from t2i_curate.pipeline.core.errors import UserError

        raise UserError(f"{out_dir}/eval_images.parquet has no images; run the sampler first")
    return rows, _LazyImages([out_dir / r["file"] for r in rows])


def _metric_rows(tag: str, rows: list[dict], fk: dict, bias_summary: dict, nsfw: dict | None = None) -> list[dict]:
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
    for k in ("gender_mad", "skin_tone_mad", "heim_gender_mad", "heim_skin_tone_mad"):
        if bias_summary.get(k) is not None:
            out.append({"model": tag, "metric": k, "scope": "occupations", "value": bias_summary[k],
                        "n": bias_summary["n"]})
    for r in (nsfw or {}).get("rates", []):
        if r["share"] is not None:
            scope = "all" if r["category"] == "all" else f"category:{r['category']}"
            out.append({"model": tag, "metric": f"nsfw_share_{r['detector']}", "scope": scope, "value": r["share"],
                        "n": r["n"]})
    return out


def _input_problems(out_dir: Path) -> dict | None:
    """Counts of images without prompts, prompts without images and unreadable images (``--images``)."""
    path = out_dir / "input_problems.json"
    return json.loads(path.read_text()) if path.exists() else None


def _shown(v: Any) -> Any:
    """Settings as metrics.json keeps them: a path that is not UTF-8 (surrogateescape) with ``\\xNN`` escapes
    (pydantic's JSON refuses such strings)."""
    if isinstance(v, str):
        return shown(v)
    if isinstance(v, dict):
        return {k: _shown(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_shown(x) for x in v]
    return v


def _versions() -> dict[str, str]:
    import diffusers
    import torch
    import torchmetrics

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "torchmetrics": torchmetrics.__version__, "python": platform.python_version()}


def _annotate(rows: list[dict], tag: str, scores: list[float], fail_cols: dict[str, list]) -> None:
    """The sampler's rows gain the CLIP score and each judge's P(failure) (``eval_images``)."""
    for i, r in enumerate(rows):
        r["clip_score"] = scores[i]
        r.update({c: v[i] for c, v in fail_cols.items() if c.startswith("p_fail_")})
        r["model_tag"] = tag


def _write_tables(out_dir: Path, tag: str, rows, judgements, tables) -> None:
    """``eval_images``, ``eval_judgements`` (everything measured per image) and the aggregate tables."""
    import pyarrow as pa

    write_parquet(out_dir / "eval_images.parquet", pa.Table.from_pylist(rows))
    write_parquet(out_dir / "eval_judgements.parquet", pa.Table.from_pylist(judgements))
    for name, (table_rows, example) in tables.items():
        for r in table_rows:
            r["model"] = tag
        write_parquet(out_dir / f"{name}.parquet", _table(table_rows, example))


def _judgement_rows(tag: str, rows: list[dict], scores: list[float], columns: dict[str, list]) -> list[dict]:
    """One row per image: its file, prompt and category, CLIP score, and every per-image column the
    judges, the bias audit and the NSFW detectors wrote (None where they did not look)."""
    out = []
    for i, r in enumerate(rows):
        out.append({"model": tag, "image_id": r["image_id"], "file": r["file"], "prompt_id": r.get("prompt_id"),
                    "category": r["category"], "clip_score": scores[i],
                    **{c: v[i] for c, v in columns.items()}})
    return out


def _models_used(cfg, mcfg, bundle, fk: dict, judges: dict, bias_summary: dict, extra: dict | None = None) -> dict:
    """What ran, per output: library, model and weights' sha256 (or tiny). The report prints it as a table."""
    feature = fk["protocol"]["feature"]
    out = {"clip_score": bundle.provenance(),
           "fid_features": {"name": feature, "weights_sha256": fk["feature_weights"]}}
    out.update({f"judge {n}": j["models"] for n, j in judges.items() if j.get("ran")})
    if bias_summary.get("models"):
        out["bias audit"] = bias_summary["models"]
    out.update(extra or {})
    return out


def _judge(cfg: RunConfig, rows, img_emb, bundle, out_dir: Path, device: str):
    """The judges' rates and per-image columns, with drawn examples of what the MediaPipe judges saw
    (the old examples are replaced)."""
    import shutil

    from t2i_curate.eval.examples import save_examples
    from t2i_curate.eval.judging import run_judges

    shutil.rmtree(out_dir / "examples", ignore_errors=True)
    examples: list[dict] = []
    holder: dict[str, dict] = {}

    def keep(judge, category, idx):
        examples.extend(save_examples(judge, category, idx, rows, holder["columns"], out_dir))

    failures, columns, judges = run_judges(cfg, rows, img_emb, bundle, out_dir, device, on_judged=keep,
                                           columns_out=holder)
    return failures, columns, judges, examples


def measure(cfg: RunConfig, run_dir: Path, out_dir: Path) -> dict[str, Any]:
    """CLIP score, FID/KID, failure rates, bias and NSFW rates of the images in ``out_dir``; writes the
    tables and ``metrics.json`` and returns its content."""
    from t2i_curate.eval.bias import bias_audit
    from t2i_curate.eval.examples import census
    from t2i_curate.eval.nsfw import nsfw_audit
    from t2i_curate.pipeline.core.devices import pick_device
    from t2i_curate.pipeline.core.layout import RunLayout

    rows, images = _load_images(out_dir)
    mcfg, device = eval_models(cfg), pick_device(cfg.eval.device)
    tiny = mcfg.preset == "tiny"
    bundle = _clip_bundle(cfg.eval.clip_score_model, mcfg, device)
    img_emb, txt_emb = _embed(bundle, images, [r["prompt"] for r in rows])
    cos = clip_cosine(img_emb, txt_emb)
    scores = (100 * cos.clamp(min=0)).tolist()  # stats.clip_score: the paper's per-image clamp
    # CLIP, FID/KID, judges and bias open the images from disk, a batch (or one) at a time
    fk = fid_kid(cfg.eval, mcfg, tiny, run_dir, images.paths, RunLayout(run_dir).reference_cache)
    failures, fail_cols, judges, examples = _judge(cfg, rows, img_emb, bundle, out_dir, device)
    bias_rows, bias_cols, bias_summary = bias_audit(cfg.eval, rows, images.paths, bundle, img_emb)
    nsfw_cols, nsfw = nsfw_audit(rows, images.paths, img_emb, bundle, mcfg)
    census_cols, census_info = census(rows, images.paths) if cfg.eval.census else ({}, {"ran": False})
    tag = out_dir.name
    _annotate(rows, tag, scores, fail_cols)
    bias_cols = {("bias_" + k if k in census_cols else k): v for k, v in bias_cols.items()}  # faces: census's
    judgements = _judgement_rows(tag, rows, scores, {**census_cols, **fail_cols, **bias_cols, **nsfw_cols})
    _write_tables(out_dir, tag, rows, judgements, {
        "eval_metrics": (_metric_rows(tag, rows, fk, bias_summary, nsfw), None),
        "eval_failures": (failures, _empty_failure(tag)), "eval_bias": (bias_rows, _empty_bias(tag))})
    result = {
        "model": f"images in {cfg.eval.images}" if cfg.eval.images else cfg.eval.model, "tag": tag,
        "tiny_model": cfg.eval.model == "tiny" and not cfg.eval.images, "tiny_eval_models": tiny,
        "n_images": len(rows), "fid": fk["fid"], "kid_mean": fk["kid_mean"], "kid_std": fk["kid_std"],
        "fid_protocol": fk["protocol"], "clip_score": float(np.mean(scores)), "clip_score_model": bundle.name,
        "clip_score_definition": CLIP_SCORE_DEFINITION,
        "clip_score_torchmetrics": clip_score_torchmetrics(cos), "clip_score_torchmetrics_definition":
            CLIP_SCORE_TORCHMETRICS,
        "failures": failures, "judges": judges, "bias": bias_summary, "labels": cfg.eval.labels,
        "input_problems": _input_problems(out_dir), "device": device, "census": census_info,
        "examples": examples, "nsfw": nsfw,
        "models": _models_used(cfg, mcfg, bundle, fk, judges, bias_summary, {
            **({"census": census_info["models"]} if census_info.get("models") else {}),
            **{f"nsfw {k}": v for k, v in nsfw["detectors"].items()}}),
        "provenance": {"config": _shown(cfg.eval.model_dump(mode="json")), "seed": cfg.eval.seed,
                       "eval_models": "tiny" if tiny else "real", "versions": _versions(),
                       "run_dir": shown(str(cfg.run_dir))},  # the evaluated run (a URL for a run on a store)
    }
    write_json(out_dir / "metrics.json", result)
    return result


def _table(rows: list[dict], example: dict | None):
    """Rows as a table; with no rows, an empty table with the example row's column types."""
    import pyarrow as pa

    return pa.Table.from_pylist(rows) if rows or example is None else pa.Table.from_pylist([example]).slice(0, 0)


def _empty_failure(tag: str) -> dict:
    return {"model": tag, "category": "", "judge": "", "n": 0, "failed": 0, "rate": 0.0, "ci_low": 0.0,
            "ci_high": 1.0, "unknown": 0, "validated": False}


def _empty_bias(tag: str) -> dict:
    return {"model": tag, "occupation": "", "attribute": "", "value": "", "count": 0, "n": 0, "share": 0.0}


def eval_dir(cfg: RunConfig) -> Path:
    """``runs/<name>/eval/<tag>``; the tag defaults to the model name made file-safe (a ``UPath`` when the
    run is on an object store: see :func:`work_dir` for where eval writes)."""
    from t2i_curate.pipeline.core.layout import RunLayout

    source = f"images-{Path(cfg.eval.images).resolve().name}" if cfg.eval.images else cfg.eval.model.strip("/")
    tag = cfg.eval.tag or "".join(c if c.isalnum() or c in "-_." else "_" for c in source)
    return RunLayout(cfg.run_dir).eval_dir(tag)


def staging_root(run_dir) -> Path:
    """The local folder where the evals of a run on an object store are made (``layout.local_cache``:
    ``$XDG_CACHE_HOME/t2i_curate/eval/<first 16 hex of sha256 of the run URL>``, default ``~/.cache``)."""
    from t2i_curate.pipeline.core.layout import local_cache

    return local_cache("eval", as_path(run_dir))


def staging_dir(run_dir, tag: str) -> Path:
    """The local staging folder of eval ``tag`` of a remote run (see :func:`staging_root`)."""
    return staging_root(run_dir) / tag


def work_dir(cfg: RunConfig) -> Path:
    """Where eval samples, measures and reports: the eval folder itself, or its local staging folder
    when the run is on an object store."""
    final = eval_dir(cfg)
    return staging_dir(cfg.run_dir, final.name) if is_remote(final) else final


def local_eval_folder(folder) -> Path:
    """An eval folder as a local path: a remote one (``s3://.../runs/<name>/eval/<tag>``) maps to its
    staging folder on this machine, which must hold the finished eval (its ``metrics.json``)."""
    folder = as_path(folder)
    if not is_remote(folder):
        return folder
    local = staging_dir(folder.parent.parent, folder.name)
    if not (local / "metrics.json").exists():
        from t2i_curate.pipeline.core.errors import UserError

        raise UserError(f"{folder} is on an object store and this machine has no finished copy of it in its "
                        f"staging folder {local}: run `curate eval` for that run here (it stages there, then "
                        f"uploads), or download the folder and pass the local copy")
    return local


def publish(local: Path, remote) -> int:
    """Upload every file of the staging folder ``local`` to the remote eval folder; return how many.

    The remote ``metrics.json`` is removed first and uploaded last (the completion marker: the catalog
    reads only eval folders that have it); remote files the staging folder no longer has are removed.
    The marker goes to a temporary key, then to its final key (io.atomic_path); a PUT is atomic per object,
    so the other files are written in place. A failed upload leaves the folder without its marker (never
    read); the next `curate eval` publishes again from the staging folder."""
    remote = as_path(remote)
    marker = remote / "metrics.json"
    if marker.exists():
        marker.unlink()
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*")
                   if p.is_file() and not p.name.startswith(TMP_MARK))
    files.sort(key=lambda name: name == "metrics.json")  # stable: the marker last
    root = remote.path.rstrip("/")
    if remote.fs.isdir(root):
        stale = [k for k in remote.fs.find(root) if k[len(root) + 1:] not in files]
        if stale:
            remote.fs.rm(stale)
    for name in files:  # readers wait for the marker: only it needs the temporary key and the move
        if name == "metrics.json":
            upload(local / name, remote / name)
        else:
            remote.fs.put_file(str(local / name), (remote / name).path)
    log.info("eval: uploaded %d files from %s to %s", len(files), local, remote)
    return len(files)


def _check_run(cfg: RunConfig) -> None:
    """Refuse before any work: no curated shards for ``eval.reference=run``, or a bad judge setting."""
    from t2i_curate.eval.judge import configured_judges
    from t2i_curate.pipeline.core.layout import RunLayout

    if cfg.eval.reference == "run" and not RunLayout(cfg.run_dir).manifest.exists():
        from t2i_curate.pipeline.core.errors import StageOrderError

        raise StageOrderError(f"eval.reference=run but {cfg.run_dir} has no curated shards: run `make filter` "
                              f"(curate run) first, or set eval.reference to a folder")
    configured_judges(cfg.eval.judges, None, {}, cfg.eval.judge_options)  # a bad judge setting: refused now


def _clean_root_tmp(root) -> int:
    """Temporary files (keys) directly in the run folder (the catalog's), not below it."""
    root = as_path(root)
    if is_remote(root):
        if not root.fs.isdir(root.path):
            return 0
        found = [i["name"] for i in root.fs.ls(root.path, detail=True)
                 if i.get("type") == "file" and i["name"].rstrip("/").rsplit("/", 1)[-1].startswith(TMP_MARK)]
        if found:
            root.fs.rm(found)
        return len(found)
    if not root.is_dir():
        return 0
    found = [p for p in root.glob(f"{TMP_MARK}*") if p.is_file()]
    for p in found:
        p.unlink()
    return len(found)


def clean_eval_tmp(cfg: RunConfig) -> int:
    """Remove what an interrupted eval left under ``.tmp-`` names: in the run's eval folders and reference
    cache (local; for a run on an object store, this machine's staging folders and this tag's remote eval
    folder), and the catalog's temporary beside ``catalog.duckdb``. Only under the run's lock (``curate eval``
    holds it): no other writer of the run is running. Returns how many were removed."""
    from t2i_curate.pipeline.core.io import clean_tmp
    from t2i_curate.pipeline.core.layout import RunLayout

    lay = RunLayout(cfg.run_dir)
    final = eval_dir(cfg)
    n = 0
    if is_remote(final):  # the reference cache is in the staging root (layout.reference_cache)
        n += clean_tmp(staging_root(cfg.run_dir)) + clean_tmp(final)
    else:
        n += clean_tmp(lay.eval)  # every tag's folder and _reference/
    n += _clean_root_tmp(lay.root)
    if n:
        log.info("eval: removed %d temporary file(s) left by an interrupted eval", n)
    return n


def run_eval(cfg: RunConfig) -> dict[str, Any]:
    """``curate eval``: sample the model over the suites, measure, report, register the tables.

    Returns ``metrics.json``'s content plus ``seconds`` per step, the ``report`` path (local: in the
    staging folder for a run on an object store) and the ``eval_dir``.
    """
    import time

    from t2i_curate.eval.report import build_report
    from t2i_curate.eval.sampler import sample
    from t2i_curate.eval.suites import load_suites
    from t2i_curate.pipeline.core.catalog import refresh_catalog

    _check_run(cfg)
    clean_eval_tmp(cfg)
    final, out = eval_dir(cfg), work_dir(cfg)
    if out != final:
        log.info("eval: %s is on an object store; working in %s, uploaded when finished", final, out)
    t = time.perf_counter()
    external = None
    if cfg.eval.images:  # images made elsewhere: measured as they are
        from t2i_curate.eval.external import external_images

        if not cfg.eval.prompts:
            from t2i_curate.pipeline.core.errors import UserError

            raise UserError("--images needs --prompts FILE: which prompt and category each image file answers")
        external = external_images(Path(cfg.eval.images), Path(cfg.eval.prompts), out)
    else:
        prompts = load_suites(cfg.eval.suites, cfg.eval.max_prompts_per_suite)
        sample(cfg.eval, prompts, out, executor=cfg.executor, workers=cfg.workers, ray_cfg=cfg.ray)
    seconds = {"sample": time.perf_counter() - t}
    t = time.perf_counter()
    m = measure(cfg, cfg.run_dir, out)  # writes metrics.json: the catalog's eval views need it
    seconds["measure"] = time.perf_counter() - t
    html_path, _ = build_report(out)
    if out != final:
        t = time.perf_counter()
        publish(out, final)
        seconds["upload"] = time.perf_counter() - t
    refresh_catalog(cfg.run_dir)
    return {**m, "seconds": seconds, "report": str(html_path), "eval_dir": str(final),
            "input_problems": external}
