"""SemDeDup scaling bench: group N random 768-d embeddings stored like a run's (float16 ``.npy`` shards).

``python bench/semdedup.py --n 1000000`` (``make bench`` runs it through bench/run.py's ``semdedup``
step). The shards are written by a child process first, so the peak RSS reported is the grouping's
own (``grouping_peak_rss_mb``, this process only). Random embeddings have no duplicates, so
``planted`` pairs are planted across shards (a copy plus noise, cosine about 0.99); the report
says how many of them were found.

Defaults are the config's (``select.dedup.semantic``): k = ceil(sqrt(n)), up to 10 k-means passes,
threshold 0.95, chunks of 16384 rows. Extrapolation: a k-means pass costs n * k * d and the
within-cluster step about n * (n / k) * d multiply-adds, so with k = sqrt(n) the time grows as
n^1.5 (the ``laion_2b_hours`` figure scales the measured seconds by (2e9 / n)^1.5 on the same
cores); memory grows with k * d (centroids) + 24 bytes per candidate, not with n * d.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "semdedup"
LAION_2B = 2_000_000_000


def make_shards(folder: Path, n: int, dim: int, shards: int, planted: int, seed: int) -> None:
    """``shards`` float16 .npy files of normalised random rows; row ``n//2 + i`` of the whole set is
    a noisy copy of row ``i * step`` for the first ``planted`` pairs (different shards)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bounds = np.linspace(0, n, shards + 1).astype(int)
    sources = {}  # global row -> the row it copies
    step = max(1, (n // 2) // max(planted, 1))
    for i in range(planted):
        sources[n // 2 + i] = i * step
    originals = {}
    for s in range(shards):
        lo, hi = bounds[s], bounds[s + 1]
        x = rng.standard_normal((hi - lo, dim)).astype(np.float32)
        for g in range(lo, hi):
            if g in sources:
                x[g - lo] = originals[sources[g]] + 0.1 * rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        for g in set(sources.values()) & set(range(lo, hi)):
            originals[g] = x[g - lo].copy()
        np.save(folder / f"{s:05d}.npy", x.astype(np.float16))
    (folder / "planted.json").write_text(json.dumps({str(k): v for k, v in sources.items()}))


def group(folder: Path, shards: int, threshold: float, iterations: int, chunk_rows: int) -> dict:
    from t2i_curate.filters.semdedup import Embeddings, semantic_duplicates

    files = [folder / f"{s:05d}.npy" for s in range(shards)]
    sizes = [np.load(f, mmap_mode="r").shape[0] for f in files]
    emb = Embeddings(files, np.repeat(np.arange(shards), sizes).astype(np.int32),
                     np.concatenate([np.arange(k) for k in sizes]).astype(np.int64))
    n = len(emb)
    t0 = time.perf_counter()
    dup_of, k = semantic_duplicates(emb, np.arange(n), threshold, None, iterations, 0, chunk_rows)
    seconds = time.perf_counter() - t0
    planted = {int(a): b for a, b in json.loads((folder / "planted.json").read_text()).items()}
    found = sum(1 for copy, orig in planted.items() if dup_of[copy] == orig)
    return {"items": n, "dim": emb.dim, "clusters": k, "seconds": seconds, "rate": n / seconds,
            "unit": "embeddings/s", "dropped": int((dup_of >= 0).sum()), "planted": len(planted),
            "planted_found": found, "threshold": threshold, "iterations_max": iterations,
            "chunk_rows": chunk_rows, "grouping_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "laion_2b_hours_same_cores": seconds * (LAION_2B / n) ** 1.5 / 3600}


def step_semdedup(n: int = 1_000_000, dim: int = 768, shards: int = 10, planted: int = 1000, threshold: float = 0.95,
                  iterations: int = 10, chunk_rows: int = 16384, keep: bool = False) -> dict:
    """Write the shards in a child process, then group them here; returns the bench row."""
    folder = OUT / f"n{n}_d{dim}"
    if not (folder / "planted.json").exists():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--make", "--n", str(n), "--dim", str(dim), "--shards", str(shards),
                        "--planted", str(planted)], check=True, cwd=ROOT)
        logging.getLogger("bench").info("semdedup: wrote %d embeddings in %.0f s", n, time.perf_counter() - t0)
    out = group(folder, shards, threshold, iterations, chunk_rows)
    if not keep:
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    return out


def step_phash(n: int = 1_000_000, max_distance: int = 4, planted: int = 1000) -> dict:
    """near_duplicate_phash's grouping (filters/dedup.py) over ``n`` uniform random 64-bit hashes with
    ``planted`` copies ``max_distance`` bits away (uniform hashes are the best case for the bands:
    real hashes cluster, so buckets are fuller)."""
    import duckdb
    import pyarrow as pa

    from t2i_curate.filters.dedup import phash_duplicates

    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(0, 2, n).astype(np.uint64)
    for i in range(planted):
        bits = rng.choice(64, max_distance, replace=False)
        h[n - 1 - i] = h[i] ^ np.bitwise_or.reduce(np.uint64(1) << bits.astype(np.uint64))
    con = duckdb.connect()
    con.register("cand", pa.table({"key": [f"{i:09d}" for i in range(n)], "phash": [f"{int(v):016x}" for v in h],
                                   "dd_rank": np.arange(n)}))
    t0 = time.perf_counter()
    dups = phash_duplicates(con, "cand", max_distance)
    seconds = time.perf_counter() - t0
    return {"items": n, "seconds": seconds, "rate": n / seconds, "unit": "hashes/s", "dropped": dups.num_rows,
            "planted": planted, "max_distance": max_distance,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--planted", type=int, default=1000)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--chunk-rows", type=int, default=16384)
    ap.add_argument("--make", action="store_true", help="only write the shards")
    ap.add_argument("--keep", action="store_true", help="keep the shards afterwards")
    ap.add_argument("--phash", action="store_true", help="bench the pHash grouping instead")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.make:
        make_shards(OUT / f"n{a.n}_d{a.dim}", a.n, a.dim, a.shards, a.planted, seed=0)
        return
    if a.phash:
        print(json.dumps(step_phash(a.n)))
        return
    res = step_semdedup(a.n, a.dim, a.shards, a.planted, 0.95, a.iterations, a.chunk_rows, a.keep)
    print(json.dumps(res))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
