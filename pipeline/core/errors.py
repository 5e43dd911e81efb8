"""Errors the user can act on. Every command maps them to one line on stderr and an exit code;
anything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input, config or order of stages: the message says what was expected and what came."""

    exit_code = 2


class StageIncomplete(UserError):  # noqa: N818 (reads better at the call site)
    """Work ran but did not all succeed (failed shards, a run that does not verify); exit 1."""

    exit_code = 1


class DiskFull(StageIncomplete):
    """A disk filled up: what was finished is kept, nothing half-written is trusted; exit 1."""


def disk_full(path, what: str = "") -> DiskFull:
    """The one-line error for a full disk: the disk (the folder written), its free space, what to do."""
    import shutil

    folder = str(path)
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFull(f"no space left on the disk of {folder} ({free}){' ' + what if what else ''}; free some "
                    f"space and rerun the same command: finished work is kept")


def is_disk_full(e: BaseException) -> bool:
    """An OSError with ENOSPC or EDQUOT, or a library's error whose message says so (DuckDB's, pyarrow's)."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(e) or "Disk quota exceeded" in str(e)


class StageOrderError(UserError):
    """A stage ran before the work it needs was finished."""
