"""Run folders: create and check them before any work, resolve the URL list."""

from __future__ import annotations

import contextlib
import glob
import logging
from collections.abc import Iterator
from pathlib import Path

import yaml

from t2i_curate.pipeline.core.config import ConfigError, RunConfig, dump_config
from t2i_curate.pipeline.core.io import as_path, atomic_path, clean_tmp
from t2i_curate.pipeline.core.layout import RunLayout, demo_dir
from t2i_curate.pipeline.core.lock import RunFolderError, ensure_writable

log = logging.getLogger(__name__)


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_diff(a, b, f"{prefix}{k}."))
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} in the folder, {b!r} now")
    return out


def prepare_run(cfg: RunConfig) -> Path:
    """Create or reopen ``cfg.run_dir``; refuse a folder made by a different config.

    Selection and writing settings may change between runs (they are redone);
    anything that changes downloads or scores may not. Every blocklist is read and checked first.
    """
    from t2i_curate.filters.blocklist import check_blocklists, pinned

    check_blocklists(cfg)  # a malformed list stops the run here, before the folder or any download
    cfg = pinned(cfg)  # each list's sha256 recorded: a url / domain list edited later changes the fingerprint
    run = ensure_writable(cfg.run_dir)
    saved = RunLayout(run).config
    if saved.exists():
        try:
            old_data = yaml.safe_load(saved.read_text())
            old = RunConfig.model_validate(old_data)
        except Exception as e:  # any unreadable saved config is reported, never overwritten
            raise RunFolderError(f"{saved}: cannot read the saved config ({e}); move the run folder") from e
        if old.fingerprint() != cfg.fingerprint():
            diffs = [d for d in _diff(old.model_dump(mode="json"), cfg.model_dump(mode="json"))
                     if not d.startswith(RunConfig.REDOABLE)]
            raise RunFolderError(
                f"run folder {run} was made by a different config; refusing to mix outputs.\n"
                + "\n".join(f"  {d}" for d in diffs)
                + f"\nUse another name (--set name=...) or remove {run}."
            )
    with atomic_path(saved) as tmp:
        tmp.write_text(dump_config(cfg))
    n = clean_tmp(run)
    if n:
        log.info("removed %d temporary file(s) left by an interrupted run", n)
    return run


@contextlib.contextmanager
def url_source(cfg: RunConfig) -> Iterator[Path]:
    """The URL list to download: a user file, a folder or glob of parts, or the demo served on loopback."""
    if cfg.input.urls == "demo":
        from t2i_curate.pipeline.download.demo import serve_demo

        demo = ensure_writable(demo_dir(cfg.runs_dir))
        with serve_demo(demo, cfg.input.demo_size) as path:
            yield path
        return
    path = as_path(cfg.input.urls)
    if not (path.is_file() or path.is_dir() or glob.has_magic(str(path))):  # a folder / glob: parts.py
        raise ConfigError(f"input.urls: {path}: no such file or folder; expected a URL list (parquet/csv/tsv/"
                          f"jsonl), or a folder or glob of such parts")
    yield path
