"""What the single-list and the parts download paths share: the input list's normalisation (column
names, types, UTF-8, ``input_row``), the URL-guard settings, and img2dataset's invocation and summary.
``download/stage.py`` and ``download/parts.py`` both build on it (neither imports the other at load);
the input columns' names and types are ``download/columns.py``'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from t2i_curate.pipeline.core.config import InputConfig, RunConfig
from t2i_curate.pipeline.core.io import duck_connect, sql_path
from t2i_curate.pipeline.core.layout import RunLayout, shard_name
from t2i_curate.pipeline.download.columns import InputError, json_safe, plan_columns

log = logging.getLogger(__name__)

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
    """Pick and rename columns for img2dataset (names the pipeline writes carried as ``input_<name>``, types
    img2dataset cannot write into its json converted to text: :func:`json_safe`), log what changed once, and
    add ``input_row``; return (table, extra column names)."""
    import pyarrow as pa

    plan = plan_columns(table.schema, icfg)
    if plan.renamed:
        log.info("input: %d column(s) carried as input_<name>, since the pipeline writes that name: %s",
                    len(plan.renamed), ", ".join(f"{c!r} -> {n!r}" + (f" ({plan.notes[c]})" if c in plan.notes else "")
                                                for c, n in plan.renamed.items()))
    if plan.converted:
        log.info("input: %d column(s) converted to text, since img2dataset cannot write their type into "
                    "its json: %s", len(plan.converted),
                    ", ".join(f"{n!r} ({how})" for n, how in plan.converted.items()))
    out = json_safe(table.select(plan.source).rename_columns(plan.names))
    # the row's position in the input: joins every result back to its input row
    out = out.append_column("input_row", pa.array(range(out.num_rows), type=pa.int64()))
    return out, plan.names[1 + bool(icfg.caption_col):] + ["input_row"]


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
        from t2i_curate.pipeline.executors.ray_tasks import ensure_ray

        ensure_ray(ray_cfg)
    output.mkdir(parents=True, exist_ok=True)
    # img2dataset prints its own progress to stdout; keep ours on the log.
    with private_tmpdir():
        i2d_download(url_list=str(url_list), output_folder=str(output), **kwargs)
    check_disk(output)


# a download folder's filesystem with less free space than this, and shards img2dataset left unfinished:
# the disk filled up (img2dataset logs each shard's failure and carries on; the run must stop instead)
DISK_FULL_BYTES = 16 * 2**20


def check_disk(output) -> None:
    """Stop with one line when img2dataset left shards unfinished (a tar or parquet without its stats
    file) on a full disk; a local folder only (a store has no such limit)."""
    import shutil

    from t2i_curate.pipeline.core.errors import disk_full
    from t2i_curate.pipeline.core.io import file_names, is_remote, shard_ids

    if is_remote(output):
        return
    names = file_names(output)
    started = set(shard_ids(output, ".tar", names)) | set(shard_ids(output, ".parquet", names))
    unfinished = sorted(started - set(shard_ids(output, "_stats.json", names)))
    if unfinished and shutil.disk_usage(output).free < DISK_FULL_BYTES:
        raise disk_full(output, f"during the download: {len(unfinished)} shard(s) unfinished "
                                f"({', '.join(map(shard_name, unfinished[:5]))})")


@contextlib.contextmanager
def private_tmpdir():
    """img2dataset imports wandb, which makes two temporary folders per process at import and never
    removes those of img2dataset's worker processes: point TMPDIR at a folder of ours for the call (the
    workers inherit it) and remove it after."""
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="t2i-img2dataset-")
    old, old_cached = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = d, None
    try:
        yield d
    finally:
        if old is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = old
        tempfile.tempdir = old_cached
        shutil.rmtree(d, ignore_errors=True)


def guard_settings(cfg: RunConfig):
    """The download settings the URL guard applies: private addresses are allowed when the config says
    so, or (``allow_private_addresses`` unset) for the built-in demo alone, never a user's list."""
    allow = cfg.download.allow_private_addresses
    return cfg.download.model_copy(update={"allow_private_addresses": cfg.input.urls == "demo" if allow is None
                                           else allow})


def redo_short_shards(lay: RunLayout) -> list[int]:
    """Download shards whose parquet holds fewer rows than their ``_stats.json`` counts (samples img2dataset
    counted, then failed to write: ``RunLayout.short_downloads``) are not finished: their stats file (the
    marker img2dataset's incremental mode reads) is removed first, then the parquet and tar, so the
    download redoes them. One warning line; returns the shards."""
    short = lay.short_downloads(lay.finished_downloads())
    if not short:
        return []
    log.warning("download: %d finished shard(s) hold fewer rows than their _stats.json counts; redone: %s",
                len(short), ", ".join(f"{shard_name(s)} ({why})" for s, why in sorted(short.items())))
    for s in sorted(short):
        for p in (lay.download_stats(s), lay.download_parquet(s), lay.download_tar(s)):
            p.unlink(missing_ok=True)
    return sorted(short)


def download_summary(lay: RunLayout) -> dict:
    shards = lay.finished_downloads()
    if not shards:
        return {"shards": 0, "rows": 0, "success": 0, "failed": 0}
    files = [sql_path(lay.download_parquet(s)) for s in shards]
    row = duck_connect(lay.root).execute(
        "SELECT count(*), count(*) FILTER (status = 'success') FROM read_parquet(?)", [files]
    ).fetchall()[0]
    return {"shards": len(shards), "rows": row[0], "success": row[1], "failed": row[0] - row[1]}
