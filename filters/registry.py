"""Everything derived from the scorers' declarations (``filters/base.py``).

The scorers are the live subclasses of :class:`Scorer` that have a name: the
built-in ones (every module of this package is imported once), plus any a user
or a test defines. Nothing here is a list to edit when a scorer is added.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from t2i_curate.filters.base import Scorer
from t2i_curate.pipeline.core.errors import UserError

if TYPE_CHECKING:
    from t2i_curate.pipeline.core.config import ScoreConfig
    from t2i_curate.pipeline.core.weights import WeightFile

_INFRA = {"base", "registry", "rules", "clip", "modelbank"}  # modules that define no scorer
_imported = False


class UnknownScorerError(UserError):
    """``score.scorers`` names a scorer that does not exist."""


def _import_builtin() -> None:
    global _imported
    if _imported:
        return
    import t2i_curate.filters as pkg

    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name not in _INFRA:
            importlib.import_module(f"{pkg.__name__}.{m.name}")
    _imported = True


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_subclasses(sub))
    return out


def scorer_classes() -> dict[str, type[Scorer]]:
    """Name -> scorer class, for every scorer defined so far."""
    _import_builtin()
    out: dict[str, type[Scorer]] = {}
    for cls in _subclasses(Scorer):
        if not cls.name:
            continue
        other = out.get(cls.name)
        if other is not None and other is not cls:
            raise UserError(f"two scorers are named {cls.name!r}: {other.__module__}.{other.__qualname__} "
                            f"and {cls.__module__}.{cls.__qualname__}")
        out[cls.name] = cls
    return out


def scorer_class(name: str) -> type[Scorer]:
    classes = scorer_classes()
    if name not in classes:
        raise UnknownScorerError(f"score.scorers: unknown scorer {name!r}; expected one of "
                                 f"{', '.join(sorted(classes))}")
    return classes[name]


def configured(scfg: ScoreConfig) -> list[type[Scorer]]:
    """The configured scorer classes, in config order; unknown names are refused."""
    return [scorer_class(n) for n in scfg.scorers]


def column_providers() -> dict[str, str]:
    """Column -> the scorer that writes it (for "rule X needs the Y scorer")."""
    return {col: cls.name for cls in scorer_classes().values() for col in cls.columns}


def score_columns() -> set[str]:
    """Every column any scorer may write (reserved: see :func:`reserved_columns`)."""
    return set(column_providers())


# Columns the pipeline's own stages write or add to the samples they query, beside img2dataset's
# (core/columns.py IMG2DATASET_COLUMNS), the input rows' provenance (core/columns.py ROW_COLUMNS),
# the decisions (core/columns.py DECISION_COLUMNS) and the scorers' declared columns. Listed here, by
# the module that writes them, for :func:`reserved_columns`; a stage that adds a column adds it here.
STAGE_COLUMNS: dict[str, tuple[str, ...]] = {
    # score/shards.py assemble_columns: scores/NNNNN.parquet besides the scorers' columns
    # (image_sha256: the decoded bytes' sha256, pipeline/tars.py IMAGE_SHA256)
    "score": ("key", "score_status", "score_error", "tiny_models", "embedding_row", "image_sha256"),
    # filters/rules.py decision_sql (drop_rule), filters/dedup.py (dd_rank: added to every sample row),
    # download/_refused.parquet (reason; its rule, url, caption and row columns are reserved elsewhere)
    "select": ("drop_rule", "dd_rank", "reason"),
    # pipeline/write.py (shard; plan_shard in selected/_plan.parquet), pipeline/buckets.py with_buckets
    "write": ("shard", "plan_shard", "bucket_width", "bucket_height"),
}


def reserved_columns() -> dict[str, str]:
    """The single list of column names the pipeline writes, at every stage: lower-cased name -> the stage
    that writes it (img2dataset, input rows, score, scorer <name>, decisions, select, write). An input column
    whose name is one of these, ignoring case, is carried as ``input_<name>`` (download/base.py
    ``normalise_input``): the samples view joins downloads and scores, so an input ``score_status`` or
    ``tiny_models`` would otherwise stand for the pipeline's own."""
    from t2i_curate.pipeline.core.columns import DECISION_COLUMNS, IMG2DATASET_COLUMNS, ROW_COLUMNS

    out: dict[str, str] = {}
    groups = [("img2dataset", IMG2DATASET_COLUMNS), ("input rows", ROW_COLUMNS),
              *[(f"scorer {n}", tuple(cls.columns)) for n, cls in sorted(scorer_classes().items())],
              ("decisions", DECISION_COLUMNS), *STAGE_COLUMNS.items()]
    for stage, names in groups:
        for c in names:
            out.setdefault(c.lower(), stage)
    return out


def clip_models(scfg: ScoreConfig) -> list[str]:
    """CLIPs the configured scorers read, first use first; the first one's embeddings are saved."""
    out: list[str] = []
    for cls in configured(scfg):
        out += [c for c in cls.clip_models(scfg.models) if c not in out]
    return out


def needed_weights(scfg: ScoreConfig) -> tuple[list[str], list[WeightFile]]:
    """The CLIP names and head files the configured scorers need with the real preset."""
    files: list[WeightFile] = []
    for cls in configured(scfg):
        files += [w for w in cls.weight_files(scfg.models) if w not in files]
    return clip_models(scfg), files


def all_weights(scfg: ScoreConfig) -> tuple[list[str], list[WeightFile]]:
    """Every weight any built-in scorer may need (``curate weights --all``)."""
    from t2i_curate.filters.clip import KNOWN_CLIPS

    files: list[WeightFile] = []
    for cls in scorer_classes().values():
        files += [w for w in cls.all_weight_files() if w not in files]
    clips = list(dict.fromkeys([*clip_models(scfg), *KNOWN_CLIPS]))
    return clips, files


def preflight(scfg: ScoreConfig) -> None:
    """Fail within seconds, before any work: unknown scorers, missing or mismatched weights."""
    clips, files = needed_weights(scfg)
    if scfg.models.preset == "tiny":
        return
    from t2i_curate.pipeline.core.weights import clip_checkpoint, resolve_weight

    for n in clips:
        clip_checkpoint(n, scfg.models)
    for wf in files:
        resolve_weight(wf, scfg.models)
