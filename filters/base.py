"""The scorer interface: a scorer adds columns, it never drops rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class Batch:
    """What a scorer sees: metadata rows of one batch and, if asked for, decoded inputs.

    ``rows`` are img2dataset metadata dicts (``key``, ``caption``,
    ``original_width``, ...). ``inputs`` maps an input name (``"clip_l14"``,
    ``"watermark"``) to a tensor batch built from the one decoded image.
    """

    rows: list[dict[str, Any]]
    inputs: dict[str, Any] = field(default_factory=dict)


class Scorer:
    """Subclasses set ``name`` and ``columns`` and implement :meth:`score`."""

    name: ClassVar[str] = ""
    columns: ClassVar[tuple[str, ...]] = ()
    needs_image: ClassVar[bool] = False

    def score(self, batch: Batch) -> dict[str, list[Any]]:
        """Return one list per column in ``columns``, each ``len(batch.rows)`` long."""
        raise NotImplementedError

    def metadata(self) -> dict[str, str]:
        """Provenance written beside the columns (model names, tiny flag)."""
        return {}
