"""Peak memory of ``curate eval``'s measure step as the number of generated images grows.

For each size (256, 1024, 4096 by default) the bench writes that many 512 x 512 JPEGs and a prompts file,
then runs ``curate eval --images`` with the tiny eval models in a fresh process and records its seconds
and peak RSS. The baseline, run in the same bench, is what measure did before it streamed: every
generated image held decoded as PIL at once. Peak RSS should stay flat for ours and grow with N for the
baseline. Results go to ``bench/measure_memory.json``.

    python bench/measure_memory.py [--sizes 256 1024 4096]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "measure_memory"
log = logging.getLogger("bench.measure_memory")
SIDE = 512


def _images(n: int) -> tuple[Path, Path]:
    """``n`` smooth random 512 px JPEGs and a prompts jsonl naming them (made once, reused)."""
    import numpy as np
    from PIL import Image

    folder, prompts = OUT / f"images_{n}", OUT / f"prompts_{n}.jsonl"
    if prompts.exists():
        return folder, prompts
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    lines = []
    for i in range(n):
        small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((SIDE, SIDE), Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
        lines.append(json.dumps({"file": f"{i:05d}.jpg", "prompt": f"a photo number {i}", "id": f"p{i:05d}",
                                 "category": ("human_limbs", "horses", "general")[i % 3]}))
    prompts.write_text("\n".join(lines) + "\n")
    return folder, prompts


def _child_peak(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; its seconds and its peak RSS in MB (this wrapper process has no other children)."""
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"})
    return time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def ours(n: int) -> dict:
    folder, prompts = _images(n)
    ref, _ = _images(64)
    cmd = [sys.executable, "-m", "t2i_curate.pipeline.cli", "eval", "--config", "demo",
           "--images", str(folder), "--prompts", str(prompts), "--set", f"runs_dir={OUT / 'runs'}",
           "--set", f"name=mem{n}", "--set", "eval.models=tiny", "--set", f"eval.reference={ref}",
           "--set", "eval.judges=[clip_contrast]"]
    seconds, peak = _child_peak(cmd)
    return {"n": n, "seconds": round(seconds, 1), "img_per_s": round(n / seconds, 1), "peak_rss_mb": round(peak)}


def _hold_all(folder: str) -> None:
    from PIL import Image

    held = []
    for p in sorted(Path(folder).iterdir()):
        with Image.open(p) as im:
            held.append(im.convert("RGB"))
    logging.getLogger().info("held %d images", len(held))


def baseline(n: int) -> dict:
    folder, _ = _images(n)
    seconds, peak = _child_peak([sys.executable, __file__, "--hold-all", str(folder)])
    return {"n": n, "seconds": round(seconds, 1), "peak_rss_mb": round(peak)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--hold-all")
    ap.add_argument("--one", choices=["ours", "baseline"])
    ap.add_argument("--n", type=int)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.hold_all:
        return _hold_all(args.hold_all)
    if args.one:  # one measurement in this fresh process, so RUSAGE_CHILDREN is that run's alone
        sys.stdout.write(json.dumps((ours if args.one == "ours" else baseline)(args.n)) + "\n")  # the parent reads it
        return None
    results = []
    for n in args.sizes:
        for kind in ("ours", "baseline"):
            p = subprocess.run([sys.executable, __file__, "--one", kind, "--n", str(n)], check=True,
                               capture_output=True, text=True)
            r = {"kind": kind, **json.loads(p.stdout.strip().splitlines()[-1])}
            log.info("%s", r)
            results.append(r)
    (ROOT / "bench" / "measure_memory.json").write_text(json.dumps(results, indent=1) + "\n")
    return None


if __name__ == "__main__":
    main()
