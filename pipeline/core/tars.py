"""The one tar reader and the one tar writer that every stage uses.

Reading: members come out as ``(key, ext, bytes)`` in tar order, only regular
files with safe relative names (``../x``, ``/abs`` and links are skipped and
logged, never followed). A truncated or damaged tar yields what was read before
the damage and then stops; the reason is appended to the caller's ``errors``.

Writing: members get a fixed mtime, mode 0444 and the USTAR format, so
identical samples give byte-identical tars, and the file appears under its final
name only when complete (:func:`~.io.atomic_path`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .io import as_path, atomic_path, is_remote

REMOTE_BLOCK = 16 << 20  # read-ahead for a tar on an object store: few requests per shard

log = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tiff"})
MISSING = "decode: image missing from the download tar (truncated or damaged tar?)"
# the sha256 of an image's bytes as stored in its download tar: the score stage records it (column
# ``image_sha256``) from the bytes it decodes, so write and verify can tell when those bytes changed
IMAGE_SHA256 = "image_sha256"


def image_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def safe_member_name(name: str) -> str | None:
    """A tar member name safe to use as a relative path, or None if it escapes."""
    if not name or name.startswith("/") or "\\" in name:
        return None
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    return name


@contextlib.contextmanager
def _open_tar(path):
    """A tar opened for reading: by name locally, through fsspec (large read-ahead blocks) on an object store."""
    if not is_remote(path):
        with tarfile.open(path) as tf:
            yield tf
        return
    with as_path(path).open("rb", block_size=REMOTE_BLOCK) as f, tarfile.open(fileobj=f) as tf:
        yield tf


def iter_members(path: Path, keys: set[str] | None = None, exts: Iterable[str] | None = None,
                 skip_exts: Iterable[str] = (), errors: list[str] | None = None, ordered: bool = False,
                 ) -> Iterator[tuple[str, str, bytes]]:
    """``(key, ext, bytes)`` of the regular-file members of ``path`` with safe names.

    ``keys``: only these keys; ``exts`` / ``skip_exts``: only / not these extensions
    (lower-cased). A damaged tar ends the iteration; its reason goes to ``errors``.
    ``ordered``: in key order, whatever order the writer used (img2dataset writes in download
    completion order), from the headers first, then each member's data; a member whose data cannot
    be read is left out.
    """
    want_ext = {e.lower() for e in exts} if exts is not None else None
    skip = {e.lower() for e in skip_exts}

    def wanted(m) -> tuple[str, str] | None:
        name = safe_member_name(m.name)
        if name is None or not m.isfile():
            log.warning("%s: skipping unsafe or non-file member %r", path, m.name)
            return None
        key, _, ext = name.partition(".")
        if (keys is not None and key not in keys) or ext.lower() in skip or (
                want_ext is not None and ext.lower() not in want_ext):
            return None
        return key, ext

    try:
        with _open_tar(path) as tf:
            if not ordered:
                for m in tf:
                    if (ke := wanted(m)) is not None:
                        yield *ke, tf.extractfile(m).read()
                return
            yield from _ordered(tf, wanted, path, errors)
    except (tarfile.TarError, EOFError, OSError) as e:  # truncated or damaged: keep what was read
        log.warning("%s: tar ends early or cannot be read (%s)", path, e)
        if errors is not None:
            errors.append(f"{type(e).__name__}: {e}")


def _ordered(tf, wanted, path, errors):
    found = []
    try:
        for m in tf:
            if (ke := wanted(m)) is not None:
                found.append((ke, m))
    except (tarfile.TarError, EOFError, OSError) as e:  # the headers before the damage still count
        log.warning("%s: tar ends early or cannot be read (%s)", path, e)
        if errors is not None:
            errors.append(f"{type(e).__name__}: {e}")
    for (key, ext), m in sorted(found, key=lambda x: x[0]):
        try:
            data = tf.extractfile(m).read()
        except (tarfile.TarError, EOFError, OSError) as e:
            log.warning("%s: member %s cannot be read (%s)", path, m.name, e)
            continue
        if len(data) == m.size:
            yield key, ext, data


def member_keys(path: Path, exts: Iterable[str] | None = None, errors: list[str] | None = None) -> set[str]:
    """Keys of the safe regular-file members (of ``exts``), from the headers alone: no data is read."""
    want_ext = {e.lower() for e in exts} if exts is not None else None
    keys: set[str] = set()
    try:
        with _open_tar(path) as tf:
            for m in tf:
                name = safe_member_name(m.name)
                key, _, ext = (name or "").partition(".")
                if name and m.isfile() and (want_ext is None or ext.lower() in want_ext):
                    keys.add(key)
    except (tarfile.TarError, EOFError, OSError) as e:  # truncated: the keys read so far
        log.warning("%s: tar ends early or cannot be read (%s)", path, e)
        if errors is not None:
            errors.append(f"{type(e).__name__}: {e}")
    return keys


def read_samples(path: Path, keys: set[str] | None = None, skip_exts: Iterable[str] = (),
                 errors: list[str] | None = None) -> dict[str, list[tuple[str, bytes]]]:
    """``key -> [(ext, bytes), ...]`` for the wanted keys (see :func:`iter_members`)."""
    out: dict[str, list[tuple[str, bytes]]] = {}
    for key, ext, data in iter_members(path, keys=keys, skip_exts=skip_exts, errors=errors):
        out.setdefault(key, []).append((ext, data))
    return out


def write_samples(path: Path, samples: Iterable[tuple[str, Iterable[tuple[str, bytes]]]]) -> None:
    """Write ``(key, [(ext, bytes), ...])`` samples, in the given order, atomically."""
    with atomic_path(path) as tmp, tmp.open("wb") as f, \
            tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, parts in samples:
            for ext, data in parts:
                info = tarfile.TarInfo(f"{key}.{ext}")
                # fixed mtime and mode: identical samples give byte-identical tars
                info.size, info.mode, info.mtime = len(data), 0o444, 0
                tf.addfile(info, io.BytesIO(data))
