"""`make bench`: each stage against a baseline measured in the same run.

Every measured step runs in its own subprocess (``--step NAME``) so its peak
RSS (``resource.getrusage`` of itself and its children) is its own. Results go
to ``bench/results.json`` and a Markdown table in ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
log = logging.getLogger("bench")


def _peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024


def _cfg(n: int, workers: int, name: str = "bench", extra: tuple = ()):
    from pipeline.config import load_config

    return load_config("demo", [f"runs_dir={OUT / 'runs'}", f"name={name}", f"input.demo_size={n}",
                                f"workers={workers}", f"download.processes={workers}", *extra])


# --- steps (each in its own process) -------------------------------------------------------------


def step_download(n: int, workers: int, bare: bool) -> dict:
    from pipeline.demo import serve_demo
    from pipeline.download import _img2dataset_kwargs, download_stage, prepare_input, run_img2dataset
    from pipeline.runfolder import prepare_run

    cfg = _cfg(n, workers, "bench" if not bare else "bare")
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    with serve_demo(OUT / "runs" / "_demo", n) as urls:
        run = prepare_run(cfg)
        if bare:  # img2dataset alone, same settings, on the same normalised input
            path, extras = prepare_input(run, urls, cfg.input)
            t = time.perf_counter()
            run_img2dataset(path, run / "download", _img2dataset_kwargs(cfg, extras))
        else:
            t = time.perf_counter()
            download_stage(cfg, run, urls)
        dt = time.perf_counter() - t
    rows = n + n // 60 * 3
    return {"seconds": dt, "items": rows, "rate": rows / dt}


def _decode_only_shard(run_dir: str, shard: int) -> int:
    """Baseline: read the tar, decode every image and build the same input tensors, no models."""
    import open_clip
    import pyarrow.parquet as pq

    from pipeline.decode import decode_image
    from pipeline.models import OPENAI_MEAN, OPENAI_STD, watermark_transform

    clip_t = open_clip.image_transform(224, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)
    wm_t = watermark_transform()
    run = Path(run_dir)
    ok = {r["key"] for r in pq.read_table(run / "download" / f"{shard:05d}.parquet").to_pylist()
          if r["status"] == "success"}
    n = 0
    with tarfile.open(run / "download" / f"{shard:05d}.tar") as tf:
        for m in tf:
            key, _, ext = m.name.partition(".")
            if key in ok and ext == "jpg":
                img = decode_image(tf.extractfile(m).read())
                clip_t(img), wm_t(img)
                n += 1
    return n


def _init_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def step_decode(n: int, workers: int, shards: int) -> dict:
    from pipeline.download import finished_shards
    from pipeline.executors import map_shards
    from pipeline.score import score_processes

    run = OUT / "runs" / "bench"
    ids = finished_shards(run / "download")[:shards]
    workers = score_processes(_cfg(n, workers), len(ids))  # the same number of processes as scoring
    t = time.perf_counter()
    res = map_shards(partial(_decode_only_shard, str(run)), ids, workers=workers, desc="decode baseline",
                     initializer=_init_threads, initargs=(max(1, (os.cpu_count() or 1) // workers),))
    dt = time.perf_counter() - t
    n = sum(res.results.values())
    return {"seconds": dt, "items": n, "rate": n / dt}


def step_score(n: int, workers: int, shards: int, executor: str = "local") -> dict:
    from pipeline.download import finished_shards
    from pipeline.score import score_stage

    cfg = _cfg(n, workers, extra=(f"executor={executor}", f"ray.num_cpus={workers}"))
    run = cfg.run_dir
    shutil.rmtree(run / "scores", ignore_errors=True)
    ids = finished_shards(run / "download")[:shards]
    t = time.perf_counter()
    out = score_stage(cfg, run, ids)
    dt = time.perf_counter() - t
    items = out["scored"] + out["failed"]
    return {"seconds": dt, "items": items, "rate": items / dt}


def step_real_sizes(batch: int) -> dict:
    """Real architectures (ViT-L/14, ViT-B/32, EfficientNet-B3 + LAION head), random weights, CPU."""
    import open_clip
    import torch

    from pipeline.models import aesthetic_mlp, watermark_model

    torch.manual_seed(0)
    l14 = open_clip.create_model("ViT-L-14", pretrained=None).eval()
    b32 = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    wm = watermark_model().eval()
    head = aesthetic_mlp(768).eval()
    tok = open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat"] * batch)
    x224, x256 = torch.randn(batch, 3, 224, 224), torch.randn(batch, 3, 256, 256)
    with torch.inference_mode():
        b32.encode_image(x224[:1])  # warm-up
        t = time.perf_counter()
        head(torch.nn.functional.normalize(l14.encode_image(x224), dim=-1))
        b32.encode_image(x224), b32.encode_text(tok)
        torch.softmax(wm(x256), -1)
        dt = time.perf_counter() - t
    return {"seconds": dt, "items": batch, "rate": batch / dt}


def step_write(n: int, workers: int, limit: int | None = None) -> dict:
    from pipeline.selection import select_stage
    from pipeline.write import write_stage

    rules = f"select.rules=[{{name: first, keep: 'input_row < {limit}'}}]" if limit else "select.rules=[]"
    cfg = _cfg(n, workers, extra=(rules,))
    run = cfg.run_dir
    select_stage(cfg, run)
    for p in list((run / "selected").glob("0*")):
        p.unlink()
    t = time.perf_counter()
    write_stage(cfg, run)
    dt = time.perf_counter() - t
    mb = sum(p.stat().st_size for p in (run / "selected").glob("*.tar")) / 1e6
    import json as _json

    samples = _json.loads((run / "selected" / "manifest.json").read_text())["samples"]
    return {"seconds": dt, "items": mb, "rate": mb / dt, "unit": "MB/s", "samples": samples}


def step_sample(prompts: int) -> dict:
    """Tiny sampler throughput at the demo's eval settings (64 px, 4 steps, batch 8)."""
    from eval.sampler import sample
    from pipeline.config import EvalConfig

    out = OUT / "sample"
    shutil.rmtree(out, ignore_errors=True)
    cfg = EvalConfig(height=64, width=64, steps=4, samples_per_prompt=2, batch_size=8)
    plan = [{"id": f"p{i}", "category": "general", "prompt": f"a photo number {i}"} for i in range(prompts)]
    t = time.perf_counter()
    sample(cfg, plan, out)
    dt = time.perf_counter() - t
    return {"seconds": dt, "items": 2 * prompts, "rate": 2 * prompts / dt}


def step_fid_features(n: int, real_size: bool) -> dict:
    """FID feature extraction on uint8 299 px images: tiny CLIP, or ViT-L/14 at real size (random weights)."""
    import open_clip
    import torch

    from eval.metrics import clip_feature_module
    from pipeline.models import ClipBundle, tiny_clip

    if real_size:
        m = open_clip.create_model("ViT-L-14", pretrained=None).eval()
        bundle = ClipBundle("ViT-L-14 (random)", m, None, None, 768, False)
    else:
        bundle = tiny_clip("ViT-L-14/openai")
    f = clip_feature_module(bundle)
    x = torch.randint(0, 255, (n, 3, 299, 299), dtype=torch.uint8)
    f(x[:2])
    t = time.perf_counter()
    for i in range(0, n, 32):
        f(x[i : i + 32])
    dt = time.perf_counter() - t
    return {"seconds": dt, "items": n, "rate": n / dt}


def step_tar_copy() -> dict:
    """Baseline: copy every member of every download tar into new tars (no selection, no json)."""
    run = OUT / "runs" / "bench"
    dst = OUT / "tarcopy"
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    t = time.perf_counter()
    for src in sorted((run / "download").glob("0*.tar")):
        with tarfile.open(src) as a, tarfile.open(dst / src.name, "w") as b:
            for m in a:
                b.addfile(m, a.extractfile(m))
    dt = time.perf_counter() - t
    mb = sum(p.stat().st_size for p in dst.glob("*.tar")) / 1e6
    return {"seconds": dt, "items": mb, "rate": mb / dt, "unit": "MB/s"}


QUERY = """SELECT shard, count(*) AS n, avg(aesthetic_score) AS aesthetic
FROM scores WHERE shorter_side >= 512 AND pwatermark < 0.5 AND aesthetic_score >= 5
GROUP BY shard ORDER BY shard"""


def _synthetic_scores(rows: int) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = OUT / f"scores_{rows}.parquet"
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    t = pa.table({
        "key": np.arange(rows, dtype=np.int64),
        "shard": (np.arange(rows) // 10_000).astype(np.int32),
        "shorter_side": rng.integers(64, 2048, rows).astype(np.int32),
        "pwatermark": rng.random(rows, dtype=np.float32),
        "aesthetic_score": (rng.normal(5, 1, rows)).astype(np.float32),
        "similarity": rng.random(rows, dtype=np.float32) * 0.5,
    })
    pq.write_table(t, path, row_group_size=1_000_000)
    return path


def step_query(rows: int, engine: str) -> dict:
    path = _synthetic_scores(rows)
    times = []
    for _ in range(3):  # best of three for both engines: warm file cache, no first-call costs
        if engine == "duckdb":
            import duckdb

            con = duckdb.connect()
            con.execute(f"CREATE VIEW scores AS SELECT * FROM read_parquet('{path}')")
            t = time.perf_counter()
            con.execute(QUERY).fetchall()
        else:
            import pandas as pd

            t = time.perf_counter()
            df = pd.read_parquet(path)
            m = df[(df.shorter_side >= 512) & (df.pwatermark < 0.5) & (df.aesthetic_score >= 5)]
            m.groupby("shard").agg(n=("key", "size"), aesthetic=("aesthetic_score", "mean")).sort_index()
        times.append(time.perf_counter() - t)
    dt = min(times)
    return {"seconds": dt, "items": rows, "rate": rows / dt}


STEPS = {"download": step_download, "decode": step_decode, "score": step_score, "real_sizes": step_real_sizes,
         "write": step_write, "tar_copy": step_tar_copy, "query": step_query, "sample": step_sample,
         "fid_features": step_fid_features}


# --- driver -------------------------------------------------------------------------------------


def run_step(name: str, **kw) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    p = subprocess.run([sys.executable, __file__, "--step", name, "--kwargs", json.dumps(kw)],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"bench step {name} failed:\n{p.stderr[-3000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    log.info("%-12s %s -> %.1f %s in %.1f s, peak RSS %.0f MB", name, kw, out["rate"], out.get("unit", "items/s"),
             out["seconds"], out["peak_rss_mb"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--step")
    ap.add_argument("--kwargs", default="{}")
    ap.add_argument("--n", type=int, default=int(os.environ.get("BENCH_N", 800)), help="demo images")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--query-rows", type=int, default=10_000_000)
    args = ap.parse_args()
    if args.step:
        res = STEPS[args.step](**json.loads(args.kwargs))
        res["peak_rss_mb"] = _peak_rss_mb()
        print(json.dumps(res))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    n, w = args.n, args.workers
    r: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version()}, "n_images": n}
    r["download"] = run_step("download", n=n, workers=w, bare=False)
    r["download_bare"] = run_step("download", n=n, workers=w, bare=True)
    shards = (n + 99) // 100
    r["decode"] = run_step("decode", n=n, workers=w, shards=10**6)
    r["scaling"] = [run_step("score", n=n, workers=w, shards=s) for s in (max(1, shards // 4), max(1, shards // 2))]
    r["score"] = run_step("score", n=n, workers=w, shards=10**6)  # last: leaves every shard scored
    r["scaling"].append(r["score"])
    r["score_ray"] = run_step("score", n=n, workers=w, shards=10**6, executor="ray")
    r["real_sizes"] = run_step("real_sizes", batch=8)
    r["write_scaling"] = [run_step("write", n=n, workers=w, limit=k) for k in (n // 4, n // 2)]
    r["write"] = run_step("write", n=n, workers=w)
    r["write_scaling"].append(r["write"])
    r["sample"] = run_step("sample", prompts=32)
    r["fid_features"] = run_step("fid_features", n=256, real_size=False)
    r["fid_features_real"] = run_step("fid_features", n=16, real_size=True)
    r["tar_copy"] = run_step("tar_copy")
    r["query_duckdb"] = run_step("query", rows=args.query_rows, engine="duckdb")
    r["query_pandas"] = run_step("query", rows=args.query_rows, engine="pandas")
    (ROOT / "bench" / "results.json").write_text(json.dumps(r, indent=2) + "\n")
    (ROOT / "bench" / "README.md").write_text(table(r))
    print(table(r))


def table(r: dict) -> str:
    def row(what, ours, base, target, unit="items/s"):
        ratio = ours["rate"] / base["rate"]
        return (f"| {what} | {ours['rate']:.1f} {unit} | {base['rate']:.1f} {unit} | {ratio:.2f} | {target} | "
                f"{ours['peak_rss_mb']:.0f} / {base['peak_rss_mb']:.0f} |")

    m = r["machine"]
    lines = [
        "# Benchmarks", "",
        f"Machine: {m['cpus']} CPUs, {m['platform']}, Python {m['python']}; demo of {r['n_images']} images; "
        "tiny models unless said. Generated by `make bench` (bench/run.py); ratios are against a baseline "
        "run in the same `make bench`.", "",
        "| stage | ours | baseline | ratio | target | peak RSS MB (ours / base) |",
        "|---|---:|---:|---:|---|---:|",
        row("download vs bare img2dataset", r["download"], r["download_bare"], ">= 0.95", "rows/s"),
        row("score (tiny models) vs decode+resize only", r["score"], r["decode"], ">= 0.8", "img/s"),
        row("write (reshard) vs plain tar copy", r["write"], r["tar_copy"], ">= 0.7", "MB/s"),
        row("query 10M rows: DuckDB vs pandas", r["query_duckdb"], r["query_pandas"], ">= 10x, < 1 s", "rows/s"),
        "",
        f"- DuckDB query time: {r['query_duckdb']['seconds']:.2f} s; pandas: {r['query_pandas']['seconds']:.2f} s.",
        f"- Real-size architectures with random weights on CPU (ViT-L/14 + aesthetic head, ViT-B/32 image and "
        f"text, EfficientNet-B3 watermark), batch 8: {r['real_sizes']['rate']:.2f} img/s, peak RSS "
        f"{r['real_sizes']['peak_rss_mb']:.0f} MB.",
        f"- Score on Ray (local instance, {r['machine']['cpus']} CPUs, tiny models): {r['score_ray']['rate']:.1f} img/s "
        f"vs {r['score']['rate']:.1f} img/s with the local executor (ratio {r['score_ray']['rate'] / r['score']['rate']:.2f}; "
        f"includes starting Ray). Peak RSS of Ray's worker processes is not in the driver's figure.",
        f"- Eval, tiny sampler (64 px, 4 steps, batch 8): {r['sample']['rate']:.1f} img/s. FID feature extraction "
        f"(uint8 299 px -> CLIP features): tiny CLIP {r['fid_features']['rate']:.0f} img/s; ViT-L/14 at real size, "
        f"random weights, CPU: {r['fid_features_real']['rate']:.2f} img/s.",
        "", "## Scaling (time should grow linearly, peak memory stay flat)", "",
        "| stage | size | seconds | rate | peak RSS MB |", "|---|---:|---:|---:|---:|",
    ]
    for s in r["scaling"]:
        lines.append(f"| score | {s['items']} images | {s['seconds']:.1f} | {s['rate']:.1f} img/s | {s['peak_rss_mb']:.0f} |")
    for s in r["write_scaling"]:
        lines.append(f"| write | {s['samples']} samples ({s['items']:.1f} MB) | {s['seconds']:.1f} | "
                     f"{s['rate']:.1f} MB/s | {s['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
