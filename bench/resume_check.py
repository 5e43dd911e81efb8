"""Which shards have current scores, on an object store: per file (the old way) against one listing.

A rerun of ``curate score`` and every ``curate select`` ask, for every download shard, whether its
scores are current: the download files' size and mtime (the source stamp) against the stamp in the
score parquet's footer. Shard by shard that is a HEAD for each of the shard's parquet and tar, one for
the score parquet's existence and three to open it and read its footer, one after another.
``shard_scoring.current_shards`` reads the stamps from one listing of ``download/``, opens only listed
score files and reads their footers 32 at a time.

Starts moto's S3 server on 127.0.0.1, writes ``--shards`` small fake shards (download parquet, tar and
stats; a score parquet with a current stamp), then times both ways, alternating, and counts the S3
requests each sends. moto answers from memory on this machine, so the seconds show only the client's
overhead and the requests are the figure to scale: at a real store's ~20 ms a request, sequential requests
cost ``requests * 0.02`` s. Results: ``bench/resume_check.json``.

    python bench/resume_check.py [--shards 500]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("bench.resume_check")


def _fake_run(root, n: int, settings: dict) -> None:
    import pyarrow as pa

    from t2i_curate.pipeline.core.io import file_stamp, write_json, write_parquet
    from t2i_curate.pipeline.core.layout import RunLayout
    from t2i_curate.pipeline.core.scores import META_KEY

    lay = RunLayout(root)

    def one(s: int) -> None:
        write_parquet(lay.download_parquet(s), pa.table({"key": [f"{s:05d}0000"]}))
        write_json(lay.download_tar(s), {"size": s})
        write_json(lay.download_stats(s), {"successes": 1})
        info = {"source_stamp": file_stamp(lay.download_parquet(s), lay.download_tar(s)), "settings": settings}
        write_parquet(lay.score_parquet(s), pa.table({"key": [f"{s:05d}0000"]}).replace_schema_metadata(
            {META_KEY: json.dumps(info).encode()}))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(n)))


def _per_file(lay, shards: list[int], settings: dict) -> set[int]:
    """The old way: a stamp from each file's own stat, then the score footer, shard after shard."""
    from t2i_curate.pipeline.core.io import file_stamp
    from t2i_curate.pipeline.core.scores import shard_is_current

    return {s for s in shards if shard_is_current(
        lay.score_parquet(s), file_stamp(lay.download_parquet(s), lay.download_tar(s)), settings)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for chatty in ("botocore", "aiobotocore", "s3fs", "werkzeug"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"})
    try:
        rows = _measure(f"s3://bench-{uuid.uuid4().hex[:8]}", args.shards, args.repeats)
    finally:
        server.stop()
    (ROOT / "bench" / "resume_check.json").write_text(json.dumps(
        {"command": "python bench/resume_check.py " + " ".join(sys.argv[1:]), "shards": args.shards,
         "repeats": args.repeats, "server": "moto (in memory, 127.0.0.1, same machine)", "ways": rows},
        indent=1) + "\n")


def _measure(bucket: str, n: int, repeats: int) -> list[dict]:
    from t2i_curate.pipeline.core.io import as_path
    from t2i_curate.pipeline.core.layout import RunLayout
    from t2i_curate.pipeline.core.scores import current_shards

    root = as_path(f"{bucket}/run")
    root.fs.mkdir(bucket.removeprefix("s3://"))
    settings = {"scorers": ["resolution"]}
    t = time.perf_counter()
    _fake_run(root, n, settings)
    log.info("wrote %d fake shards in %.1f s", n, time.perf_counter() - t)
    lay, shards = RunLayout(root), list(range(n))
    counts = {"n": 0}
    root.fs.s3.meta.events.register("before-send.s3", lambda **kw: counts.__setitem__("n", counts["n"] + 1))
    ways = {"per file, sequential (before)": lambda: _per_file(lay, shards, settings),
            "current_shards: one listing, 32 footer threads": lambda: current_shards(lay, shards, settings)}
    seconds: dict[str, list[float]] = {k: [] for k in ways}
    requests: dict[str, int] = {}
    for _ in range(repeats):  # alternating, so both see the same machine
        for name, fn in ways.items():
            counts["n"], t = 0, time.perf_counter()
            assert fn() == set(shards), name  # every shard current, both ways
            seconds[name].append(time.perf_counter() - t)
            requests[name] = counts["n"]
    rows = []
    for name in ways:
        med = sorted(seconds[name])[len(seconds[name]) // 2]
        rows.append({"way": name, "seconds_moto": round(med, 2), "requests": requests[name],
                     "requests_per_shard": round(requests[name] / n, 3)})
        log.info("%s", rows[-1])
    return rows


if __name__ == "__main__":
    main()
