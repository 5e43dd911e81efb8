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

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

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

    def __post_init__(self) -> None:
        check_keep_order(self.keep_order)


def check_keep_order(keep_order: str) -> None:
    """Refuse a keep order that is not a plain ORDER BY list (``rules.check_order_by``): it is pasted into
    the select query, so a second statement, a subquery or a file reader must never get there."""
    from t2i_curate.filters.expressions import check_order_by

    check_order_by(keep_order)


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


# ---- near duplicates: pHash and SemDeDup, after the rules and exact dedup ----------------------
#
# Both run on the decisions the query above made: the samples still `selected` are the candidates,
# ranked by the same keep order, and each group's first sample stays selected; the others become
# `dropped` with the pass's rule and `duplicate_of` the kept key. An earlier duplicate that pointed
# at a sample a later pass drops is re-pointed at that pass's kept sample, so `duplicate_of` always
# names a written sample.

NEAR_PHASH_RULE = "near_duplicate_phash"
_HEX16 = "^[0-9a-f]{16}$"


def phash_bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, mask) of ``max_distance + 1`` bands that split the 64 bits: two hashes at most
    ``max_distance`` bits apart agree exactly on at least one band (pigeonhole)."""
    n = max_distance + 1
    edges = [round(64 * i / n) for i in range(n + 1)]
    return [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def phash_duplicates(con, cand: str, max_distance: int):
    """(key, duplicate_of) of the candidates in relation ``cand`` (key, phash, dd_rank) whose pHash
    lies within ``max_distance`` bits of another's, grouped transitively (union-find); arrow table.

    Candidate pairs share one band exactly (a DuckDB hash join over distinct hash values), then
    the Hamming distance is checked; equal hashes share a value and never form pairs.
    """
    import pyarrow as pa

    from t2i_curate.filters.semdedup import components
    from t2i_curate.pipeline.core.catalog import arrow

    con.execute(f"CREATE OR REPLACE TEMP TABLE ph_rows AS SELECT key, dd_rank, ('0x' || phash)::UBIGINT AS h "
                f"FROM {cand} WHERE regexp_full_match(phash, '{_HEX16}')")
    con.execute("CREATE OR REPLACE TEMP TABLE ph_vals AS SELECT h, (row_number() OVER (ORDER BY h) - 1)::BIGINT "
                "AS hid FROM (SELECT DISTINCT h FROM ph_rows)")
    bands = ", ".join(f"({i}, {s}, {m}::UBIGINT)" for i, (s, m) in enumerate(phash_bands(max_distance)))
    edges = con.execute(f"""
WITH b AS (SELECT hid, h, band, (h >> shift) & mask AS v FROM ph_vals, (VALUES {bands}) t(band, shift, mask))
SELECT DISTINCT x.hid AS a, y.hid AS b FROM b x JOIN b y ON x.band = y.band AND x.v = y.v AND x.hid < y.hid
WHERE bit_count(xor(x.h, y.h)) <= {int(max_distance)}""").fetchnumpy()
    n = con.execute("SELECT count(*) FROM ph_vals").fetchall()[0][0]
    import numpy as np

    comp = components(n, np.asarray(edges["a"], np.int64), np.asarray(edges["b"], np.int64))
    con.register("ph_comp", pa.table({"hid": np.arange(n, dtype=np.int64), "comp": comp}))
    return arrow(con, """
SELECT key, kept AS duplicate_of FROM (
  SELECT r.key, first_value(r.key) OVER (PARTITION BY c.comp ORDER BY r.dd_rank) AS kept
  FROM ph_rows r JOIN ph_vals v USING (h) JOIN ph_comp c USING (hid))
WHERE key <> kept ORDER BY key""")


def apply_duplicates(con, decisions, dups, rule: str):
    """``decisions`` with the ``dups`` (key, duplicate_of) rows dropped by ``rule``, and earlier
    duplicates of a now dropped sample pointed at its kept one; arrow table, same columns."""
    from t2i_curate.pipeline.core.catalog import arrow

    con.register("nd_dec", decisions)
    con.register("nd_dups", dups)
    return arrow(con, f"""
SELECT d.* REPLACE (
  CASE WHEN n.key IS NOT NULL THEN 'dropped' ELSE d.state END AS state,
  CASE WHEN n.key IS NOT NULL THEN '{rule}' ELSE d.rule END AS rule,
  coalesce(n.duplicate_of, p.duplicate_of, d.duplicate_of) AS duplicate_of)
FROM nd_dec d LEFT JOIN nd_dups n ON n.key = d.key LEFT JOIN nd_dups p ON p.key = d.duplicate_of
ORDER BY d.key""")


def candidates_sql(keep_order: str) -> str:
    """The samples ``nd_dec`` still selects, with ``dd_rank`` (1 = kept first) in keep order."""
    check_keep_order(keep_order)
    return (f"(SELECT s.*, row_number() OVER (ORDER BY {keep_order}, s.key) AS dd_rank FROM samples s "
            f"WHERE s.key IN (SELECT key FROM nd_dec WHERE state = 'selected'))")


def _phash_on(enabled, cols: set[str]) -> bool:
    from t2i_curate.pipeline.core.errors import UserError

    if enabled is True and "phash" not in cols:
        raise UserError("rule 'near_duplicate_phash' (select.dedup.phash.enabled: true) needs the phash scorer "
                        "(column 'phash'): add 'phash' to score.scorers in the config, then run `curate score`")
    return enabled is True or (enabled == "auto" and "phash" in cols)


def _semantic_source(con, cand: str, scfg, run_dir):
    """The run's embeddings for SemDeDup, or None when it does not run (``auto``: none saved, or
    saved by a tiny model); ``enabled: true`` without embeddings, or with a mix of models, is refused."""
    from t2i_curate.filters.semdedup import run_embeddings, saved_embeddings
    from t2i_curate.pipeline.core.errors import UserError

    if scfg.enabled is False:
        return None
    parquets, files, models = saved_embeddings(run_dir)
    if not parquets:
        if scfg.enabled is True:
            raise UserError("select.dedup.semantic.enabled is true, but this run saved no image embeddings: "
                            "expected a CLIP scorer (aesthetic, clip_similarity, nsfw) and score.save_embeddings")
        return None
    if len(models) > 1:
        raise UserError(f"semantic dedup: the score shards hold embeddings of several models {models}; "
                        f"expected one: run `curate score` again with one config")
    tiny = models[0].startswith("tiny")
    if tiny and scfg.enabled == "auto":
        log.info("semantic dedup off: the saved embeddings come from a tiny random model (%s); "
                 "set select.dedup.semantic.enabled=true to run it anyway", models[0])
        return None
    if tiny:
        log.warning("semantic_duplicate runs on TINY random embeddings (%s): its groups mean nothing", models[0])
    con.execute(f"CREATE OR REPLACE TEMP TABLE nd_cand AS SELECT key, dd_rank FROM {cand}")
    return (*run_embeddings(con, "nd_cand", parquets, files), models)


def _semantic_pass(con, cand: str, scfg, run_dir, prov: dict):
    """(key, duplicate_of) of SemDeDup's duplicates among ``cand`` (materialised as ``nd_cand``), or None
    when it does not run."""
    import numpy as np
    import pyarrow as pa

    from t2i_curate.filters.semdedup import SEMANTIC_RULE, semantic_duplicates
    from t2i_curate.pipeline.core.catalog import arrow

    src = _semantic_source(con, cand, scfg, run_dir)
    if src is None:
        return None
    emb, rank, models = src
    dup_of, k = semantic_duplicates(emb, rank, scfg.threshold, scfg.clusters, scfg.iterations, scfg.seed,
                                    scfg.chunk_rows)
    hit = np.flatnonzero(dup_of >= 0)
    con.register("sd_pairs", pa.table({"r": rank[hit], "kept_r": rank[dup_of[hit]]}))
    prov[SEMANTIC_RULE] = {"embeddings": models[0], "tiny": models[0].startswith("tiny"), "threshold": scfg.threshold,
                           "clusters": k, "candidates": len(emb), "seed": scfg.seed}
    return arrow(con, """SELECT c.key, k.key AS duplicate_of FROM sd_pairs p
JOIN nd_cand c ON c.dd_rank = p.r JOIN nd_cand k ON k.dd_rank = p.kept_r ORDER BY c.key""")


def near_dedup(con, decisions, dcfg, keep_order: str, run_dir):
    """Apply ``near_duplicate_phash`` then ``semantic_duplicate`` (each when on) to the decisions
    (arrow table) of the run in ``run_dir``; ``con`` has its ``samples`` view. Return the new
    decisions and their provenance (rule -> settings, counts, the embedding model)."""
    from t2i_curate.filters.semdedup import SEMANTIC_RULE

    cols = {r[0] for r in con.execute("DESCRIBE samples").fetchall()}
    prov: dict = {}
    if _phash_on(dcfg.phash.enabled, cols):
        con.register("nd_dec", decisions)
        con.execute(f"CREATE OR REPLACE TEMP TABLE nd_cand AS SELECT key, phash, dd_rank FROM {candidates_sql(keep_order)}")
        dups = phash_duplicates(con, "nd_cand", dcfg.phash.max_distance)
        decisions = apply_duplicates(con, decisions, dups, NEAR_PHASH_RULE)
        prov[NEAR_PHASH_RULE] = {"max_distance": dcfg.phash.max_distance, "dropped": dups.num_rows,
                                 "hash": "pHash 64-bit (filters/phash.py)"}
    if dcfg.semantic.enabled is not False:
        con.register("nd_dec", decisions)
        dups = _semantic_pass(con, candidates_sql(keep_order), dcfg.semantic, run_dir, prov)
        if dups is not None:
            decisions = apply_duplicates(con, decisions, dups, SEMANTIC_RULE)
            prov[SEMANTIC_RULE]["dropped"] = dups.num_rows
    for rule, p in prov.items():
        log.info("%s: %s", rule, p)
    if prov:  # what made the near-duplicate groups, beside the decisions (schema metadata)
        import json

        meta = {**(decisions.schema.metadata or {}), b"t2i_curate": json.dumps({"near_dedup": prov}).encode()}
        decisions = decisions.replace_schema_metadata(meta)
    return decisions, prov
