"""Run folders: create and check them before any work, resolve the URL list."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import yaml

from pipeline.config import ConfigError, RunConfig, dump_config
from pipeline.io import atomic_path, clean_tmp

log = logging.getLogger(__name__)


class RunFolderError(RuntimeError):
    """The run folder cannot be used for this config."""


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_diff(a, b, f"{prefix}{k}."))
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} in the folder, {b!r} now")
    return out


def ensure_writable(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunFolderError(f"folder {folder} is not writable: {e}") from e
    return folder


def prepare_run(cfg: RunConfig) -> Path:
    """Create or reopen ``cfg.run_dir``; refuse a folder made by a different config.

    Selection and writing settings may change between runs (they are redone);
    anything that changes downloads or scores may not.
    """
    run = ensure_writable(cfg.run_dir)
    saved = run / "config.yaml"
    if saved.exists():
        try:
            old_data = yaml.safe_load(saved.read_text())
            old = RunConfig.model_validate(old_data)
        except Exception as e:  # any unreadable saved config is reported, never overwritten
            raise RunFolderError(f"{saved}: cannot read the saved config ({e}); move the run folder") from e
        if old.fingerprint() != cfg.fingerprint():
            diffs = [d for d in _diff(old.model_dump(mode="json"), cfg.model_dump(mode="json"))
                     if not d.startswith(("select.", "write.", "workers", "executor", "runs_dir"))]
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
    """The URL list to download: a user file, or the demo served on loopback."""
    if cfg.input.urls == "demo":
        from pipeline.demo import serve_demo

        demo_dir = ensure_writable(Path(cfg.runs_dir) / "_demo")
        with serve_demo(demo_dir, cfg.input.demo_size) as path:
            yield path
        return
    path = Path(os.path.expanduser(cfg.input.urls))
    if not path.is_file():
        raise ConfigError(f"input.urls: expected a URL list file (parquet/csv/tsv/jsonl), got {path}: no such file")
    yield path
