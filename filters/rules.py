"""Selection rules: named DuckDB predicates over sample columns, compiled to one query.

Each rule is a *keep* predicate. A sample is dropped by the first rule, in
config order, whose predicate is false or NULL; the query records that rule's
name so the funnel can say why each sample went.
"""

from __future__ import annotations

import re

from t2i_curate.filters.dedup import DUPLICATE_RULE, ExactDedup, dedup_ctes
from t2i_curate.pipeline.core.columns import DECISION_COLUMNS

_MISSING_COL = re.compile(r'Referenced column "?([^"\s]+)"? not found', re.IGNORECASE)


def missing_column(message: str) -> str | None:
    m = _MISSING_COL.search(message)
    return m.group(1) if m else None


def explain_missing(rule_name: str, column: str) -> str:
    from t2i_curate.filters.registry import column_providers

    scorer = column_providers().get(column)
    if scorer is None:
        return (f"rule {rule_name!r} uses column {column!r}, which no stage of this run "
                f"provides (check the spelling, or the input's extra columns)")
    return (f"rule {rule_name!r} needs the {scorer} scorer (column {column!r}): add "
            f"'{scorer}' to score.scorers in the config, then run `curate score`")


# OpenCV's refusal of a header declaring more than OPENCV_IO_MAX_IMAGE_PIXELS, which the
# download stage sets to download.max_image_pixels (a decompression bomb is never decoded)
TOO_MANY_PIXELS = "too many pixels: the image header declares more than download.max_image_pixels"
DOWNLOAD_ERROR = (f"CASE WHEN error_message LIKE '%CV_IO_MAX_IMAGE_PIXELS%' THEN '{TOO_MANY_PIXELS}' "
                  f"ELSE error_message END")
# rows refused before any fetch: a key of their own, never an img2dataset key (digits only)
REFUSED_KEY = "printf('refused-%09d', input_row)"


def refused_sql(source: str = "refused") -> str:
    """Decisions of the refused rows: failed at download, with the refusal as the error."""
    return (f"SELECT {REFUSED_KEY} AS key, 'failed' AS state, NULL::VARCHAR AS rule, reason AS error, "
            f"'download' AS failed_stage, NULL::VARCHAR AS duplicate_of FROM {source}")


def _sql_text(text: str) -> str:
    """``text`` for the inside of a SQL string literal."""
    return str(text).replace("'", "''")




def decision_sql(rules: list, source: str | None = "samples", refused: str | None = None,
                 dedup: ExactDedup | None = None) -> str:
    """One query: key, state (selected/dropped/failed), rule, error, failed_stage, duplicate_of.

    ``source``: the samples (None when nothing was fetched); ``refused``: the refused rows, if any;
    ``dedup``: exact deduplication (``filters/dedup.py``) among the samples every rule keeps, or None.
    """
    if source is None:
        cols = ", ".join(f"NULL::VARCHAR AS {c}" for c in DECISION_COLUMNS)
        return refused_sql(refused) + "\nORDER BY key" if refused else f"SELECT {cols} LIMIT 0"
    union = f"\nUNION ALL\n{refused_sql(refused)}" if refused else ""
    drop_cases = "".join(
        f"\n      WHEN NOT coalesce(({r.keep}), false) THEN '{_sql_text(r.name)}'" for r in rules
    )
    rule_expr = f"CASE{drop_cases}\n      ELSE NULL END" if rules else "NULL"
    ok = "status = 'success' AND score_status = 'ok'"
    ctes = dedup_ctes("judged", f"{ok} AND drop_rule IS NULL", dedup) if dedup else ""
    dup = "dd_dups.duplicate_of" if dedup else "NULL::VARCHAR"
    join = "\nLEFT JOIN dd_dups USING (key)" if dedup else ""
    return f"""
WITH judged AS (
  SELECT *, CASE WHEN {ok} THEN {rule_expr} END AS drop_rule
  FROM {source}
){ctes}
SELECT key,
  CASE WHEN status <> 'success' OR score_status IS DISTINCT FROM 'ok' THEN 'failed'
       WHEN drop_rule IS NOT NULL OR {dup} IS NOT NULL THEN 'dropped'
       ELSE 'selected' END AS state,
  coalesce(drop_rule, CASE WHEN {dup} IS NOT NULL THEN '{DUPLICATE_RULE}' END) AS rule,
  CASE WHEN status <> 'success' THEN {DOWNLOAD_ERROR}
       WHEN score_status IS DISTINCT FROM 'ok' THEN coalesce(score_error, 'not scored') END AS error,
  CASE WHEN status <> 'success' THEN 'download'
       WHEN score_status IS DISTINCT FROM 'ok' THEN 'score' END AS failed_stage,
  {dup} AS duplicate_of
FROM judged{join}{union}
ORDER BY key
"""
