"""The run folder's layout: every path inside a run, shard names, and key -> shard.

No other module spells a run-folder path or a shard number format; they ask a
:class:`RunLayout`. img2dataset names its shards with five digits and its keys
start with the shard number, so ``shard_of_key`` is the inverse of its keying.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from t2i_curate.pipeline.core.io import (
    as_path,
    file_names,
    footer_threads,
    is_remote,
    read_metadata,
    shard_ids,
)

SHARD_DIGITS = 5


def shard_name(n: int) -> str:
    """Shard number -> file stem (``00042``)."""
    return f"{n:0{SHARD_DIGITS}d}"


def shard_of_key(key: str) -> int:
    """img2dataset keys are the shard number (five digits here) followed by the in-shard index."""
    return int(key[:SHARD_DIGITS])


def demo_dir(runs_dir: str | Path) -> Path:
    """The built-in demo's generated images and URL list, shared by every run under ``runs_dir``.

    They are served over HTTP from a local folder, so a run folder on an object store keeps them
    in the local cache (``$XDG_CACHE_HOME/t2i_curate/demo``) instead.
    """
    if is_remote(runs_dir):
        return cache_home() / "demo"
    return as_path(runs_dir) / "_demo"


def cache_home() -> Path:
    """This machine's cache folder for t2i_curate (``$XDG_CACHE_HOME/t2i_curate``, default ``~/.cache``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "t2i_curate"


def local_cache(kind: str, run_root) -> Path:
    """A local folder for what a run on an object store keeps on this machine (``kind``: thumbs, eval...):
    one folder per run URL, so a rerun here finds it again."""
    import hashlib

    return cache_home() / kind / hashlib.sha256(str(run_root).rstrip("/").encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run folder (``runs/<name>/``): local paths, or ``UPath`` s on an fsspec URL (io.as_path)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", as_path(self.root))

    # --- download (img2dataset's own output, plus our normalised input) ---
    @property
    def download(self) -> Path:
        return self.root / "download"

    @property
    def input_file(self) -> Path:
        """The validated, normalised URL list (every input row, with ``input_row``)."""
        return self.download / "_input.parquet"

    @property
    def fetch_file(self) -> Path:
        """The rows handed to img2dataset (the input less refused rows)."""
        return self.download / "_fetch.parquet"

    @property
    def refused_file(self) -> Path:
        """Input rows refused before any fetch (scheme, private address), with the reason."""
        return self.download / "_refused.parquet"

    @property
    def retry_dir(self) -> Path:
        return self.download / "_retry"

    # --- input given as parts (a folder or glob; pipeline/parts.py): one file of each kind per part ---
    @property
    def input_dir(self) -> Path:
        return self.download / "_input"

    @property
    def parts_manifest(self) -> Path:
        """The parts this run has normalised (name, size, mtime, rows, fetch files), written after each."""
        return self.input_dir / "_parts.json"

    @property
    def fetch_dir(self) -> Path:
        """The folder handed to img2dataset: it numbers shards on across these files in name order."""
        return self.download / "_fetch"

    @property
    def refused_dir(self) -> Path:
        return self.download / "_refused"

    def input_part(self, p: int) -> Path:
        return self.input_dir / f"part-{shard_name(p)}.parquet"

    def refused_part(self, p: int) -> Path:
        return self.refused_dir / f"part-{shard_name(p)}.parquet"

    def fetch_chunk(self, p: int, c: int) -> Path:
        return self.fetch_dir / f"part-{shard_name(p)}-{c:04d}.parquet"

    def input_files(self) -> list[Path]:
        """Every normalised input file: the single list's, or one per part."""
        if self.input_file.exists():
            return [self.input_file]
        return sorted(self.input_dir.glob("part-*.parquet")) if self.input_dir.is_dir() else []

    def refused_files(self) -> list[Path]:
        if self.refused_file.exists():
            return [self.refused_file]
        return sorted(self.refused_dir.glob("part-*.parquet")) if self.refused_dir.is_dir() else []

    def download_tar(self, n: int) -> Path:
        return self.download / f"{shard_name(n)}.tar"

    def download_parquet(self, n: int) -> Path:
        return self.download / f"{shard_name(n)}.parquet"

    def download_stats(self, n: int) -> Path:
        """Written last by img2dataset: marks a finished download shard."""
        return self.download / f"{shard_name(n)}_stats.json"

    def finished_downloads(self, names: set[str] | None = None) -> list[int]:
        """Download shards img2dataset finished (stats file, written last, plus tar and parquet).
        ``names``: the download folder's listing, when the caller has it."""
        if names is None:
            names = file_names(self.download)  # one listing, not two existence checks per shard
        return [s for s in shard_ids(self.download, "_stats.json", names)
                if f"{shard_name(s)}.parquet" in names and f"{shard_name(s)}.tar" in names]

    def short_downloads(self, shards: list[int]) -> dict[int, str]:
        """Among finished download shards, those that are not whole: shard -> why. img2dataset counts a
        sample in its stats (``count``: the rows it was handed) before writing it, so a sample whose write
        failed leaves a parquet with fewer rows than ``count``; an unreadable stats file or parquet footer
        counts too. A stats file without ``count`` (not img2dataset's) is taken as it is. The footers and
        stats files are read concurrently (:func:`io.footer_threads`). The download stage redoes
        these shards (``download.base.redo_short_shards``)."""
        import json
        from concurrent.futures import ThreadPoolExecutor

        def why(s: int) -> str | None:
            try:
                count = json.loads(self.download_stats(s).read_text()).get("count")
            except (OSError, ValueError, AttributeError) as e:
                return f"stats unreadable ({type(e).__name__})"
            if not isinstance(count, int):
                return None
            try:
                rows = read_metadata(self.download_parquet(s)).num_rows
            except Exception as e:  # truncated, not a parquet file: redone like a short one
                return f"parquet unreadable ({type(e).__name__})"
            return None if rows >= count else f"{rows} of {count} rows"

        with ThreadPoolExecutor(footer_threads(self.root)) as pool:
            return {s: w for s, w in zip(shards, pool.map(why, shards), strict=True) if w is not None}

    # --- scores ---
    @property
    def scores(self) -> Path:
        return self.root / "scores"

    def score_parquet(self, n: int) -> Path:
        return self.scores / f"{shard_name(n)}.parquet"

    def embeddings(self, n: int) -> Path:
        return self.scores / "embeddings" / f"{shard_name(n)}.npy"

    def embeddings_rel(self, n: int) -> str:
        """The embeddings file as recorded in the scores parquet metadata (relative to scores/)."""
        return f"embeddings/{shard_name(n)}.npy"

    # --- selection and curated shards ---
    @property
    def selected(self) -> Path:
        return self.root / "selected"

    @property
    def decisions(self) -> Path:
        return self.selected / "decisions.parquet"

    @property
    def manifest(self) -> Path:
        return self.selected / "manifest.json"

    def selected_tar(self, n: int) -> Path:
        return self.selected / f"{shard_name(n)}.tar"

    def selected_parquet(self, n: int) -> Path:
        return self.selected / f"{shard_name(n)}.parquet"

    # --- reports, catalog, eval ---
    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def report_html(self) -> Path:
        """The curation report (report/curation.py): one self-contained page."""
        return self.report / "index.html"

    @property
    def coverage_file(self) -> Path:
        """Concept coverage (pipeline/coverage.py): one row per concept and measure."""
        return self.report / "coverage.parquet"

    @property
    def coverage_rules_file(self) -> Path:
        """Concept coverage per dropping rule: one row per concept, measure and reason."""
        return self.report / "coverage_rules.parquet"

    def report_thumbs(self, px: int) -> Path:
        """Cached report thumbnails (``<key>.jpg``) of one size, made once per run. A run on an object store
        keeps them on this machine (the page embeds them; one small object per thumbnail would cost a
        request each)."""
        if is_remote(self.root):
            return local_cache("thumbs", self.root) / str(px)
        return self.report / "thumbs" / str(px)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.duckdb"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def eval_dir(self, tag: str) -> Path:
        return self.eval / tag

    @property
    def reference_cache(self) -> Path:
        """Cached FID/KID reference statistics, shared by every evaluated model of the run; kept on this
        machine, beside eval's working folders, for a run on an object store (torch.load needs a file)."""
        if is_remote(self.root):
            return local_cache("eval", self.root) / "_reference"
        return self.eval / "_reference"
