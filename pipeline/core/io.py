"""Paths that may live on an object store, atomic writes, and shard listing shared by every stage.

A run folder is a local path or an fsspec URL (``s3://bucket/runs``, ``gs://...``, ``memory://...``).
:func:`as_path` turns either into a path object: :class:`pathlib.Path` locally, a
``universal_pathlib`` ``UPath`` on any fsspec filesystem, which offers the same methods
(``/``, ``exists``, ``open``, ``glob``, ``iterdir``, ``stat``, ``unlink``). What pathlib cannot
do for a remote path (pyarrow, DuckDB, renames) goes through the helpers here.

Commit protocol: locally an output is written under a ``.tmp-`` name and renamed into place
(atomic). An object store has no atomic rename: the output is written under a ``.tmp-`` key
and moved to its final key (server-side copy, then delete of the temporary key); a PUT is
atomic per object, so the final key is either absent or whole. A stage whose shard has more
than one output writes its completion marker last (img2dataset's ``_stats.json``, the scores
parquet after the embeddings, the selected parquet after the tar), readers trust only marked
shards, and :func:`clean_tmp` deletes what a killed run left under ``.tmp-`` names.
"""

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


def is_url(spec: Any) -> bool:
    """True for an fsspec URL of a non-local filesystem (``s3://``, ``gs://``, ``memory://``...)."""
    s = str(spec)
    return "://" in s and not s.startswith("file://")


def as_path(spec: Any):
    """A local :class:`Path` (``~`` expanded), or a ``UPath`` for an fsspec URL; a path object is kept.

    Remote listings are never cached: another process (img2dataset's workers, a Ray task) may
    have written since the last look.
    """
    if is_url(spec):
        from upath import UPath

        if isinstance(spec, UPath):
            return spec
        return UPath(str(spec), use_listings_cache=False)
    if isinstance(spec, Path):
        return spec
    s = str(spec)
    return Path(os.path.expanduser(s[len("file://"):] if s.startswith("file://") else s))


is_remote = is_url  # read as "this path is on a remote filesystem"


def sql_path(path: Any) -> str:
    """The path as DuckDB reads it (absolute locally; the URL for a remote one, see :func:`duck_connect`)."""
    p = as_path(path)
    return str(p) if is_remote(p) else str(p.resolve())


def duck_connect(*paths: Any, database: str = ":memory:"):
    """A DuckDB connection that can read the given paths: fsspec filesystems of remote ones are registered.

    DuckDB's own httpfs extension would have to be downloaded; registering the fsspec filesystem
    works offline and with any fsspec protocol, credentials from the usual environment variables.
    """
    import duckdb

    con = duckdb.connect(database)
    seen: set[str] = set()
    for p in paths:
        p = as_path(p)
        if is_remote(p) and p.protocol not in seen:
            con.register_filesystem(p.fs)
            seen.add(p.protocol)
    return con


def _arrow(path: Any) -> tuple[str, Any]:
    """(path, pyarrow filesystem) for a pyarrow call: the fsspec filesystem wrapped for a remote path."""
    p = as_path(path)
    if not is_remote(p):
        return str(p), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return p.path, PyFileSystem(FSSpecHandler(p.fs))


def read_table(path: Any, **kw):
    import pyarrow.parquet as pq

    src, fs = _arrow(path)
    return pq.read_table(src, filesystem=fs, **kw)


def read_metadata(path: Any):
    import pyarrow.parquet as pq

    src, fs = _arrow(path)
    return pq.read_metadata(src, filesystem=fs)


def read_schema(path: Any):
    import pyarrow.parquet as pq

    src, fs = _arrow(path)
    return pq.read_schema(src, filesystem=fs)


def parquet_file(path: Any):
    import pyarrow.parquet as pq

    src, fs = _arrow(path)
    return pq.ParquetFile(src, filesystem=fs)


def parquet_writer(path: Any, schema, **kw):
    """A ``pq.ParquetWriter`` on ``path`` (use it on an :func:`atomic_path` temporary)."""
    import pyarrow.parquet as pq

    src, fs = _arrow(path)
    return pq.ParquetWriter(src, schema, filesystem=fs, **kw)


def arrow_dataset(paths: list, **kw):
    """A pyarrow dataset over parquet files that share one filesystem."""
    import pyarrow.dataset as ds

    pairs = [_arrow(p) for p in paths]
    return ds.dataset([s for s, _ in pairs], filesystem=pairs[0][1] if pairs else None, format="parquet", **kw)


def load_npy(path: Any):
    import numpy as np

    with as_path(path).open("rb") as f:
        return np.load(f)


@contextlib.contextmanager
def atomic_path(final: Any) -> Iterator[Any]:
    """Yield a temporary path beside ``final``; move it over ``final`` on success.

    A crash leaves only a ``.tmp-`` file (or key) that :func:`clean_tmp` removes and every
    reader ignores, never a half-written ``final``.
    """
    final = as_path(final)
    if is_remote(final):
        yield from _atomic_remote(final)
        return
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


def _atomic_remote(final) -> Iterator[Any]:
    tmp = final.with_name(f"{TMP_MARK}{uuid.uuid4().hex[:8]}-{final.name}")
    try:
        yield tmp
        replace(tmp, final)  # a missing temporary raises, as os.replace does
    finally:
        with contextlib.suppress(FileNotFoundError):
            if tmp.fs.exists(tmp.path):
                tmp.fs.rm(tmp.path)


def replace(tmp: Any, final: Any) -> None:
    """Move a finished temporary over its final name: ``os.replace`` locally, a move on an object store."""
    tmp, final = as_path(tmp), as_path(final)
    if is_remote(final):
        final.fs.mv(tmp.path, final.path)
    else:
        os.replace(tmp, final)


def upload(local: Path, remote: Any) -> None:
    """Copy a finished local file to ``remote`` (a path on a store) under a temporary key, then into place."""
    with atomic_path(remote) as tmp:
        tmp.fs.put_file(str(local), tmp.path)


def write_json(path: Any, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(path: Any, table: Any, **kw) -> None:
    """Write a pyarrow Table atomically."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        src, fs = _arrow(tmp)
        pq.write_table(table, src, filesystem=fs, **kw)


def clean_tmp(folder: Any) -> int:
    """Remove temporary files (or keys) a killed run left behind; return how many."""
    folder = as_path(folder)
    if is_remote(folder):
        if not folder.fs.isdir(folder.path):
            return 0
        found = [f for f in folder.fs.find(folder.path) if f.rsplit("/", 1)[-1].startswith(TMP_MARK)]
        if found:
            folder.fs.rm(found)
        return len(found)
    n = 0
    if not folder.is_dir():
        return 0
    for p in folder.rglob(f"{TMP_MARK}*"):
        if p.is_file():
            p.unlink()
            n += 1
    return n


def file_names(folder: Any) -> set[str]:
    """Names of the entries of ``folder`` (empty if it is absent): one listing, also on a store (one
    LIST request per 1,000 keys instead of a HEAD per file)."""
    folder = as_path(folder)
    if not folder.is_dir():
        return set()
    return {p.name for p in folder.iterdir()}


def shard_ids(folder: Any, suffix: str, names: set[str] | None = None) -> list[int]:
    """Numeric ids of files ``NNNNN<suffix>`` in ``folder`` (temporaries excluded); ``names``: its
    listing, when the caller has it already."""
    out = []
    for name in file_names(folder) if names is None else names:
        if name.endswith(suffix) and not name.startswith(TMP_MARK):
            stem = name[: -len(suffix)]
            if stem.isdigit():
                out.append(int(stem))
    return sorted(out)


FOOTER_THREADS = 32  # concurrent small reads (parquet footers, stats files) on an object store
LOCAL_FOOTER_THREADS = 8  # ... and on a local or shared file system


def footer_threads(root: Any) -> int:
    """Concurrent small reads: many on an async store driver (s3fs, gcsfs, adlfs: one IO loop, safe from
    threads), a few on a local or shared file system (NFS, Lustre), one on other drivers."""
    root = as_path(root)
    if not is_remote(root):
        return LOCAL_FOOTER_THREADS
    return FOOTER_THREADS if getattr(root.fs, "async_impl", False) else 1


def sha256_file(path: Any, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with as_path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _size_mtime(st: Any, remote: bool) -> tuple[int, int]:
    """(size, modification time in ns) of a stat result; on a store truncated to whole seconds, since
    a HEAD's Last-Modified has one-second resolution while a listing may give milliseconds (a HEAD's
    value is unchanged, so stamps written before listings were used still match)."""
    if remote:
        return int(st.st_size), int(st.st_mtime) * 1_000_000_000
    return int(st.st_size), int(st.st_mtime_ns)


def file_stats(folder: Any) -> dict[str, tuple[int, int]]:
    """``{name: (size, mtime)}`` of the files in ``folder`` from one listing (empty if absent), the
    same figures :func:`file_stamp` reads per file: on a store, one LIST per 1,000 keys instead of
    a HEAD per file."""
    folder = as_path(folder)
    if not folder.is_dir():
        return {}
    if not is_url(folder):
        with os.scandir(folder) as it:
            return {e.name: _size_mtime(e.stat(), False) for e in it if e.is_file()}
    from upath._stat import UPathStatResult

    return {info["name"].rstrip("/").rsplit("/", 1)[-1]: _size_mtime(UPathStatResult.from_info(info), True)
            for info in folder.fs.ls(folder.path, detail=True) if info.get("type") == "file"}


def file_stamp(*paths: Any, stats: dict[str, tuple[int, int]] | None = None) -> str:
    """A cheap fingerprint (size + mtime) of input files, to detect rewritten inputs. ``stats``: the
    :func:`file_stats` of their folder, when the caller has it (no request per file)."""
    parts = []
    for p in paths:
        p = as_path(p)
        size, mtime = stats[p.name] if stats and p.name in stats else _size_mtime(p.stat(), is_url(p))
        parts.append(f"{p.name}:{size}:{mtime}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
