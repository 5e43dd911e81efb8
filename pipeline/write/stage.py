"""Write stage: copy selected samples into new webdataset shards, bytes unchanged.

The plan is the sorted list of selected keys cut into ``samples_per_shard``
pieces. The stage reads the selected samples' metadata once (one DuckDB query)
into ``selected/_plan.parquet``, one row group per output shard, and each shard
reads only its own rows from it. Output shard *i* is done when
``selected/NNNNN.parquet`` exists and lists exactly the planned keys; anything
else is (re)written: the tar first, then the parquet, each atomically. Shards
beyond the plan are removed, then ``manifest.json`` is written with counts and
each shard's sha256. With ``write.buckets`` each row gains ``bucket_width`` / ``bucket_height``
(``pipeline/buckets.py``); with ``write.group_by_bucket`` the plan is sorted by (bucket, key) and cut
so that each shard holds one bucket.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from functools import partial
from pathlib import Path
from typing import Any

from t2i_curate.filters.blocklist import provenance
from t2i_curate.pipeline.core.buckets import bucket_of_shard, manifest_info, shard_slices, with_buckets
from t2i_curate.pipeline.core.catalog import arrow, open_run
from t2i_curate.pipeline.core.config import RunConfig
from t2i_curate.pipeline.core.io import as_path, read_table, sha256_file, shard_ids, write_json, write_parquet
from t2i_curate.pipeline.core.layout import RunLayout, shard_name, shard_of_key
from t2i_curate.pipeline.core.tars import IMAGE_EXTS, IMAGE_SHA256, image_sha256, read_samples, write_samples

log = logging.getLogger(__name__)

KEY_RE = re.compile(r"^[0-9A-Za-z_-]+$")
DROP_META = {"exif"}  # bulky, and the image bytes still carry it
PLAN = "_plan.parquet"
PLAN_DIGEST_KEY = b"t2i_curate_rows_sha256"
TAR_SHA_KEY = b"t2i_curate_tar_sha256"  # the shard tar's sha256, recorded in its parquet when both are written


def selected_metadata(lay: RunLayout):
    """The selected samples' metadata (one DuckDB query), sorted by key: the write plan's rows."""
    con = open_run(lay.root)
    meta = arrow(con, "SELECT s.* FROM samples s JOIN decisions d USING (key) "
                      "WHERE d.state = 'selected' ORDER BY key")
    return meta.drop_columns([c for c in DROP_META if c in meta.column_names])


def write_plan(lay: RunLayout, meta, per_shard: int, slices: list[tuple[int, int]] | None = None) -> None:
    """For executors in other processes: the plan as ``selected/_plan.parquet``, a row group per shard
    (``slices``: each shard's (offset, rows) in ``meta`` when shards are cut per bucket)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    shard = (pc.divide(pa.array(range(meta.num_rows), pa.int64()), per_shard) if slices is None
             else pa.array([i for i, (_, n) in enumerate(slices) for _ in range(n)], pa.int64()))
    meta = meta.append_column("plan_shard", shard)
    write_parquet(lay.selected / PLAN, meta, row_group_size=per_shard)


def _plan_table(lay: RunLayout, shard: int):
    return read_table(lay.selected / PLAN, filters=[("plan_shard", "=", shard)]).drop_columns(["plan_shard"])


def _plan_rows(lay: RunLayout, shard: int) -> list[dict[str, Any]]:
    return _plan_table(lay, shard).to_pylist()


def rows_digest(rows: list[dict[str, Any]]) -> str:
    """sha256 of the planned rows (keys, metadata and scores): a shard is current only for these rows."""
    import hashlib

    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


def shard_done(lay: RunLayout, shard: int, rows: list[dict[str, Any]], digest: str) -> str | None:
    """The sha256 of the shard's tar when the shard was written from exactly these rows (same keys and the
    same scores: re-scoring with other models rewrites it even when the same samples are selected) and
    both files still hold what was written; None when it must be (re)written.

    Checked by content: the parquet's rows against the plan (every value, not only the digest it
    records) and the tar's sha256 against the one recorded in the parquet when the tar was written
    (runs written before that record: the manifest's). A file that cannot be read, or differs, is
    rewritten with one warning line."""
    pq_path, tar_path = lay.selected_parquet(shard), lay.selected_tar(shard)
    if not (pq_path.exists() and tar_path.exists()):
        return None
    name = shard_name(shard)
    try:
        table = read_table(pq_path)
    except Exception as e:  # truncated or not a parquet file: rewritten
        log.warning("selected/%s.parquet unreadable (%s: %s); shard rewritten", name, type(e).__name__, e)
        return None
    meta = table.schema.metadata or {}
    if meta.get(PLAN_DIGEST_KEY, b"").decode() != digest:
        return None  # other rows planned: an ordinary rewrite, nothing is wrong
    held = table.drop_columns([c for c in ("shard",) if c in table.column_names]).to_pylist()
    if rows_digest(held) != digest:
        log.warning("selected/%s.parquet does not hold the rows it records; shard rewritten", name)
        return None
    want = meta.get(TAR_SHA_KEY, b"").decode() or _manifest_sha(lay, name)
    got = sha256_file(tar_path)
    if got != want:
        log.warning("selected/%s.tar: sha256 %s differs from the one recorded when it was written (%s); "
                    "shard rewritten", name, got[:12], (want or "none")[:12])
        return None
    return got


def _manifest_sha(lay: RunLayout, name: str) -> str | None:
    """A shard tar's sha256 as the manifest records it (runs written before the parquet recorded it)."""
    try:
        st = lay.manifest.stat()
        return _manifest_shas(str(lay.manifest), st.st_size, st.st_mtime).get(name)
    except Exception:  # no manifest or an unreadable one: nothing recorded, the shard is rewritten
        return None


@functools.lru_cache(maxsize=2)
def _manifest_shas(path: str, size: int, mtime: float) -> dict[str, str]:
    """shard name -> tar sha256 of one manifest version (read once per process, not once per shard)."""
    return {e["shard"]: e["sha256"] for e in json.loads(as_path(path).read_text())["shards"]}


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _images(lay: RunLayout, keys: list[str]) -> dict[str, list[tuple[str, bytes]]]:
    """Image members (json excluded: it is rebuilt) of ``keys``, from their download tars."""
    by_source: dict[int, set[str]] = {}
    for k in keys:
        by_source.setdefault(shard_of_key(k), set()).add(k)
    members: dict[str, list[tuple[str, bytes]]] = {}
    for src, wanted in sorted(by_source.items()):
        members.update(read_samples(lay.download_tar(src), keys=wanted, skip_exts=("json",)))
    return members


def write_shard(run_dir: str, shard: int, plan=None) -> dict[str, Any]:
    """Write output shard ``shard`` from its planned rows (an Arrow table, given or read from the plan
    file; its types are the parquet's, never guessed from Python values); return its manifest entry."""
    import pyarrow as pa

    lay = RunLayout(run_dir)
    plan = _plan_table(lay, shard) if plan is None else plan
    rows = plan.to_pylist()
    keys = [r["key"] for r in rows]
    digest = rows_digest(rows)
    tar_sha = shard_done(lay, shard, rows, digest)
    if tar_sha is not None:
        return _entry(lay, shard, len(keys), tar_sha, skipped=True)
    bad = [k for k in keys if not KEY_RE.match(k)]
    if bad:
        raise ValueError(f"unsafe sample keys {bad[:5]}: expected letters, digits, '_' or '-'")
    members = _images(lay, keys)
    missing = [k for k in keys if k not in members]
    if missing:
        raise ValueError(f"selected samples missing from the download shards: {missing[:5]}")
    _check_images(rows, members)
    samples = ((r["key"], sorted(members[r["key"]])
                + [("json", json.dumps({c: _clean(v) for c, v in r.items()}, indent=1).encode())])
               for r in rows)
    write_samples(lay.selected_tar(shard), samples)
    tar_sha = sha256_file(lay.selected_tar(shard))
    table = plan.append_column("shard", pa.array([shard_name(shard)] * plan.num_rows, pa.string()))
    write_parquet(lay.selected_parquet(shard),
                  table.replace_schema_metadata({PLAN_DIGEST_KEY: digest.encode(), TAR_SHA_KEY: tar_sha.encode()}))
    return _entry(lay, shard, len(keys), tar_sha, skipped=False)


def _check_images(rows: list[dict[str, Any]], members: dict[str, list[tuple[str, bytes]]]) -> None:
    """Each image still the bytes the score stage read (its ``image_sha256``, where recorded): a download
    tar changed or damaged since scoring never reaches a curated shard."""
    changed = [r["key"] for r in rows if r.get(IMAGE_SHA256)
               and not any(ext.lower() in IMAGE_EXTS and image_sha256(data) == r[IMAGE_SHA256]
                           for ext, data in members[r["key"]])]
    if changed:
        shards = sorted({shard_name(shard_of_key(k)) for k in changed})
        raise ValueError(f"{len(changed)} selected images differ from the bytes that were scored (sha256), e.g. "
                         f"{changed[:3]}: download/{', '.join(shards[:5])}.tar changed since scoring; remove those "
                         f"download shards (tar, parquet, _stats.json) and run `curate run` to fetch them again")


def _write_rows(run_dir: str, plan: dict, shard: int) -> dict[str, Any]:
    return write_shard(run_dir, shard, plan[shard])


def _entry(lay: RunLayout, shard: int, n: int, tar_sha: str, skipped: bool) -> dict[str, Any]:
    tar = lay.selected_tar(shard)
    return {"shard": shard_name(shard), "samples": n, "bytes": tar.stat().st_size, "sha256": tar_sha,
            "parquet_sha256": sha256_file(lay.selected_parquet(shard)), "skipped": skipped}


def write_stage(cfg: RunConfig, run_dir: Path, extra_manifest: dict | None = None) -> dict[str, Any]:
    from t2i_curate.pipeline.executors.shards import map_shards

    lay = RunLayout(run_dir)
    if not lay.decisions.exists():
        from t2i_curate.pipeline.core.errors import StageOrderError

        raise StageOrderError("no selection in this run; run `curate select` first")
    per = cfg.write.samples_per_shard
    meta = with_buckets(selected_metadata(lay), cfg.write)  # bucket columns when write.buckets is set
    slices = shard_slices(meta, per, cfg.write.group_by_bucket)
    n_shards = len(slices)
    items = list(range(n_shards))
    if cfg.executor == "local":  # threads share memory: hand each shard its rows
        fn = partial(_write_rows, str(run_dir), {i: meta.slice(*slices[i]) for i in items})
    else:  # other processes read their rows from the plan file
        write_plan(lay, meta, per, slices)
        fn = partial(write_shard, str(run_dir))
    res = map_shards(fn, items, workers=cfg.workers, executor=cfg.executor, desc="write", ray_cfg=cfg.ray,
                     threads=True)
    res.raise_if_failed("write")
    for stale in shard_ids(lay.selected, ".parquet"):
        if stale >= n_shards:
            lay.selected_parquet(stale).unlink(missing_ok=True)
            lay.selected_tar(stale).unlink(missing_ok=True)
    (lay.selected / PLAN).unlink(missing_ok=True)
    entries = [res.results[i] for i in items]
    if cfg.write.group_by_bucket:  # each shard holds one bucket
        entries = [{**e, "bucket": bucket_of_shard(meta, slices[i][0])} for i, e in enumerate(entries)]
    extra = {**manifest_info(meta, cfg.write), **({"blocklists": provenance(cfg)} if cfg.blocklists else {})}
    manifest = {
        "run": cfg.name,
        "config_fingerprint": cfg.fingerprint(),
        "samples": sum(e["samples"] for e in entries),
        "shards": [{k: v for k, v in e.items() if k != "skipped"} for e in entries],
        "samples_per_shard": cfg.write.samples_per_shard,
        "rules": [r.model_dump() for r in cfg.select.rules],
        **extra,
        **(extra_manifest or {}),
    }
    write_json(lay.manifest, manifest)
    return {"shards": len(entries), "samples": manifest["samples"],
            "skipped": sum(1 for e in entries if e["skipped"])}
