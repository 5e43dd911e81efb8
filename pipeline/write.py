"""Write stage: copy selected samples into new webdataset shards, bytes unchanged.

The plan is the sorted list of selected keys cut into ``samples_per_shard``
pieces. Output shard *i* is done when ``selected/NNNNN.parquet`` exists and
lists exactly the planned keys; anything else is (re)written: the tar first,
then the parquet, each atomically. Shards beyond the plan are removed, then
``manifest.json`` is written with counts and each shard's sha256.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import tarfile
from functools import partial
from pathlib import Path
from typing import Any

from pipeline.catalog import arrow, open_run
from pipeline.config import RunConfig
from pipeline.io import atomic_path, safe_member_name, sha256_file, shard_ids, write_json, write_parquet

log = logging.getLogger(__name__)

KEY_RE = re.compile(r"^[0-9A-Za-z_-]+$")
DROP_META = {"exif"}  # bulky, and the image bytes still carry it


def plan_shards(run_dir: Path, per_shard: int) -> list[list[str]]:
    import pyarrow.parquet as pq

    dec = pq.read_table(run_dir / "selected" / "decisions.parquet", columns=["key", "state"])
    keys = sorted(k for k, s in zip(dec["key"].to_pylist(), dec["state"].to_pylist(), strict=True) if s == "selected")
    return [keys[i : i + per_shard] for i in range(0, len(keys), per_shard)]


def shard_done(run_dir: Path, shard: int, keys: list[str]) -> bool:
    import pyarrow.parquet as pq

    pq_path = run_dir / "selected" / f"{shard:05d}.parquet"
    tar_path = pq_path.with_suffix(".tar")
    if not (pq_path.exists() and tar_path.exists()):
        return False
    return pq.read_table(pq_path, columns=["key"])["key"].to_pylist() == keys


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _read_members(tar_path: Path, wanted: set[str]) -> dict[str, list[tuple[str, bytes]]]:
    """Members of ``wanted`` keys from one source tar, json excluded (it is rebuilt)."""
    found: dict[str, list[tuple[str, bytes]]] = {}
    with tarfile.open(tar_path) as tf:
        try:
            for m in tf:
                name = safe_member_name(m.name)
                if name is None or not m.isfile():
                    log.warning("%s: skipping unsafe or non-file member %r", tar_path, m.name)
                    continue
                key, _, ext = name.partition(".")
                if key in wanted and ext != "json":
                    found.setdefault(key, []).append((ext, tf.extractfile(m).read()))
        except (tarfile.ReadError, EOFError, OSError) as e:  # truncated: keep what was read
            log.warning("%s: tar ends early (%s)", tar_path, e)
    return found


def write_shard(run_dir: str, shard: int, keys: list[str]) -> dict[str, Any]:
    """Write output shard ``shard`` holding ``keys``; return its manifest entry."""
    import pyarrow as pa

    run = Path(run_dir)
    if shard_done(run, shard, keys):
        return _entry(run, shard, len(keys), skipped=True)
    bad = [k for k in keys if not KEY_RE.match(k)]
    if bad:
        raise ValueError(f"unsafe sample keys {bad[:5]}: expected letters, digits, '_' or '-'")
    con = open_run(run)
    con.execute("CREATE TEMP TABLE want AS SELECT unnest(?::VARCHAR[]) AS key", [keys])
    meta = arrow(con, "SELECT s.* FROM samples s JOIN want USING (key) ORDER BY key")
    rows = {r["key"]: r for r in meta.to_pylist()}
    by_source: dict[int, set[str]] = {}
    for k in keys:
        by_source.setdefault(int(k[:5]), set()).add(k)
    members: dict[str, list[tuple[str, bytes]]] = {}
    for src, wanted in sorted(by_source.items()):
        members.update(_read_members(run / "download" / f"{src:05d}.tar", wanted))
    missing = [k for k in keys if k not in members or k not in rows]
    if missing:
        raise ValueError(f"selected samples missing from the download shards: {missing[:5]}")
    name = f"{shard:05d}"
    with atomic_path(run / "selected" / f"{name}.tar") as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for k in keys:
                meta_k = {c: _clean(v) for c, v in rows[k].items() if c not in DROP_META}
                parts = sorted(members[k]) + [("json", json.dumps(meta_k, indent=1).encode())]
                for ext, data in parts:
                    info = tarfile.TarInfo(f"{k}.{ext}")
                    # fixed mtime: identical inputs give byte-identical shards
                    info.size, info.mode, info.mtime = len(data), 0o444, 0
                    tf.addfile(info, io.BytesIO(data))
    out_rows = [{**{c: v for c, v in rows[k].items() if c not in DROP_META}, "shard": name} for k in keys]
    write_parquet(run / "selected" / f"{name}.parquet", pa.Table.from_pylist(out_rows))
    return _entry(run, shard, len(keys), skipped=False)


def _entry(run: Path, shard: int, n: int, skipped: bool) -> dict[str, Any]:
    tar = run / "selected" / f"{shard:05d}.tar"
    return {"shard": f"{shard:05d}", "samples": n, "bytes": tar.stat().st_size,
            "sha256": sha256_file(tar), "skipped": skipped}


def write_stage(cfg: RunConfig, run_dir: Path, extra_manifest: dict | None = None) -> dict[str, Any]:
    from pipeline.executors import map_shards

    if not (run_dir / "selected" / "decisions.parquet").exists():
        from pipeline.selection import StageOrderError

        raise StageOrderError("no selection in this run; run `curate select` first")
    plan = plan_shards(run_dir, cfg.write.samples_per_shard)
    items = [(i, tuple(keys)) for i, keys in enumerate(plan)]
    res = map_shards(partial(_write_planned, str(run_dir)), items, workers=cfg.workers,
                     executor=cfg.executor, desc="write", ray_cfg=cfg.ray, threads=True)
    res.raise_if_failed("write")
    for stale in shard_ids(run_dir / "selected", ".parquet"):
        if stale >= len(plan):
            for suffix in (".parquet", ".tar"):
                (run_dir / "selected" / f"{stale:05d}{suffix}").unlink(missing_ok=True)
    entries = [res.results[i] for i in items]
    manifest = {
        "run": cfg.name,
        "config_fingerprint": cfg.fingerprint(),
        "samples": sum(e["samples"] for e in entries),
        "shards": [{k: v for k, v in e.items() if k != "skipped"} for e in entries],
        "samples_per_shard": cfg.write.samples_per_shard,
        "rules": [r.model_dump() for r in cfg.select.rules],
        **(extra_manifest or {}),
    }
    write_json(run_dir / "selected" / "manifest.json", manifest)
    return {"shards": len(entries), "samples": manifest["samples"],
            "skipped": sum(1 for e in entries if e["skipped"])}


def _write_planned(run_dir: str, item: tuple[int, tuple[str, ...]]) -> dict[str, Any]:
    shard, keys = item
    return write_shard(run_dir, shard, list(keys))
