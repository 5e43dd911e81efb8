"""Errors the user can act on. Every command maps them to one line on stderr and an exit code;
anything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input, config or order of stages: the message says what was expected and what came."""

    exit_code = 2


class StageIncomplete(UserError):  # noqa: N818 (reads better at the call site)
    """Work ran but did not all succeed (failed shards, a run that does not verify); exit 1."""

    exit_code = 1
