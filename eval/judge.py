"""The failure-judge interface, the labels file, and the registry of judges.

A judge is one file ``eval/judge_<name>.py`` holding a :class:`Judge` subclass.
It declares its ``name`` (what ``eval.judges`` lists), the failure
``categories`` it covers, whether it is ``validated`` against human labels, and
a ``description`` the report shows; it gets the eval CLIP (``bundle``) and the
labels file's content, and returns P(failure) per image. Everything else --
which judges exist, the per-image ``p_fail_<name>`` columns, the report's
sections -- is derived from those declarations.
"""

from __future__ import annotations

import csv
import importlib
import pkgutil
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from t2i_curate.pipeline.core.errors import UserError

FAILURE_CATEGORIES = ("human_limbs", "horses", "quadrupeds")


class LabelsError(UserError):
    pass


def read_labels(path: str | Path) -> dict[str, bool]:
    """``image_id,category,failed`` CSV -> {image_id: failed}; yes/no, true/false, 1/0 accepted."""
    out: dict[str, bool] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"image_id", "failed"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise LabelsError(f"{path}: expected columns image_id, category, failed; got {reader.fieldnames}")
        for i, r in enumerate(reader):
            v = (r["failed"] or "").strip().lower()
            if v not in ("yes", "no", "true", "false", "1", "0"):
                raise LabelsError(f"{path}:{i + 2}: failed must be yes/no, got {r['failed']!r}")
            out[r["image_id"]] = v in ("yes", "true", "1")
    return out


class Judge:
    """Subclasses set the class attributes and implement :meth:`p_fail`."""

    name: ClassVar[str] = ""
    categories: ClassVar[tuple[str, ...]] = FAILURE_CATEGORIES
    validated: ClassVar[bool] = False
    description: ClassVar[str] = ""

    class Options(BaseModel):
        """The judge's settings under ``eval.judge_options.<name>``; a judge with settings declares its
        own subclass (unknown keys are refused, naming the key)."""

        model_config = ConfigDict(extra="forbid")

    def __init__(self, bundle: Any = None, labels: dict[str, bool] | None = None, options: Any = None,
                 device: str = "cpu"):
        self.bundle = bundle
        self.labels = labels or {}
        self.options = options if options is not None else self.Options()
        self.device = device

    image_dir: Path | None = None  # the folder of ``rows[i]["file"]``; set by measure before p_fail

    def p_fail(self, category: str, rows: list[dict], emb) -> tuple[list[float | None], list[float] | None] | None:
        """P(failure) for each image of ``category`` (``rows``, with L2-normalised eval-CLIP ``emb``;
        ``self.image_dir / row["file"]`` is the image), and the out-of-fold P(failure) of the labelled
        ones when the judge learned from the labels (None: its in-sample values are honest). An image's
        P(failure) is None when the judge cannot tell (no hand found, an unparsable answer): it is
        counted as unknown, never as a pass. None overall when the judge cannot judge here."""
        raise NotImplementedError

    def observations(self) -> dict[str, list]:
        """Per-image columns of the last :meth:`p_fail` call, aligned with its rows (what the judge saw:
        hands found, their confidence, ...), for the ``eval_judgements`` table. Column names are the
        judge's own; prefix them with its name."""
        return {}

    def provenance(self) -> dict[str, str]:
        """The models that made the verdicts: library and version, model file or hub id, sha256 or tiny."""
        b = self.bundle
        return {"clip": getattr(b, "name", "") or "", "clip_sha256": getattr(b, "sha256", "") or ""}


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def judge_classes() -> dict[str, type[Judge]]:
    """Name -> judge class: every ``eval/judge_*.py``, plus any subclass defined elsewhere."""
    import t2i_curate.eval as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name.startswith("judge_"):
            importlib.import_module(f"{pkg.__name__}.{m.name}")
    return {c.name: c for c in _subclasses(Judge) if c.name}


def judge_options(cls: type[Judge], raw: dict | None):
    """``eval.judge_options.<name>`` validated by the judge's own :class:`Judge.Options`."""
    try:
        return cls.Options(**(raw or {}))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise UserError(f"eval.judge_options.{cls.name}: {problems}") from None


def configured_judges(names: list[str], bundle, labels: dict[str, bool], options: dict | None = None,
                      device: str = "cpu") -> list[Judge]:
    """The judges ``eval.judges`` names, each with its validated ``eval.judge_options`` entry."""
    classes = judge_classes()
    unknown = [n for n in [*names, *(options or {})] if n not in classes]
    if unknown:
        raise UserError(f"eval.judges / eval.judge_options: unknown judge(s) {unknown}; expected some of "
                        f"{', '.join(sorted(classes))}")
    return [classes[n](bundle=bundle, labels=labels, options=judge_options(classes[n], (options or {}).get(n)),
                       device=device) for n in names]
