"""Accounting: every input row ends as written, dropped (rule) or failed (error).

``funnel(run_dir)`` counts the final states from the decisions table and the
written shards, checks that they add up to the input, and saves
``report/funnel.json`` and ``report/funnel.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.catalog import open_run
from pipeline.io import atomic_path, write_json


class AccountingError(RuntimeError):
    pass


def funnel(run_dir: Path, provenance: dict | None = None) -> dict[str, Any]:
    run_dir = Path(run_dir)
    con = open_run(run_dir)
    n_input = con.execute("SELECT count(*) FROM input").fetchall()[0][0]
    by_state = dict(con.execute("SELECT state, count(*) FROM decisions GROUP BY state").fetchall())
    manifest = json.loads((run_dir / "selected" / "manifest.json").read_text())
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
        "failed_by_reason": [{"stage": s, "error": _short(e), "samples": n} for s, e, n in failed],
        "shards": len(manifest["shards"]),
        "tiny_models": bool(manifest.get("tiny_models", False)),
        "models": provenance or manifest.get("models", {}),
    }
    total = out["written"] + out["dropped"] + out["failed"]
    if total != n_input:
        raise AccountingError(
            f"accounting does not add up: written {out['written']} + dropped {out['dropped']} + "
            f"failed {out['failed']} = {total}, but the input has {n_input} rows"
        )
    write_json(run_dir / "report" / "funnel.json", out)
    with atomic_path(run_dir / "report" / "funnel.md") as tmp:
        tmp.write_text(funnel_markdown(out))
    return out


def _short(error: str) -> str:
    first = error.strip().splitlines()[0] if error.strip() else error
    return first[:200]


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
    lines.append("")
    lines.append(f"written + dropped + failed = {f['written'] + f['dropped'] + f['failed']} = input ({f['input']})")
    return "\n".join(lines) + "\n"
