"""Accounting: every input row ends as written, dropped (rule) or failed (error).

``funnel(run_dir)`` counts the final states from the decisions table and the
written shards, checks that they add up to the input, and saves
``report/funnel.json`` and ``report/funnel.md``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from t2i_curate.pipeline.core.catalog import open_run
from t2i_curate.pipeline.core.errors import UserError
from t2i_curate.pipeline.core.io import as_path, atomic_path, write_json
from t2i_curate.pipeline.core.layout import RunLayout


class AccountingError(UserError):
    pass


def funnel(run_dir: Path, provenance: dict | None = None, save_required: bool = True) -> dict[str, Any]:
    """The accounting, saved as ``report/funnel.json`` and ``.md``; ``save_required=False`` (``curate
    funnel``, a reader): a run folder that cannot be written (read-only) only costs a warning."""
    run_dir = as_path(run_dir)
    con = open_run(run_dir)
    n_input = con.execute("SELECT count(*) FROM input").fetchall()[0][0]
    by_state = dict(con.execute("SELECT state, count(*) FROM decisions GROUP BY state").fetchall())
    lay = RunLayout(run_dir)
    if not lay.manifest.exists():
        from t2i_curate.pipeline.core.errors import StageOrderError

        raise StageOrderError(f"{run_dir} has no curated shards yet: run `curate write` (or `curate run`) first")
    manifest = json.loads(lay.manifest.read_text())
    written = manifest["samples"]
    if written != by_state.get("selected", 0):
        raise AccountingError(
            f"{by_state.get('selected', 0)} samples were selected but {written} written; "
            f"run `curate write` to finish"
        )
    dropped = con.execute(
        "SELECT rule, count(*) FROM decisions WHERE state = 'dropped' GROUP BY rule ORDER BY 2 DESC").fetchall()
    failed = con.execute(
        "SELECT failed_stage, coalesce(error, 'unknown'), count(*) FROM decisions WHERE state = 'failed' "
        "GROUP BY ALL ORDER BY 3 DESC").fetchall()
    out = {
        "input": n_input,
        "written": written,
        "dropped": by_state.get("dropped", 0),
        "failed": by_state.get("failed", 0),
        "dropped_by_rule": {r: n for r, n in dropped},
        "failed_by_reason": group_failures(failed),
        "shards": len(manifest["shards"]),
        "tiny_models": bool(manifest.get("tiny_models", False)),
        "models": provenance or manifest.get("models", {}),
    }
    from t2i_curate.pipeline.download.parts import skipped_parts

    skipped = skipped_parts(lay)  # unreadable input parts skipped unread (rows unknown, not in `input`)
    if skipped:
        out["skipped_parts"] = skipped
    total = out["written"] + out["dropped"] + out["failed"]
    if total != n_input:
        raise AccountingError(
            f"accounting does not add up: written {out['written']} + dropped {out['dropped']} + "
            f"failed {out['failed']} = {total}, but the input has {n_input} rows"
        )
    try:
        write_json(lay.report / "funnel.json", out)
        with atomic_path(lay.report / "funnel.md") as tmp:
            tmp.write_text(funnel_markdown(out))
    except OSError as e:
        if save_required:
            raise
        logging.getLogger(__name__).warning("funnel not saved in %s (%s: %s)", lay.report, type(e).__name__, e)
    return out


def _short(error: str) -> str:
    first = error.strip().splitlines()[0] if error.strip() else error
    return first[:200]


_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
_PATH = re.compile(r"(?<![\w.])(?:/[^\s/'\"<>:]+){2,}/?")
_HEX = re.compile(r"\b0x[0-9a-fA-F]+\b")
# numbers go, except an HTTP status, which is the class itself ("HTTP Error 404")
_NUM = re.compile(r"(?<!HTTP Error )(?<![\w.])\d+(?:\.\d+)?(?![\w.])")


def error_class(error: str) -> str:
    """A failure message with its URLs, paths and numbers stripped, so that the same failure on
    10,000 URLs is one funnel line; the raw message stays in ``decisions.error``."""
    text = _short(error)
    text = _URL.sub("<url>", text)
    text = _PATH.sub("<path>", text)
    text = _HEX.sub("<hex>", text)
    text = _NUM.sub("<n>", text)
    return re.sub(r"\s+", " ", text).strip()


def group_failures(failed: list[tuple[str, str, int]]) -> list[dict[str, Any]]:
    """``(stage, raw error, count)`` rows -> one row per (stage, error class), largest first,
    each with one raw message as its example."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for stage, error, n in failed:
        cls = error_class(error)
        g = groups.setdefault((stage, cls), {"stage": stage, "error": cls, "samples": 0, "example": _short(error)})
        g["samples"] += n
    return sorted(groups.values(), key=lambda g: (-g["samples"], g["stage"], g["error"]))


def funnel_markdown(f: dict[str, Any]) -> str:
    lines = ["# Funnel", ""]
    if f.get("tiny_models"):
        lines += ["> Scores were computed with **tiny random models**: they are not meaningful.", ""]
    lines += ["| state | reason | samples | share |", "|---|---|---:|---:|"]
    n = max(f["input"], 1)
    lines.append(f"| input | | {f['input']} | 100.0% |")
    lines.append(f"| written | | {f['written']} | {100 * f['written'] / n:.1f}% |")
    for rule, c in f["dropped_by_rule"].items():
        lines.append(f"| dropped | rule `{rule}` | {c} | {100 * c / n:.1f}% |")
    for r in f["failed_by_reason"]:
        lines.append(f"| failed | {r['stage']}: {r['error']} | {r['samples']} | {100 * r['samples'] / n:.1f}% |")
    for p in f.get("skipped_parts", []):
        lines.append(f"| skipped part | `{p['part']}`: {_short(p['error'] or '')} | unknown | |")
    lines.append("")
    lines.append(f"written + dropped + failed = {f['written'] + f['dropped'] + f['failed']} = input ({f['input']})")
    return "\n".join(lines) + "\n"
