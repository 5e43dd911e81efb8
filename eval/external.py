"""Images made elsewhere (another sampler, ComfyUI, a hosted API): ``curate eval --images DIR --prompts FILE``.

``FILE`` maps each image file (relative to ``DIR``) to its prompt: our suite files
(jsonl: ``prompt``, ``id``, ``category``, ``occupation``) or a csv/tsv with the
same columns, plus ``file``. The result is the ``eval_images.parquet`` the
sampler would have written, so everything after sampling runs as usual. An
image with no prompt row, a row with no image and an unreadable image are each
listed and counted (``input_problems.json``); the rest is measured.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from t2i_curate.pipeline.errors import UserError
from t2i_curate.pipeline.io import write_json, write_parquet
from t2i_curate.pipeline.tars import IMAGE_EXTS

log = logging.getLogger(__name__)


def read_mapping(path: Path) -> list[dict[str, Any]]:
    """The prompts file's rows, each with ``file`` and ``prompt``; ids and categories defaulted."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts {path}: no such file")
    if path.suffix.lower() in (".csv", ".tsv"):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    else:
        rows = []
        for i, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise UserError(f"{path}:{i + 1}: not JSON: {e}") from None
    for i, r in enumerate(rows):
        if not r.get("file") or not r.get("prompt"):
            raise UserError(f"{path}: row {i + 1}: expected 'file' and 'prompt', got {sorted(r)}")
        r.setdefault("category", "general")
        r["category"] = r["category"] or "general"
        r.setdefault("id", Path(r["file"]).stem)
    return rows


def _images_in(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise UserError(f"--images {folder}: no such folder")
    found = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
             if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS}
    if not found:
        raise UserError(f"--images {folder}: expected image files ({', '.join(sorted(IMAGE_EXTS))}), found none")
    return found


def _readable(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # any decode failure is this image's problem, reported, never fatal
        return f"{type(e).__name__}: {e}"
    return None


def external_images(images_dir: Path, prompts_file: Path, out_dir: Path) -> dict[str, Any]:
    """Write ``eval_images.parquet`` for the images that have a prompt and decode; return the problems."""
    import pyarrow as pa

    images, rows = _images_in(Path(images_dir)), read_mapping(prompts_file)
    mapped = {r["file"]: r for r in rows}
    problems: dict[str, list] = {"no_prompt": sorted(set(images) - set(mapped)),
                                 "no_image": sorted(set(mapped) - set(images)), "unreadable": []}
    out, seen = [], set()
    for name in sorted(set(images) & set(mapped)):
        err = _readable(images[name])
        if err:
            problems["unreadable"].append({"file": name, "error": err})
            continue
        r = mapped[name]
        image_id = str(r["id"]) if str(r["id"]) not in seen else f"{r['id']}_{len(seen)}"
        seen.add(image_id)
        out.append({"image_id": image_id, "prompt_id": str(r["id"]), "sample_index": 0, "category": r["category"],
                    "prompt": r["prompt"], "seed": None, "occupation": r.get("occupation"),
                    "expected_hands": int(r["expected_hands"]) if r.get("expected_hands") not in (None, "") else None,
                    "file": str(images[name].resolve()), "model": f"external:{Path(images_dir).resolve()}",
                    "tiny_model": False})
    for kind, items in problems.items():
        if items:
            log.warning("eval --images: %d %s: %s", len(items), kind.replace("_", " "), items[:5])
    if not out:
        raise UserError(f"--images {images_dir}: no image both has a prompt row and decodes; problems: "
                        f"{ {k: len(v) for k, v in problems.items()} }")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_parquet(out_dir / "eval_images.parquet", pa.Table.from_pylist(out))
    summary = {"measured": len(out), **{k: len(v) for k, v in problems.items()}, "details": problems}
    write_json(out_dir / "input_problems.json", summary)
    return summary
