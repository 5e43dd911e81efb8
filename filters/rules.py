"""Selection rules: named DuckDB predicates over sample columns, compiled to one query.

Each rule is a *keep* predicate. A sample is dropped by the first rule, in
config order, whose predicate is false or NULL; the query records that rule's
name so the funnel can say why each sample went.
"""

from __future__ import annotations

import re

# Which scorer provides a column, for "needs the ... scorer" messages.
COLUMN_PROVIDERS = {
    "shorter_side": "resolution", "longer_side": "resolution",
    "aspect_ratio": "resolution", "megapixels": "resolution",
    "pwatermark": "watermark", "watermark_model": "watermark",
    "aesthetic_score": "aesthetic", "aesthetic_model": "aesthetic",
    "similarity": "clip_similarity", "similarity_model": "clip_similarity",
}

_MISSING_COL = re.compile(r'Referenced column "?([^"\s]+)"? not found', re.IGNORECASE)


class RuleError(ValueError):
    """A rule cannot run on the columns this run has."""


def missing_column(message: str) -> str | None:
    m = _MISSING_COL.search(message)
    return m.group(1) if m else None


def explain_missing(rule_name: str, column: str) -> str:
    scorer = COLUMN_PROVIDERS.get(column)
    if scorer is None:
        return (f"rule {rule_name!r} uses column {column!r}, which no stage of this run "
                f"provides (check the spelling, or the input's extra columns)")
    return (f"rule {rule_name!r} needs the {scorer} scorer (column {column!r}): add "
            f"'{scorer}' to score.scorers in the config, then run `curate score`")


def decision_sql(rules: list, source: str = "samples") -> str:
    """One query: key, state (selected/dropped/failed), rule, error, failed_stage."""
    drop_cases = "".join(
        f"\n      WHEN NOT coalesce(({r.keep}), false) THEN '{r.name}'" for r in rules
    )
    rule_expr = f"CASE{drop_cases}\n      ELSE NULL END" if rules else "NULL"
    return f"""
WITH judged AS (
  SELECT key, status, error_message, score_status, score_error,
    CASE WHEN status = 'success' AND score_status = 'ok' THEN {rule_expr} END AS drop_rule
  FROM {source}
)
SELECT key,
  CASE WHEN status <> 'success' OR score_status IS DISTINCT FROM 'ok' THEN 'failed'
       WHEN drop_rule IS NOT NULL THEN 'dropped'
       ELSE 'selected' END AS state,
  drop_rule AS rule,
  CASE WHEN status <> 'success' THEN error_message
       WHEN score_status IS DISTINCT FROM 'ok' THEN coalesce(score_error, 'not scored') END AS error,
  CASE WHEN status <> 'success' THEN 'download'
       WHEN score_status IS DISTINCT FROM 'ok' THEN 'score' END AS failed_stage
FROM judged
ORDER BY key
"""
