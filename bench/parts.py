"""Input streaming: normalise a LAION-style folder of parquet parts, rows/s and peak RSS (no downloads).

Prepares ``--rows`` synthetic rows (default 10M) spread over ``--parts`` parquet parts (default 8; URL,
TEXT, WIDTH, HEIGHT, similarity, like LAION's metadata), written row group by row group so the bench
itself never holds the list. Then, in a fresh process each, it runs ``pipeline.parts.prepare_parts``
(discover + check schemas, stream each part in BATCH_ROWS batches, normalise, split by the URL guard,
write ``_input`` / ``_refused`` / ``_fetch``) and records seconds, rows/s and peak RSS (ru_maxrss). Mode
``stream`` replaces the URL guard by a no-op, to show what the per-URL Python check costs. The
whole-list baseline (what a single file costs: ``read_url_list`` + ``normalise_input`` on one table of
every row) is measured on one part and scaled, never on 10M rows. Results: ``bench/out/parts.json``.

    python bench/parts.py [--rows 10000000] [--parts 8] [--modes full stream]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "parts"
log = logging.getLogger("bench.parts")
GROUP = 250_000  # rows per row group written by the generator


def make_parts(rows: int, n_parts: int) -> Path:
    """``rows`` synthetic rows over ``n_parts`` parquet files (made once per size, reused)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = OUT / f"laion_{rows}_{n_parts}"
    if (folder / "_done").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    per = -(-rows // n_parts)
    rng = np.random.default_rng(0)
    for p in range(n_parts):
        lo, hi = p * per, min(rows, (p + 1) * per)
        with pq.ParquetWriter(folder / f"part-{p:05d}.parquet", _schema()) as w:
            for start in range(lo, hi, GROUP):
                i = np.arange(start, min(hi, start + GROUP))
                urls = pa.array([f"https://img{k % 997}.example{k % 13}.com/photos/{k}/large.jpg" for k in i.tolist()])
                caps = pa.array([f"a photo number {k} of a red bicycle near the sea" for k in i.tolist()])
                w.write_table(pa.table({"URL": urls, "TEXT": caps,
                                        "WIDTH": rng.integers(64, 2048, len(i)), "HEIGHT": rng.integers(64, 2048, len(i)),
                                        "similarity": rng.random(len(i))}, schema=_schema()))
    (folder / "_done").write_text("ok")
    return folder


def _schema():
    import pyarrow as pa

    return pa.schema([("URL", pa.string()), ("TEXT", pa.string()), ("WIDTH", pa.int64()),
                      ("HEIGHT", pa.int64()), ("similarity", pa.float64())])


def child(folder: str, runs: str, mode: str) -> None:
    """One measured normalisation in this process; prints a JSON line."""
    from t2i_curate.pipeline.core.config import load_config
    from t2i_curate.pipeline.download import parts

    if mode == "stream":
        parts.split_batch = lambda cfg, table, dcfg, reason=None: (table, None, 0)
    cfg = load_config("demo", [f"runs_dir={runs}", f"name={mode}", "download.samples_per_shard=10000"])
    cfg = cfg.model_copy(update={"input": cfg.input.model_copy(update={"urls": folder})})
    t = time.perf_counter()
    ps = parts.discover_parts(folder, cfg.input)
    man = parts.prepare_parts(cfg, cfg.run_dir, ps)
    s = time.perf_counter() - t
    rows = sum(e["rows"] for e in man["parts"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "rows": rows, "parts": len(man["parts"]), "seconds": round(s, 1),
                      "rows_per_s": round(rows / s), "peak_rss_mb": round(peak), "batch_rows": parts.BATCH_ROWS}))


def whole_list(folder: str) -> None:
    """The single-file path on one part: the whole part read into one table, then normalised."""
    from t2i_curate.pipeline.core.config import InputConfig
    from t2i_curate.pipeline.download.stage import normalise_input, read_url_list

    part = sorted(Path(folder).glob("part-*.parquet"))[0]
    t = time.perf_counter()
    table, _ = normalise_input(read_url_list(part, InputConfig()), InputConfig())
    s = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": "whole_file_one_part", "rows": table.num_rows, "seconds": round(s, 1),
                      "peak_rss_mb": round(peak)}))


def _run(*args: str) -> dict:
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--modes", nargs="+", default=["full", "stream"], choices=["full", "stream"])
    ap.add_argument("--child", nargs=3, metavar=("FOLDER", "RUNS", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--whole", metavar="FOLDER", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    if a.whole:
        return whole_list(a.whole)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t = time.perf_counter()
    folder = make_parts(a.rows, a.parts)
    log.info("parts ready in %.0f s: %s (%.0f MB)", time.perf_counter() - t, folder,
             sum(p.stat().st_size for p in folder.glob("*.parquet")) / 2**20)
    results = []
    for mode in a.modes:
        runs = OUT / "runs"
        shutil.rmtree(runs / mode, ignore_errors=True)
        results.append(_run("--child", str(folder), str(runs), mode))
        log.info("%s", results[-1])
        shutil.rmtree(runs / mode, ignore_errors=True)
    results.append(_run("--whole", str(folder)))
    log.info("%s", results[-1])
    out = {"rows": a.rows, "parts": a.parts, "results": results,
           "note": "2 shared CPU cores under contention from other jobs; figures are a lower bound"}
    (OUT / "parts.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
