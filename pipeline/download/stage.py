"""Download stage: img2dataset's Python API, plus input normalisation and retry-failed.

Input (parquet / csv / tsv / jsonl, LAION's ``URL`` / ``TEXT`` or configured
names) is validated and normalised into ``download/_input.parquet``; extra
columns ride along. Output is img2dataset's own: ``NNNNN.tar`` +
``NNNNN.parquet`` + ``NNNNN_stats.json`` per shard, the stats file marking a
finished shard. ``retry_failed`` re-downloads only the rows that failed in
finished shards and merges the successes back under their original keys.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

from t2i_curate.pipeline.core.catalog import arrow
from t2i_curate.pipeline.core.config import InputConfig, RunConfig
from t2i_curate.pipeline.core.io import (
    as_path,
    duck_connect,
    is_remote,
    read_metadata,
    read_table,
    sql_path,
    write_json,
    write_parquet,
)
from t2i_curate.pipeline.core.layout import RunLayout, shard_of_key
from t2i_curate.pipeline.core.tars import read_samples, write_samples
from t2i_curate.pipeline.download.base import (
    _detect_format,
    _img2dataset_kwargs,
    _repair_utf8,
    download_summary,
    guard_settings,
    normalise_input,
    redo_short_shards,
    run_img2dataset,
)
from t2i_curate.pipeline.download.columns import InputError, plan_columns

log = logging.getLogger(__name__)


def read_url_list(path: Path, icfg: InputConfig):
    """Read and validate a URL list into a pyarrow Table (columns renamed as stored). A folder or glob
    of parts is only checked (schemas, pipeline/parts.py) and returned as a ``PartSet``, never read whole."""
    from t2i_curate.pipeline.download.parts import discover_parts, is_multi

    if is_multi(path):
        return discover_parts(path, icfg)
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson

    path = as_path(path)  # a UPath for an fsspec URL (s3://...): read through its filesystem
    if not path.exists():
        raise InputError(f"input.urls: {path} does not exist")
    fmt = _detect_format(path, icfg.format)
    try:
        if fmt == "parquet":
            table = read_table(path)
        else:
            with contextlib.ExitStack() as stack:
                src = stack.enter_context(path.open("rb")) if is_remote(path) else path
                if fmt in ("csv", "tsv"):
                    opts = pcsv.ParseOptions(delimiter="," if fmt == "csv" else "\t")
                    table = pcsv.read_csv(src, parse_options=opts)
                else:
                    table = pjson.read_json(src)
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
    plan_columns(table.schema, icfg)  # a column of a type that cannot be carried is refused before any work
    return table


def prepare_input(run_dir: Path, url_path: Path, icfg: InputConfig, table=None) -> tuple[Path, list[str]]:
    """Validate the URL list (unless ``table`` is the validated list) and write the
    normalised copy; return its path and the extra columns. Parts: check the recorded ones are unchanged,
    return the folder of normalised parts (new parts are normalised by the download stage)."""
    from t2i_curate.pipeline.download.parts import check_recorded, discover_parts, is_multi, load_manifest

    if is_multi(url_path):
        lay = RunLayout(run_dir)
        man = load_manifest(lay)
        if man is None:
            raise InputError(f"{run_dir}: no input parts normalised yet; run `curate download` first")
        check_recorded(man, table if table is not None else discover_parts(url_path, icfg))
        return lay.input_dir, man["extras"]
    if table is None:
        table = read_url_list(url_path, icfg)
    table, extras = normalise_input(table, icfg)
    out = RunLayout(run_dir).input_file
    write_parquet(out, table)
    return out, extras


def expected_shards(n_rows: int, per_shard: int) -> int:
    return (n_rows + per_shard - 1) // per_shard


def split_refused(cfg: RunConfig, lay: RunLayout) -> tuple[Path, int, int]:
    """Write the rows img2dataset may fetch to ``_fetch.parquet`` and the refused ones, with
    their reasons, to ``_refused.parquet`` (removed when none); return (fetch list, refused, blocked).
    Rows a url / domain blocklist names (``pipeline/blocklist.py``) are refused too, with the list's
    rule in column ``rule`` (NULL for the URL guard's refusals): select drops them under that rule."""
    import pyarrow as pa

    from t2i_curate.filters.blocklist import blocked_urls
    from t2i_curate.pipeline.core.urls import url_refusal

    table = read_table(lay.input_file)
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

    from t2i_curate.pipeline.download.parts import PartSet, download_parts, is_multi

    if isinstance(table, PartSet) or (table is None and is_multi(url_path)):
        return download_parts(cfg, run_dir, url_path, table)
    lay = RunLayout(run_dir)
    _, extras = prepare_input(run_dir, url_path, cfg.input, table)
    fetch_path, n_refused, n_blocked = split_refused(cfg, lay)
    out = lay.download
    n_rows = read_metadata(fetch_path).num_rows
    redo_short_shards(lay)  # a shard with fewer rows than its stats count is not finished
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


def retry_failed(cfg: RunConfig, run_dir: Path, url_path: Path | None = None) -> dict:
    """Re-download the rows that failed in finished shards; merge successes in place.

    Each affected shard's tar and parquet are rewritten atomically, keys kept.
    Returns ``{"retried": n, "recovered": m}``.
    """
    import pyarrow as pa

    lay = RunLayout(run_dir)
    files = [sql_path(lay.download_parquet(s)) for s in lay.finished_downloads()]
    if not files:
        return {"retried": 0, "recovered": 0}
    con = duck_connect(lay.root)
    failed = arrow(con, "SELECT key, input_row FROM read_parquet(?) WHERE status <> 'success' ORDER BY key",
                   [files])
    if failed.num_rows == 0:
        return {"retried": 0, "recovered": 0}
    # Rows come from the current input (its URLs may have been refreshed), by input_row.
    if lay.input_file.exists():
        current = read_table(lay.input_file)
        rows = current.take(pa.array(failed["input_row"].to_pylist(), type=pa.int64()))
    else:  # input parts: only the failed rows are read
        from t2i_curate.pipeline.download.parts import read_input_rows

        rows = read_input_rows(lay, failed["input_row"].to_pylist())
    retry_in = _allowed_only(cfg, rows.append_column("_orig_key", failed["key"]))
    if retry_in.num_rows == 0:
        return {"retried": 0, "recovered": 0}
    # img2dataset's scratch output: inside the run folder locally, a local temporary folder for a remote run
    work = Path(tempfile.mkdtemp(prefix="t2i-retry-")) if is_remote(lay.root) else lay.retry_dir
    try:
        new_rows, new_samples = _fetch_retry(cfg, retry_in, work)
        by_shard: dict[int, list[str]] = {}
        for k in new_rows:
            by_shard.setdefault(shard_of_key(k), []).append(k)
        recovered = 0
        for shard, keys in sorted(by_shard.items()):
            recovered += _merge_retry(lay, shard, {k: new_rows[k] for k in keys}, new_samples)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("retry-failed: %d rows retried, %d recovered", retry_in.num_rows, recovered)
    return {"retried": retry_in.num_rows, "recovered": recovered}


def _fetch_retry(cfg: RunConfig, retry_in, work: Path) -> tuple[dict, dict]:
    """img2dataset on the retry rows, in the local folder ``work``: (rows by original key, samples by key)."""
    import pyarrow.parquet as pq

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pq.write_table(retry_in, work / "input.parquet")
    extras = [c for c in retry_in.column_names if c not in (cfg.input.url_col, cfg.input.caption_col)]
    kwargs = _img2dataset_kwargs(cfg, extras)
    kwargs["number_sample_per_shard"] = max(1, retry_in.num_rows)
    run_img2dataset(work / "input.parquet", work / "out", kwargs, cfg.ray, cfg.download.max_image_pixels)
    new_meta = pq.read_table(work / "out" / "00000.parquet")
    new_samples = read_samples(work / "out" / "00000.tar") if (work / "out" / "00000.tar").exists() else {}
    return {r["_orig_key"]: r for r in new_meta.to_pylist()}, new_samples


def _allowed_only(cfg: RunConfig, rows):
    """The retry rows whose (possibly refreshed) URL ``url_refusal`` allows; the others keep
    their earlier failure."""
    import pyarrow as pa

    from t2i_curate.filters.blocklist import blocked_urls
    from t2i_curate.pipeline.core.urls import url_refusal

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

    old = read_table(lay.download_parquet(shard))
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
