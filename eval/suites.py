"""Prompt suites: the project's own (``eval/prompts/*.jsonl``) and public formats.

Every loader returns rows ``{"id", "category", "prompt", ...}``. Public formats:
PartiPrompts TSV (``Prompt``, ``Category``, ``Challenge``), GenEval metadata
JSONL (``tag``, ``prompt``, ``include``), DrawBench CSV (``Prompts``,
``Category``).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from t2i_curate.eval.external import json_type
from t2i_curate.pipeline.core.errors import UserError

BUILTIN = Path(__file__).resolve().parent / "prompts"


class SuiteError(UserError):
    pass


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s.lower()).strip("_")


def _read_text(path: Path) -> str:
    """A suite file's text; one that is not UTF-8 is refused, naming the line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SuiteError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None


def _text(row: dict, key: str, where: str, numbers: bool = False) -> None:
    """``row[key]``, when present, must be text (``numbers``: a number is taken as its text)."""
    v = row.get(key)
    if v is None or isinstance(v, str):
        return
    if numbers and isinstance(v, (int, float)) and not isinstance(v, bool):
        row[key] = str(v)
        return
    raise SuiteError(f"{where}: {key!r}: expected text, got {json_type(v)} {json.dumps(v, default=str)[:80]}")


def load_jsonl_suite(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(_read_text(path).splitlines()):
        if not line.strip():
            continue
        where = f"{path}:{i + 1}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise SuiteError(f"{where}: not JSON: {e}") from None
        if not isinstance(row, dict):
            raise SuiteError(f"{where}: expected a JSON object with a 'prompt' key, got {json_type(row)}")
        if "prompt" not in row:
            raise SuiteError(f"{where}: expected a 'prompt' key, got {sorted(row)}")
        _text(row, "prompt", where)
        if not row["prompt"]:
            raise SuiteError(f"{where}: empty prompt")
        if "tag" in row and "category" not in row:  # GenEval metadata
            _text(row, "tag", where)
            row = {"id": f"geneval-{i:04d}", "category": row["tag"], "prompt": row["prompt"],
                   "include": json.dumps(row.get("include", []))}
        for key in ("id", "category", "occupation"):
            _text(row, key, where, numbers=True)
        row["id"] = row.get("id") or f"{Path(path).stem}-{i:04d}"
        row["category"] = row.get("category") or Path(path).stem
        rows.append(row)
    return rows


def _csv_rows(path: Path, delimiter: str = ","):
    return csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter)


def load_partiprompts(path: Path) -> list[dict]:
    reader = _csv_rows(path, "\t")
    if not reader.fieldnames or "Prompt" not in reader.fieldnames:
        raise SuiteError(f"{path}: expected PartiPrompts columns Prompt, Category, Challenge; "
                         f"got {reader.fieldnames}")
    return _with_prompts(path, reader, lambda i, r: {
        "id": f"parti-{i:04d}", "category": _slug(r.get("Category") or "uncategorised"), "prompt": r["Prompt"],
        "challenge": r.get("Challenge") or ""})


def load_drawbench(path: Path) -> list[dict]:
    reader = _csv_rows(path)
    col = next((c for c in (reader.fieldnames or []) if c.lower() in ("prompts", "prompt")), None)
    if col is None:
        raise SuiteError(f"{path}: expected DrawBench columns Prompts, Category; got {reader.fieldnames}")
    return _with_prompts(path, reader, lambda i, r: {
        "id": f"drawbench-{i:04d}", "category": _slug(r.get("Category") or "drawbench"), "prompt": r[col]})


def _with_prompts(path: Path, reader, make) -> list[dict]:
    """Rows of a csv suite; a row without a prompt (a short or empty row) is refused, naming its line."""
    rows = []
    try:
        for i, r in enumerate(reader):
            row = make(i, r)
            if not row["prompt"]:
                raise SuiteError(f"{path}:{reader.line_num}: no prompt in this row")
            rows.append(row)
    except csv.Error as e:
        raise SuiteError(f"{path}:{reader.line_num}: not CSV: {e}") from None
    return rows


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
