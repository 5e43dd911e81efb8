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
from t2i_curate.pipeline.errors import UserError

if TYPE_CHECKING:
    from t2i_curate.pipeline.config import ScoreConfig
    from t2i_curate.pipeline.weights import WeightFile

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
    """Every column any scorer may write (reserved: an input column by such a name is renamed)."""
    return set(column_providers())


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
    from t2i_curate.pipeline.weights import clip_checkpoint, resolve_weight

    for n in clips:
        clip_checkpoint(n, scfg.models)
    for wf in files:
        resolve_weight(wf, scfg.models)
