"""Atomic file writes and shard listing shared by every stage."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it over ``final`` on success.

    A crash leaves only a ``.tmp-`` file that :func:`clean_tmp` removes and every
    reader ignores, never a half-written ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{TMP_MARK}{uuid.uuid4().hex[:8]}-{final.name}")
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(path: Path, table: Any) -> None:
    """Write a pyarrow Table atomically."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def clean_tmp(folder: Path) -> int:
    """Remove temporary files a killed run left behind; return how many."""
    n = 0
    if not folder.is_dir():
        return 0
    for p in folder.rglob(f"{TMP_MARK}*"):
        if p.is_file():
            p.unlink()
            n += 1
    return n


def shard_ids(folder: Path, suffix: str) -> list[int]:
    """Numeric ids of files ``NNNNN<suffix>`` in ``folder`` (temporaries excluded)."""
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        name = p.name
        if name.endswith(suffix) and not name.startswith(TMP_MARK):
            stem = name[: -len(suffix)]
            if stem.isdigit():
                out.append(int(stem))
    return sorted(out)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_stamp(*paths: Path) -> str:
    """A cheap fingerprint (size + mtime) of input files, to detect rewritten inputs."""
    parts = []
    for p in paths:
        st = Path(p).stat()
        parts.append(f"{Path(p).name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
