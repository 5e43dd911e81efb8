"""Download stage: img2dataset's Python API, plus input normalisation and retry-failed.

Input (parquet / csv / tsv / jsonl, LAION's ``URL`` / ``TEXT`` or configured
names) is validated and normalised into ``download/_input.parquet``; extra
columns ride along. Output is img2dataset's own: ``NNNNN.tar`` +
``NNNNN.parquet`` + ``NNNNN_stats.json`` per shard, the stats file marking a
finished shard. ``retry_failed`` re-downloads only the rows that failed in
finished shards and merges the successes back under their original keys.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from t2i_curate.pipeline.catalog import arrow
from t2i_curate.pipeline.config import InputConfig, RunConfig
from t2i_curate.pipeline.errors import UserError
from t2i_curate.pipeline.io import write_json, write_parquet
from t2i_curate.pipeline.layout import RunLayout, shard_of_key
from t2i_curate.pipeline.tars import read_samples, write_samples

log = logging.getLogger(__name__)

# Columns img2dataset writes; with every scorer's columns (filters.registry: `punsafe`,
# `pwatermark`, ...; LAION's spellings of score columns are reserved that way), an input column
# equal to one of these (ignoring case) is carried as ``input_<name>`` instead, so no two columns
# differ only by case (DuckDB would rename one of them silently).
IMG2DATASET_COLUMNS = {
    "key", "url", "caption", "status", "error_message", "width", "height",
    "original_width", "original_height", "exif", "md5", "sha256", "sha512",
}
ALIASES = {"aesthetic": "aesthetic_score"}  # LAION spellings of our columns


class InputError(UserError):
    """The URL list cannot be used; the message says what was expected."""


def _detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.name.lower()
    for ext, f in ((".parquet", "parquet"), (".csv", "csv"), (".tsv", "tsv"),
                   (".jsonl", "jsonl"), (".json", "jsonl")):
        if name.endswith(ext):
            return f
    raise InputError(
        f"{path}: cannot tell the input format from the name; expected .parquet, .csv, "
        f".tsv or .jsonl, or set input.format"
    )


def read_url_list(path: Path, icfg: InputConfig):
    """Read and validate a URL list into a pyarrow Table (columns renamed as stored)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise InputError(f"input.urls: {path} does not exist")
    fmt = _detect_format(path, icfg.format)
    try:
        if fmt == "parquet":
            table = pq.read_table(path)
        elif fmt in ("csv", "tsv"):
            opts = pcsv.ParseOptions(delimiter="," if fmt == "csv" else "\t")
            table = pcsv.read_csv(path, parse_options=opts)
        else:
            table = pjson.read_json(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{path}: cannot read as {fmt}: {e}") from e
    cols = table.column_names
    if icfg.url_col not in cols:
        raise InputError(
            f"{path}: expected a URL column {icfg.url_col!r} (set input.url_col); "
            f"found columns {cols}"
        )
    table = _repair_utf8(table, icfg.url_col, path)
    url_type = table.schema.field(icfg.url_col).type
    if not (pa.types.is_string(url_type) or pa.types.is_large_string(url_type) or pa.types.is_null(url_type)):
        raise InputError(f"{path}: URL column {icfg.url_col!r} must hold strings, got {url_type}")
    if icfg.caption_col is not None and icfg.caption_col not in cols:
        raise InputError(
            f"{path}: expected a caption column {icfg.caption_col!r} (set input.caption_col, "
            f"or null for none); found columns {cols}"
        )
    if table.num_rows == 0:
        raise InputError(f"{path}: the URL list is empty (0 rows)")
    if icfg.caption_col is not None:
        table = _repair_utf8(table, icfg.caption_col, path)
        cap = table[icfg.caption_col]
        if not pa.types.is_string(cap.type):
            table = table.set_column(table.column_names.index(icfg.caption_col), icfg.caption_col,
                                     cap.cast(pa.string()))
    return table


def _repair_utf8(table, col: str, path: Path):
    """Binary text (a CSV cell that is not valid UTF-8) -> strings with U+FFFD; count and warn."""
    import pyarrow as pa

    field = table.schema.field(col)
    if not (pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type)):
        return table
    values = table[col].to_pylist()
    bad = 0
    fixed = []
    for v in values:
        if v is None:
            fixed.append(None)
            continue
        try:
            fixed.append(v.decode("utf-8"))
        except UnicodeDecodeError:
            bad += 1
            fixed.append(v.decode("utf-8", errors="replace"))
    if bad:
        log.warning("%s: %d value(s) of column %r are not valid UTF-8; invalid bytes replaced by U+FFFD",
                    path, bad, col)
    return table.set_column(table.column_names.index(col), col, pa.array(fixed, type=pa.string()))


def normalise_input(table, icfg: InputConfig):
    """Pick and rename columns for img2dataset; return (table, extra column names)."""
    keep_base = [icfg.url_col] + ([icfg.caption_col] if icfg.caption_col else [])
    others = [c for c in table.column_names if c not in keep_base]
    if icfg.extra_columns is not None:
        missing = [c for c in icfg.extra_columns if c not in others]
        if missing:
            raise InputError(f"input.extra_columns: not in the input: {missing}; found {others}")
        others = list(icfg.extra_columns)
    from t2i_curate.filters.registry import score_columns

    reserved = IMG2DATASET_COLUMNS | {c.lower() for c in score_columns()}
    renamed, seen = [], {c.lower() for c in keep_base}
    for c in others:
        low = ALIASES.get(c.lower(), c.lower())
        new = f"input_{low}" if low in reserved else c
        if new.lower() in seen:
            raise InputError(f"input column {c!r} collides with another column as {new!r}")
        seen.add(new.lower())
        renamed.append(new)
    out = table.select(keep_base + others).rename_columns(keep_base + renamed)
    if "input_row" in out.column_names:
        raise InputError("the input has a column 'input_row', which the pipeline reserves; rename it")
    # the row's position in the input: joins every result back to its input row
    import pyarrow as pa

    out = out.append_column("input_row", pa.array(range(out.num_rows), type=pa.int64()))
    return out, renamed + ["input_row"]


def prepare_input(run_dir: Path, url_path: Path, icfg: InputConfig, table=None) -> tuple[Path, list[str]]:
    """Validate the URL list (unless ``table`` is the validated list) and write the
    normalised copy; return its path and the extra columns."""
    if table is None:
        table = read_url_list(url_path, icfg)
    table, extras = normalise_input(table, icfg)
    out = RunLayout(run_dir).input_file
    write_parquet(out, table)
    return out, extras


def _img2dataset_kwargs(cfg: RunConfig, extras: list[str]) -> dict:
    d = cfg.download
    return dict(
        image_size=d.image_size,
        resize_mode=d.resize_mode,
        resize_only_if_bigger=d.resize_only_if_bigger,
        encode_format=d.encode_format,
        encode_quality=d.encode_quality,
        processes_count=d.processes,
        thread_count=d.threads,
        timeout=d.timeout,
        retries=d.retries,
        distributor=d.distributor,
        number_sample_per_shard=d.samples_per_shard,
        user_agent_token=d.user_agent_token,
        disallowed_header_directives=d.disallowed_header_directives,
        min_image_size=d.min_image_size,
        max_aspect_ratio=d.max_aspect_ratio,
        output_format="webdataset",
        input_format="parquet",
        url_col=cfg.input.url_col,
        caption_col=cfg.input.caption_col,
        save_additional_columns=extras or None,
        compute_hash="sha256",
        extract_exif=False,
        enable_wandb=False,
        oom_shard_count=5,
        incremental_mode="incremental",
    )


def run_img2dataset(url_list: Path, output: Path, kwargs: dict, ray_cfg=None, max_pixels: int | None = None) -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if max_pixels is not None:
        # OpenCV reads it once per process, at its first decode: img2dataset's worker processes
        # (spawned, or Ray workers via ensure_ray's runtime_env) inherit it and refuse an image
        # whose header declares more pixels before allocating it (see TOO_MANY_PIXELS).
        os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(max_pixels)
    from img2dataset import download as i2d_download

    if kwargs.get("distributor") == "ray":  # img2dataset's Ray distributor needs a connected cluster
        from t2i_curate.pipeline.ray_executor import ensure_ray

        ensure_ray(ray_cfg)
    output.mkdir(parents=True, exist_ok=True)
    # img2dataset prints its own progress to stdout; keep ours on the log.
    i2d_download(url_list=str(url_list), output_folder=str(output), **kwargs)


def expected_shards(n_rows: int, per_shard: int) -> int:
    return (n_rows + per_shard - 1) // per_shard


def guard_settings(cfg: RunConfig):
    """The download settings the URL guard applies: private addresses are allowed when the config says
    so, or (``allow_private_addresses`` unset) for the built-in demo alone, never a user's list."""
    allow = cfg.download.allow_private_addresses
    return cfg.download.model_copy(update={"allow_private_addresses": cfg.input.urls == "demo" if allow is None
                                           else allow})


def split_refused(cfg: RunConfig, lay: RunLayout) -> tuple[Path, int, int]:
    """Write the rows img2dataset may fetch to ``_fetch.parquet`` and the refused ones, with
    their reasons, to ``_refused.parquet`` (removed when none); return (fetch list, refused, blocked).
    Rows a url / domain blocklist names (``pipeline/blocklist.py``) are refused too, with the list's
    rule in column ``rule`` (NULL for the URL guard's refusals): select drops them under that rule."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from t2i_curate.pipeline.blocklist import blocked_urls
    from t2i_curate.pipeline.urlguard import url_refusal

    table = pq.read_table(lay.input_file)
    dcfg = guard_settings(cfg)
    urls = table[cfg.input.url_col].to_pylist()
    blocked = blocked_urls(cfg, urls)
    reasons = [b[1] if b else url_refusal(u, dcfg) for u, b in zip(urls, blocked, strict=True)]
    refused = [i for i, r in enumerate(reasons) if r is not None]
    n_blocked = sum(b is not None for b in blocked)
    allowed = pa.array([r is None for r in reasons], type=pa.bool_())
    write_parquet(lay.fetch_file, table.filter(allowed))
    if not refused:
        lay.refused_file.unlink(missing_ok=True)
        return lay.fetch_file, 0, 0
    idx = pa.array(refused, type=pa.int64())
    caps = (table[cfg.input.caption_col].take(idx) if cfg.input.caption_col
            else pa.nulls(len(refused), pa.string()))
    write_parquet(lay.refused_file, pa.table({
        "input_row": table["input_row"].take(idx),
        "url": table[cfg.input.url_col].take(idx).cast(pa.string()),
        "caption": caps,
        "reason": pa.array([reasons[i] for i in refused], type=pa.string()),
        "rule": pa.array([blocked[i][0] if blocked[i] else None for i in refused], type=pa.string()),
    }))
    if n_blocked:
        log.info("download: %d URLs blocked by a blocklist, never fetched", n_blocked)
    if len(refused) > n_blocked:
        log.warning("download: %d of %d URLs refused before any fetch (see %s)",
                    len(refused) - n_blocked, table.num_rows, lay.refused_file)
    return lay.fetch_file, len(refused) - n_blocked, n_blocked


def download_stage(cfg: RunConfig, run_dir: Path, url_path: Path, table=None) -> dict:
    """Download every unfinished shard; return counts. ``table``: the list, already validated."""
    import pyarrow.parquet as pq

    lay = RunLayout(run_dir)
    _, extras = prepare_input(run_dir, url_path, cfg.input, table)
    fetch_path, n_refused, n_blocked = split_refused(cfg, lay)
    out = lay.download
    n_rows = pq.read_metadata(fetch_path).num_rows
    todo = expected_shards(n_rows, cfg.download.samples_per_shard) - len(lay.finished_downloads())
    if todo > 0:  # img2dataset would skip finished shards too, but only after starting its pool
        run_img2dataset(fetch_path, out, _img2dataset_kwargs(cfg, extras), cfg.ray, cfg.download.max_image_pixels)
    elif n_rows == 0:
        log.warning("download: every URL was refused; nothing to fetch")
    else:
        log.info("download: all %d shards finished already", len(lay.finished_downloads()))
    d = download_summary(lay)  # refused rows count as failed downloads; blocked ones as neither
    return {**d, "rows": d["rows"] + n_refused + n_blocked, "failed": d["failed"] + n_refused,
            "refused": n_refused, "blocked": n_blocked}


def download_summary(lay: RunLayout) -> dict:
    import duckdb

    shards = lay.finished_downloads()
    if not shards:
        return {"shards": 0, "rows": 0, "success": 0, "failed": 0}
    files = [str(lay.download_parquet(s)) for s in shards]
    row = duckdb.connect().execute(
        "SELECT count(*), count(*) FILTER (status = 'success') FROM read_parquet(?)", [files]
    ).fetchall()[0]
    return {"shards": len(shards), "rows": row[0], "success": row[1], "failed": row[0] - row[1]}


def retry_failed(cfg: RunConfig, run_dir: Path, url_path: Path | None = None) -> dict:
    """Re-download the rows that failed in finished shards; merge successes in place.

    Each affected shard's tar and parquet are rewritten atomically, keys kept.
    Returns ``{"retried": n, "recovered": m}``.
    """
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    lay = RunLayout(run_dir)
    files = [str(lay.download_parquet(s)) for s in lay.finished_downloads()]
    if not files:
        return {"retried": 0, "recovered": 0}
    con = duckdb.connect()
    failed = arrow(con, "SELECT key, input_row FROM read_parquet(?) WHERE status <> 'success' ORDER BY key",
                   [files])
    if failed.num_rows == 0:
        return {"retried": 0, "recovered": 0}
    # Rows come from the current input (its URLs may have been refreshed), by input_row.
    current = pq.read_table(lay.input_file)
    rows = current.take(pa.array(failed["input_row"].to_pylist(), type=pa.int64()))
    retry_in = _allowed_only(cfg, rows.append_column("_orig_key", failed["key"]))
    if retry_in.num_rows == 0:
        return {"retried": 0, "recovered": 0}
    work = lay.retry_dir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pq.write_table(retry_in, work / "input.parquet")
    extras = [c for c in retry_in.column_names if c not in (cfg.input.url_col, cfg.input.caption_col)]
    kwargs = _img2dataset_kwargs(cfg, extras)
    kwargs["number_sample_per_shard"] = max(1, retry_in.num_rows)
    run_img2dataset(work / "input.parquet", work / "out", kwargs, cfg.ray, cfg.download.max_image_pixels)
    new_meta = pq.read_table(work / "out" / "00000.parquet")
    new_rows = {r["_orig_key"]: r for r in new_meta.to_pylist()}
    new_samples = read_samples(work / "out" / "00000.tar") if (work / "out" / "00000.tar").exists() else {}
    by_shard: dict[int, list[str]] = {}
    for k in new_rows:
        by_shard.setdefault(shard_of_key(k), []).append(k)
    recovered = 0
    for shard, keys in sorted(by_shard.items()):
        recovered += _merge_retry(lay, shard, {k: new_rows[k] for k in keys}, new_samples)
    shutil.rmtree(work, ignore_errors=True)
    log.info("retry-failed: %d rows retried, %d recovered", retry_in.num_rows, recovered)
    return {"retried": retry_in.num_rows, "recovered": recovered}


def _allowed_only(cfg: RunConfig, rows):
    """The retry rows whose (possibly refreshed) URL ``url_refusal`` allows; the others keep
    their earlier failure."""
    import pyarrow as pa

    from t2i_curate.pipeline.blocklist import blocked_urls
    from t2i_curate.pipeline.urlguard import url_refusal

    dcfg = guard_settings(cfg)
    urls = rows[cfg.input.url_col].to_pylist()  # a refreshed URL a blocklist names is not fetched either
    ok = [url_refusal(u, dcfg) is None and b is None for u, b in zip(urls, blocked_urls(cfg, urls), strict=True)]
    if not all(ok):
        log.warning("retry-failed: %d refreshed URL(s) refused, not retried", ok.count(False))
    return rows.filter(pa.array(ok, type=pa.bool_()))


def _merged_rows(old_rows: list[dict], names: list[str], rows: dict, new_samples: dict):
    """The shard's rows with the retried successes merged in under their original keys, and
    those samples' members (json rewritten to the original key)."""
    out_rows, additions = [], {}
    for r in old_rows:
        nr = rows.get(r["key"])
        if nr is not None and nr["status"] == "success":
            merged = {c: nr.get(c, r.get(c)) for c in names}
            merged["key"] = r["key"]
            out_rows.append(merged)
            parts = dict(new_samples.get(nr["key"], []))
            if "json" in parts:
                meta = json.loads(parts["json"])
                meta.pop("_orig_key", None)
                meta["key"] = r["key"]
                parts["json"] = json.dumps(meta, indent=4).encode()
            additions[r["key"]] = sorted(parts.items())
        else:
            if nr is not None:  # still failing: keep the newest error
                r = {**r, "status": nr["status"], "error_message": nr["error_message"]}
            out_rows.append(r)
    return out_rows, additions


def _merge_retry(lay: RunLayout, shard: int, rows: dict, new_samples: dict) -> int:
    """Rewrite shard ``shard`` with the successful retried rows; return how many."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    old = pq.read_table(lay.download_parquet(shard))
    out_rows, additions = _merged_rows(old.to_pylist(), old.schema.names, rows, new_samples)
    if additions:
        # a sample a crashed earlier merge already added is not copied twice
        kept = [(k, parts) for k, parts in read_samples(lay.download_tar(shard)).items() if k not in additions]
        write_samples(lay.download_tar(shard), kept + sorted(additions.items()))
    write_parquet(lay.download_parquet(shard), pa.Table.from_pylist(out_rows, schema=old.schema))
    if not additions:
        return 0
    recovered = len(additions)
    stats_path = lay.download_stats(shard)
    try:
        stats = json.loads(stats_path.read_text())
    except (OSError, ValueError) as e:
        log.warning("%s: cannot update stats after retry (%s); counts come from the parquet", stats_path, e)
    else:
        stats["successes"] = stats.get("successes", 0) + recovered
        stats["retried_ok"] = stats.get("retried_ok", 0) + recovered
        write_json(stats_path, stats)
    return recovered
