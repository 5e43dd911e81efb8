"""Images made elsewhere (another sampler, ComfyUI, a hosted API): ``curate eval --images DIR --prompts FILE``.

``FILE`` maps each image file (relative to ``DIR``) to its prompt: our suite files
(jsonl: ``prompt``, ``id``, ``category``, ``occupation``) or a csv/tsv with the
same columns, plus ``file``. The result is the ``eval_images.parquet`` the
sampler would have written, so everything after sampling runs as usual. Each
problem is listed and counted in ``input_problems.json``, and the rest is measured:
an image with no prompt row (``no_prompt``), a row with no image (``no_image``), an
unreadable image (``unreadable``), a row that cannot be used (``bad_row``: not UTF-8,
not JSON, not a JSON object, ``file`` or ``prompt`` missing or not text, a field of the
wrong type, a file mapped twice) and an image whose file name is not UTF-8 (``bad_name``:
the tables store names as text).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from t2i_curate.pipeline.core.errors import UserError
from t2i_curate.pipeline.core.io import write_json, write_parquet
from t2i_curate.pipeline.core.tars import IMAGE_EXTS

log = logging.getLogger(__name__)
PROBLEM_KINDS = ("no_prompt", "no_image", "unreadable", "bad_row", "bad_name")


def is_text(s: str) -> bool:
    """True when ``s`` encodes as UTF-8 (a file name read with surrogateescape may not)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(s: str) -> str:
    """``s`` printable and storable: bytes that are not UTF-8 (surrogateescape) as ``\\xNN``."""
    return s if is_text(s) else s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def json_type(v: Any) -> str:
    """The JSON name of a parsed value's type (object, array, string, number, boolean, null)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "number", float: "number"}.get(type(v), type(v).__name__)


def _text_field(r: dict, key: str, required: bool) -> str | None:
    """A text field of a row (``id``, ``category`` and ``occupation`` may also be numbers, taken as their
    text); None when absent or empty and optional. Raises ValueError naming what is wrong."""
    v = r.get(key)
    if v is None or v == "":
        if required:
            raise ValueError(f"expected 'file' and 'prompt', got {sorted(shown(str(k)) for k in r)}")
        return None
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    if not isinstance(v, str) and not (number and not required):
        raise ValueError(f"{key!r}: expected text, got {json_type(v)} {shown(json.dumps(v, default=str))[:80]}")
    v = str(v)
    if not is_text(v):
        raise ValueError(f"{key!r}: not UTF-8 text: {shown(v)[:80]!r}")
    return v


def _check_row(r: Any) -> dict[str, Any]:
    """One mapping row, normalised: ``file``, ``prompt``, ``id``, ``category``, ``occupation``,
    ``expected_hands``; raises ValueError naming what is wrong."""
    if not isinstance(r, dict):
        raise ValueError(f"expected a JSON object with 'file' and 'prompt', got {json_type(r)}")
    out = {k: _text_field(r, k, k in ("file", "prompt")) for k in ("file", "prompt", "id", "category", "occupation")}
    out["category"] = out["category"] or "general"
    out["id"] = out["id"] if out["id"] is not None else Path(out["file"]).stem
    hands = r.get("expected_hands")
    if hands is None or hands == "":
        out["expected_hands"] = None
    else:
        try:
            if isinstance(hands, bool) or not isinstance(hands, (int, str)):
                raise ValueError
            out["expected_hands"] = int(hands)
        except ValueError:
            raise ValueError(f"'expected_hands': expected a whole number, got "
                             f"{shown(json.dumps(hands, default=str))[:40]}") from None
    return out


def _raw_rows(path: Path) -> list[tuple[int, Any, str | None]]:
    """``(line, row, problem)`` for each row of the file: a parsed row, or None and what is wrong."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
        data = data[3:]
    out: list[tuple[int, Any, str | None]] = []
    if path.suffix.lower() in (".csv", ".tsv"):
        text = data.decode("utf-8", "surrogateescape")  # bad bytes stay visible per field, found by is_text
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        try:
            for r in reader:
                bad = [k for k, v in r.items() if not is_text(str(k)) or (isinstance(v, str) and not is_text(v))]
                out.append((reader.line_num, None, "not UTF-8 text") if bad else (reader.line_num, r, None))
        except csv.Error as e:
            out.append((reader.line_num, None, f"not CSV: {e}"))
        return out
    for i, raw in enumerate(data.split(b"\n")):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            out.append((i + 1, None, f"not UTF-8 text ({e.reason} at byte {e.start})"))
            continue
        try:
            out.append((i + 1, json.loads(line), None))
        except ValueError as e:
            out.append((i + 1, None, f"not JSON: {e}"))
    return out


def read_mapping(path: Path, problems: list | None = None) -> list[dict[str, Any]]:
    """The prompts file's rows, each with ``file`` and ``prompt``; ids and categories defaulted.

    With ``problems`` (a list), a row that cannot be used is appended to it (``{"line", "problem"}``) and
    left out; without it, the first such row is refused (UserError naming the file and line)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts {shown(str(path))}: no such file")
    rows, first_line = [], {}
    for line, raw, problem in _raw_rows(path):
        if problem is None:
            try:
                r = _check_row(raw)
                if r["file"] in first_line:
                    raise ValueError(f"file {r['file']!r} is mapped already on line {first_line[r['file']]}")
            except ValueError as e:
                problem = str(e)
        if problem is not None:
            if problems is None:
                raise UserError(f"{shown(str(path))}: line {line}: {problem}")
            problems.append({"line": line, "problem": problem})
            continue
        first_line[r["file"]] = line
        rows.append(r)
    return rows


def _images_in(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """The image files under ``folder`` by relative name, and the names that are not UTF-8 (shown)."""
    if not folder.is_dir():
        raise UserError(f"--images {shown(str(folder))}: no such folder")
    if not is_text(str(folder.resolve())):
        raise UserError(f"--images {shown(str(folder.resolve()))}: the folder's path is not UTF-8 text, which the "
                        f"eval tables store; rename it")
    found, bad = {}, []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS:
            name = p.relative_to(folder).as_posix()
            if is_text(name):
                found[name] = p
            else:
                bad.append(shown(name))
    if not found and not bad:
        raise UserError(f"--images {folder}: expected image files ({', '.join(sorted(IMAGE_EXTS))}), found none")
    return found, bad


def _readable(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # any decode failure is this image's problem, reported, never fatal
        return f"{type(e).__name__}: {e}"
    return None


def external_images(images_dir: Path, prompts_file: Path, out_dir: Path) -> dict[str, Any]:
    """Write ``eval_images.parquet`` for the images that have a prompt and decode, and
    ``input_problems.json`` (counts and details of every problem); return the latter's content."""
    import pyarrow as pa

    bad_rows: list[dict] = []
    (images, bad_names), rows = _images_in(Path(images_dir)), read_mapping(prompts_file, bad_rows)
    mapped = {r["file"]: r for r in rows}
    problems: dict[str, list] = {"no_prompt": sorted(set(images) - set(mapped)),
                                 "no_image": sorted(set(mapped) - set(images)), "unreadable": [],
                                 "bad_row": bad_rows, "bad_name": bad_names}
    out, seen = [], set()
    for name in sorted(set(images) & set(mapped)):
        err = _readable(images[name])
        if err:
            problems["unreadable"].append({"file": name, "error": err})
            continue
        r = mapped[name]
        image_id = r["id"] if r["id"] not in seen else f"{r['id']}_{len(seen)}"
        seen.add(image_id)
        out.append({"image_id": image_id, "prompt_id": r["id"], "sample_index": 0, "category": r["category"],
                    "prompt": r["prompt"], "seed": None, "occupation": r["occupation"],
                    "expected_hands": r["expected_hands"],
                    "file": str(images[name].resolve()), "model": f"external:{Path(images_dir).resolve()}",
                    "tiny_model": False})
    for kind, items in problems.items():
        if items:
            log.warning("eval --images: %d %s: %s", len(items), kind.replace("_", " "), items[:5])
    summary = {"measured": len(out), **{k: len(v) for k, v in problems.items()}, "details": problems}
    if not out:
        raise UserError(f"--images {images_dir}: no image both has a prompt row and decodes; problems: "
                        f"{ {k: len(v) for k, v in problems.items()} }")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_parquet(out_dir / "eval_images.parquet", pa.Table.from_pylist(out))
    write_json(out_dir / "input_problems.json", summary)
    return summary
