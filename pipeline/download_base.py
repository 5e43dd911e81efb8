"""What the single-list and the parts download paths share: the input list's normalisation (column
names, types, UTF-8, ``input_row``), the URL-guard settings, and img2dataset's invocation and summary.
``pipeline/download.py`` and ``pipeline/parts.py`` both build on it (neither imports the other at load).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from t2i_curate.pipeline.config import InputConfig, RunConfig
from t2i_curate.pipeline.errors import UserError
from t2i_curate.pipeline.io import duck_connect, sql_path
from t2i_curate.pipeline.layout import RunLayout

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


def guard_settings(cfg: RunConfig):
    """The download settings the URL guard applies: private addresses are allowed when the config says
    so, or (``allow_private_addresses`` unset) for the built-in demo alone, never a user's list."""
    allow = cfg.download.allow_private_addresses
    return cfg.download.model_copy(update={"allow_private_addresses": cfg.input.urls == "demo" if allow is None
                                           else allow})


def download_summary(lay: RunLayout) -> dict:
    shards = lay.finished_downloads()
    if not shards:
        return {"shards": 0, "rows": 0, "success": 0, "failed": 0}
    files = [sql_path(lay.download_parquet(s)) for s in shards]
    row = duck_connect(lay.root).execute(
        "SELECT count(*), count(*) FILTER (status = 'success') FROM read_parquet(?)", [files]
    ).fetchall()[0]
    return {"shards": len(shards), "rows": row[0], "success": row[1], "failed": row[0] - row[1]}
