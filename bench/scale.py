"""Peak memory of each curation stage as the run grows (no stage holds more than one shard's rows).

For each size (1k, 4k, 16k demo images by default) the bench runs the demo's stages one by one, each as
its own ``curate`` process (download, score, select, write), and records each process's seconds and peak
RSS. Time should grow linearly and peak RSS stay flat. Results go to ``bench/scale.json``.

    python bench/scale.py [--sizes 1000 4000 16000]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "scale"
log = logging.getLogger("bench.scale")
STAGES = ("download", "score", "select", "write")


def _stage(stage: str, n: int) -> dict:
    """One stage in a fresh process; this wrapper process has no other children, so RUSAGE_CHILDREN
    is that stage's own peak."""
    args = [sys.executable, "-m", "t2i_curate.pipeline.cli", stage, "--config", "demo",
            "--set", f"runs_dir={OUT / 'runs'}", "--set", f"name=scale{n}", "--set", f"input.demo_size={n}",
            "--set", "download.allow_private_addresses=true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    t = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, text=True, env=env, cwd=ROOT)
    return {"seconds": round(time.perf_counter() - t, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000])
    ap.add_argument("--one", nargs=2, metavar=("STAGE", "N"))
    args = ap.parse_args()
    if args.one:
        sys.stdout.write(json.dumps(_stage(args.one[0], int(args.one[1]))) + "\n")
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = []
    for n in args.sizes:
        shutil.rmtree(OUT / "runs" / f"scale{n}", ignore_errors=True)
        for stage in STAGES:
            p = subprocess.run([sys.executable, __file__, "--one", stage, str(n)], check=True, capture_output=True,
                               text=True)
            results.append({"images": n, "stage": stage, **json.loads(p.stdout.strip().splitlines()[-1])})
            log.info("%s", results[-1])
    (ROOT / "bench" / "scale.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
