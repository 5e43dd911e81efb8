"""A run folder on an object store against the same run on the local disk: seconds per stage, and the ratio.

Starts moto's S3 server on 127.0.0.1 in this process, then runs the demo's stages (download, score,
select, write, report) each as its own ``curate`` process, once with ``runs_dir`` on the local disk and
once on the server, and records each stage's seconds and the store/local ratio. Both runs read the same
demo images from the same loopback HTTP server. The server shares this machine's cores and keeps objects in
memory: this measures what going through fsspec, pyarrow's and DuckDB's fsspec bridges and the commit
protocol costs, not a real store's latency or bandwidth. Results: ``bench/object_store.json``.

    python bench/object_store.py [--images 637]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "object_store"
log = logging.getLogger("bench.object_store")
STAGES = ("download", "score", "select", "write", "report")


def _stage(stage: str, runs_dir: str, n: int, env: dict) -> float:
    args = [sys.executable, "-m", "t2i_curate.pipeline.cli", stage]
    if stage == "report":
        args += ["--run", f"{runs_dir}/bench{n}"]
    else:
        args += ["--config", "demo", "--set", f"runs_dir={runs_dir}", "--set", f"name=bench{n}",
                 "--set", f"input.demo_size={n}", "--set", "download.allow_private_addresses=true"]
    t = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, text=True, env=env, cwd=ROOT)
    return round(time.perf_counter() - t, 1)


def _server() -> tuple[object, dict]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    return server, env


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=637)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for chatty in ("botocore", "aiobotocore", "s3fs"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    server, env = _server()
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    import fsspec

    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("s3").mkdir(bucket)
    local = OUT / "runs"
    shutil.rmtree(local, ignore_errors=True)
    rows = []
    try:
        for stage in STAGES:  # alternating: both runs see the same machine load at each stage
            a = _stage(stage, str(local), args.images, env)
            b = _stage(stage, f"s3://{bucket}/runs", args.images, env)
            rows.append({"stage": stage, "local_s": a, "s3_s": b, "ratio": round(b / a, 2) if a else None})
            log.info("%s", rows[-1])
    finally:
        server.stop()
    total = {"stage": "total", "local_s": round(sum(r["local_s"] for r in rows), 1),
             "s3_s": round(sum(r["s3_s"] for r in rows), 1)}
    total["ratio"] = round(total["s3_s"] / total["local_s"], 2)
    rows.append(total)
    (ROOT / "bench" / "object_store.json").write_text(
        json.dumps({"images": args.images, "server": "moto (in memory, 127.0.0.1, same machine)",
                    "stages": rows}, indent=1) + "\n")
    log.info("%s", total)


if __name__ == "__main__":
    main()
