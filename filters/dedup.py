"""Exact deduplication: the same normalised URL, or the same downloaded bytes, keeps one sample.

Compiled into the select query (``rules.decision_sql``) as CTEs over every sample of the run,
so duplicate groups span shards. Only samples that would otherwise be selected (downloaded,
scored ok, kept by every rule) take part, so a rule never costs the copy that passes it.

Two steps, in ``keep_order`` (then ``key``, for a total order):

1. by normalised URL (``url_key_sql``): the first sample of each URL group survives;
2. among the step-1 survivors, by ``sha256`` of the downloaded bytes: the first survives.

Every other sample is a duplicate; ``duplicate_of`` names the kept sample it duplicates (a
URL duplicate whose URL twin lost step 2 points at the sample that won it), so it always
points at a sample that is written.
"""

from __future__ import annotations

from dataclasses import dataclass

DUPLICATE_RULE = "duplicate"
DEFAULT_KEEP_ORDER = "aesthetic_score DESC NULLS LAST, key"
FALLBACK_KEEP_ORDER = "key"

# scheme://[userinfo@]host[:port][/path][?query]; the fragment is removed first
_URL_RE = r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#@]*@)?(\[[^\]/?#]*\]|[^:/?#]*)(:([0-9]*))?([/?].*)?$"
_URL_PARTS = "['scheme', 'userinfo', 'host', 'colon_port', 'port', 'rest']"


@dataclass(frozen=True)
class ExactDedup:
    """How the select query deduplicates: ``keep_order`` is a DuckDB ORDER BY fragment over
    the sample columns; ``by_sha256`` / ``by_url`` are False when the samples have no ``sha256`` /
    ``url`` column (img2dataset always writes both; hand-made shards may not)."""

    keep_order: str = FALLBACK_KEEP_ORDER
    by_sha256: bool = True
    by_url: bool = True


def url_key_sql(col: str = "url") -> str:
    """DuckDB expression: ``col`` normalised for exact duplicate detection.

    Scheme and host lower-cased, the default port (``:80`` for http, ``:443`` for https) and an
    empty port dropped, the fragment dropped; userinfo, path and query unchanged. A string that
    does not parse as ``scheme://host...`` is only stripped of its fragment.
    """
    bare = f"regexp_replace({col}, '#.*$', '', 's')"
    p = f"regexp_extract({bare}, '{_URL_RE}', {_URL_PARTS})"
    port = f"try_cast(nullif({p}.port, '') AS BIGINT)"
    scheme = f"lower({p}.scheme)"
    default_port = (f"({port} IS NULL OR ({scheme} = 'http' AND {port} = 80) "
                    f"OR ({scheme} = 'https' AND {port} = 443))")
    return (f"CASE WHEN regexp_full_match({bare}, '{_URL_RE}') THEN {scheme} || '://' || {p}.userinfo "
            f"|| lower({p}.host) || CASE WHEN {default_port} THEN '' ELSE ':' || {p}.port END "
            f"|| {p}.rest ELSE {bare} END")


def dedup_ctes(judged: str, keep: str, d: ExactDedup) -> str:
    """CTEs ``dd_cand``, ``dd_url``, ``dd_sha``, ``dd_dups`` (key, duplicate_of) over the
    rows of ``judged`` for which the SQL condition ``keep`` holds (the would-be selected)."""
    sha = "sha256" if d.by_sha256 else "NULL::VARCHAR"
    url = url_key_sql("url") if d.by_url else "NULL::VARCHAR"
    return f""",
dd_cand AS (
  SELECT key, {url} AS dd_url, {sha} AS dd_sha,
    row_number() OVER (ORDER BY {d.keep_order}, key) AS dd_rank
  FROM {judged} WHERE {keep}
),
dd_url AS (
  SELECT *, first_value(key) OVER (PARTITION BY coalesce(dd_url, key) ORDER BY dd_rank) AS url_first FROM dd_cand
),
dd_sha AS (
  SELECT key, first_value(key) OVER (PARTITION BY dd_sha ORDER BY dd_rank) AS sha_first
  FROM dd_url WHERE key = url_first AND dd_sha IS NOT NULL
),
dd_dups AS (
  SELECT u.key, coalesce(s.sha_first, u.url_first) AS duplicate_of
  FROM dd_url u LEFT JOIN dd_sha s ON s.key = u.url_first
  WHERE coalesce(s.sha_first, u.url_first) <> u.key
)"""
