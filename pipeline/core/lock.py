"""The run folder's lock: one writer at a time (``run_lock``), and the writability check it starts with."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from t2i_curate.pipeline.core.errors import UserError
from t2i_curate.pipeline.core.io import as_path, is_remote
from t2i_curate.pipeline.core.layout import RunLayout

log = logging.getLogger(__name__)


class RunFolderError(UserError):
    """The run folder cannot be used for this config."""


def ensure_writable(folder: Path) -> Path:
    try:
        if not is_remote(folder):  # an object store has no folders (and a missing bucket is never created)
            folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunFolderError(f"folder {folder} is not writable: {e}") from e
    return folder


# --- the run folder's lock: one writer at a time ---------------------------------------------

GARBAGE_STALE_S = 10.0  # an unreadable lock younger than this may be one being written right now


def _pid_alive(pid: int) -> bool:
    """The process exists and has not exited: a zombie (killed, not yet reaped by its parent) is dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    try:  # Linux: the state field follows the command name in parentheses
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:][:1] not in ("Z", "X")
    except (OSError, ValueError):  # no /proc (macOS): the signal check alone
        return True


def _read_lock(path: Path) -> tuple[bytes | None, dict | None]:
    """The lock's raw bytes (None if it is gone) and its holder (None if the file is not a valid lock)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError:
        return b"", None
    try:
        data = json.loads(raw)
    except ValueError:
        return raw, None
    ok = (isinstance(data, dict) and isinstance(data.get("pid"), int) and data["pid"] > 0
          and isinstance(data.get("host"), str))
    return raw, (data if ok else None)


def _create_lock(path: Path, payload: bytes) -> bool:
    """Create ``path`` holding ``payload`` if no file is there (atomic); False if one is.

    Exclusive create: O_EXCL locally, a conditional PUT (``If-None-Match: *``) on S3 (s3fs's mode "x").
    """
    try:
        f = path.open("xb")
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError) as e:  # a filesystem without exclusive create
        return _create_lock_racy(path, payload, e)
    try:
        with f:
            f.write(payload)
    except FileExistsError:  # an object store checks the condition when the object is written
        return False
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return True


def _create_lock_racy(path: Path, payload: bytes, why: Exception) -> bool:
    """Best effort where the filesystem cannot create exclusively: absent, write, read back our own bytes."""
    log.warning("%s: this filesystem has no exclusive create (%s); the run lock is best effort", path, why)
    if path.exists():
        return False
    path.write_bytes(payload)
    return path.read_bytes() == payload


def _stale_reason(path: Path, holder: dict | None) -> str | None:
    """Why the lock may be taken over, or None while its holder may still be at work."""
    if holder is None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None
        return f"unreadable lock file, {age:.0f} s old" if age > GARBAGE_STALE_S else None
    if holder["host"] == socket.gethostname() and not _pid_alive(holder["pid"]):
        return f"process {holder['pid']} on this host is gone"
    return None


def _in_use(path: Path, holder: dict | None) -> str:
    run = path.parent
    if holder is None:
        return (f"run folder {run} is being locked by another process ({path} is unreadable or still being "
                f"written); wait a few seconds and retry, or remove {path} if no curate command is running")
    who = (f"`{holder.get('command') or 'curate'}` (pid {holder['pid']} on host {holder['host']}, "
           f"since {holder.get('started') or '?'})")
    msg = f"run folder {run} is in use by {who}; wait for it to finish, or remove {path} if that process is gone"
    if holder["host"] != socket.gethostname():
        msg += f" (a lock from another host is never taken over automatically; this host is {socket.gethostname()})"
    return msg


def _take_over(path: Path, seen: bytes) -> bool:
    """Move the stale lock aside; if it is no longer the one judged stale (another taker won), put it back."""
    if is_remote(path):  # no rename or link on an object store: remove it if it is still the stale one
        try:
            if path.read_bytes() != seen:
                return False
            path.unlink()
        except FileNotFoundError:
            pass
        return True
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # removed meanwhile: the O_EXCL create decides
    try:
        if aside.read_bytes() == seen:
            return True
        with contextlib.suppress(OSError):
            os.link(aside, path)  # restore the other taker's fresh lock (fails if yet another is there)
        return False
    finally:
        aside.unlink(missing_ok=True)


def _acquire(path: Path, payload: bytes) -> None:
    if _create_lock(path, payload):
        return
    seen, holder = _read_lock(path)
    if seen is None:  # released between the two calls
        if _create_lock(path, payload):
            return
        raise RunFolderError(_in_use(path, _read_lock(path)[1]))
    reason = _stale_reason(path, holder)
    if reason is None:
        raise RunFolderError(_in_use(path, holder))
    who = f"pid {holder['pid']} on host {holder['host']}" if holder else "unreadable"
    log.warning("stale lock %s (%s: %s) taken over", path, who, reason)
    if not (_take_over(path, seen) and _create_lock(path, payload)):
        raise RunFolderError(_in_use(path, _read_lock(path)[1]))


@contextlib.contextmanager
def run_lock(run_dir: Path, command: str) -> Iterator[Path]:
    """Hold ``<run_dir>/.lock`` while ``command`` writes the run folder; a second writer is refused at once.

    The lock is JSON {host, pid, started, command}. One whose process is gone (same host, dead pid), or an
    unreadable one older than GARBAGE_STALE_S, is taken over with a warning; one from another host never is.
    """
    run_dir = as_path(run_dir)
    created = not is_remote(run_dir) and not run_dir.exists()
    ensure_writable(run_dir)
    path = RunLayout(run_dir).lock
    payload = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                          "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          "command": command}).encode()
    _acquire(path, payload)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            if path.read_bytes() == payload:  # only ours: never remove a lock another process took over
                path.unlink()
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # nothing was written (e.g. bad input refused): leave no empty folder
