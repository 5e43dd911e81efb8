"""The scorer interface: a scorer adds columns, it never drops rows.

A scorer is one file in ``filters/``: a :class:`Scorer` subclass with a
``name``. Everything else is derived from its declaration by
:mod:`filters.registry`: the names ``score.scorers`` accepts, the columns
rules may use (and which scorer a missing column needs), the preflight weight
check, the CLIP models to load and the image sizes to decode, the reserved
input column names, and which CLIP's embeddings are saved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from t2i_curate.pipeline.core.config import ModelsConfig
    from t2i_curate.pipeline.core.weights import WeightFile


@dataclass
class Batch:
    """What a scorer sees: metadata rows of one batch and the decoded inputs it declared.

    ``rows`` are img2dataset metadata dicts (``key``, ``caption``,
    ``original_width``, ...). ``inputs`` maps an input key (a scorer's own
    transform, or a CLIP's ``"clip:..."`` input) to a tensor batch built from the
    one decoded image of each row.
    """

    rows: list[dict[str, Any]]
    inputs: dict[Any, Any] = field(default_factory=dict)


class Scorer:
    """Subclasses set the class attributes and implement :meth:`score`.

    Declarations (read without building the scorer, so no model loads):

    - ``name``: the name in ``score.scorers``;
    - ``columns``: column name -> DuckDB type of each column it writes;
    - ``uses_models``: True when it runs a network (built with the run's ``ModelBank``;
      its rows carry ``tiny_models``);
    - :meth:`clip_models`: CLIPs whose normalised image embeddings it reads;
    - :meth:`weight_files`: head files it loads with the real preset;
    - :meth:`image_inputs`: its own transforms of the decoded image (key -> largest side).
    """

    name: ClassVar[str] = ""
    columns: ClassVar[dict[str, str]] = {}
    uses_models: ClassVar[bool] = False
    description: ClassVar[str] = ""

    @classmethod
    def clip_models(cls, mcfg: ModelsConfig) -> list[str]:
        return []

    @classmethod
    def weight_files(cls, mcfg: ModelsConfig) -> list[WeightFile]:
        return []

    @classmethod
    def all_weight_files(cls) -> list[WeightFile]:
        """Every head file any setting of this scorer may load (``curate weights --all``)."""
        return []

    @classmethod
    def image_inputs(cls, mcfg: ModelsConfig) -> dict[str, int]:
        return {}

    def __init__(self, bank: Any = None):
        self.bank = bank

    def transforms(self) -> dict[str, Callable]:
        """Key -> transform of the decoded PIL image, for the keys of :meth:`image_inputs`."""
        return {}

    def score(self, batch: Batch) -> dict[str, list[Any]]:
        """Return one list per column in ``columns``, each ``len(batch.rows)`` long."""
        raise NotImplementedError

    def provenance(self) -> dict[str, str]:
        """What made the columns: model names, weight sha256, or tiny."""
        return {}
