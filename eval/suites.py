"""Prompt suites: the project's own (``eval/prompts/*.jsonl``) and public formats.

Every loader returns rows ``{"id", "category", "prompt", ...}``. Public formats:
PartiPrompts TSV (``Prompt``, ``Category``, ``Challenge``), GenEval metadata
JSONL (``tag``, ``prompt``, ``include``), DrawBench CSV (``Prompts``,
``Category``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from t2i_curate.pipeline.errors import UserError

BUILTIN = Path(__file__).resolve().parent / "prompts"


class SuiteError(UserError):
    pass


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s.lower()).strip("_")


def load_jsonl_suite(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise SuiteError(f"{path}:{i + 1}: not JSON: {e}") from None
        if "prompt" not in row:
            raise SuiteError(f"{path}:{i + 1}: expected a 'prompt' key, got {sorted(row)}")
        if "tag" in row and "category" not in row:  # GenEval metadata
            row = {"id": f"geneval-{i:04d}", "category": row["tag"], "prompt": row["prompt"],
                   "include": json.dumps(row.get("include", []))}
        row.setdefault("id", f"{Path(path).stem}-{i:04d}")
        row.setdefault("category", Path(path).stem)
        rows.append(row)
    return rows


def load_partiprompts(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if not reader.fieldnames or "Prompt" not in reader.fieldnames:
            raise SuiteError(f"{path}: expected PartiPrompts columns Prompt, Category, Challenge; "
                             f"got {reader.fieldnames}")
        return [{"id": f"parti-{i:04d}", "category": _slug(r.get("Category") or "uncategorised"),
                 "prompt": r["Prompt"], "challenge": r.get("Challenge") or ""} for i, r in enumerate(reader)]


def load_drawbench(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        col = next((c for c in (reader.fieldnames or []) if c.lower() in ("prompts", "prompt")), None)
        if col is None:
            raise SuiteError(f"{path}: expected DrawBench columns Prompts, Category; got {reader.fieldnames}")
        return [{"id": f"drawbench-{i:04d}", "category": _slug(r.get("Category") or "drawbench"),
                 "prompt": r[col]} for i, r in enumerate(reader)]


def load_suite(name_or_path: str) -> list[dict]:
    """A built-in suite name (people, horses, occupations, general) or a file in a known format."""
    builtin = BUILTIN / f"{name_or_path}.jsonl"
    if builtin.is_file():
        return load_jsonl_suite(builtin)
    p = Path(name_or_path)
    if not p.is_file():
        known = sorted(q.stem for q in BUILTIN.glob("*.jsonl"))
        raise SuiteError(f"prompt suite {name_or_path!r}: not a built-in suite ({', '.join(known)}) nor a file")
    if p.suffix == ".tsv":
        return load_partiprompts(p)
    if p.suffix == ".csv":
        return load_drawbench(p)
    if p.suffix in (".jsonl", ".json"):
        return load_jsonl_suite(p)
    raise SuiteError(f"{p}: expected .tsv (PartiPrompts), .csv (DrawBench) or .jsonl (GenEval / ours)")


def load_suites(names: list[str], max_per_suite: int | None = None) -> list[dict]:
    rows, seen = [], set()
    for n in names:
        suite = load_suite(n)[:max_per_suite] if max_per_suite else load_suite(n)
        for r in suite:
            if r["id"] in seen:
                raise SuiteError(f"prompt id {r['id']!r} appears twice across suites {names}")
            seen.add(r["id"])
            rows.append(r)
    return rows
