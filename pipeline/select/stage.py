"""Select stage: the config's named rules, compiled to one DuckDB query.

Writes ``selected/decisions.parquet``: one row per input row with ``state``
(``selected`` / ``dropped`` / ``failed``), the dropping ``rule`` (``duplicate`` for exact
duplicates, with the kept sample's key in ``duplicate_of``; ``blocklist:<name>`` for a row a
blocklist names, ``pipeline/blocklist.py``), and for failures the ``error`` and ``failed_stage``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from t2i_curate.filters.blocklist import hash_rules
from t2i_curate.filters.dedup import DEFAULT_KEEP_ORDER, FALLBACK_KEEP_ORDER, ExactDedup, near_dedup
from t2i_curate.filters.expressions import RuleError, check_expression, check_order_by, first_line
from t2i_curate.filters.rules import decision_sql, explain_missing, missing_column
from t2i_curate.pipeline.core.catalog import arrow, open_run
from t2i_curate.pipeline.core.config import RunConfig
from t2i_curate.pipeline.core.errors import StageOrderError
from t2i_curate.pipeline.core.io import file_stats, shard_ids, sql_path, write_parquet
from t2i_curate.pipeline.core.layout import RunLayout

log = logging.getLogger(__name__)


def check_rule_syntax(rules, dcfg=None) -> None:
    """Parse every rule's ``keep`` (and ``select.dedup.keep_order``) as one expression before any SQL runs:
    no second statement, subquery, table function or file reader (``filters.rules.check_expression``)."""
    for r in rules:
        check_expression(r.keep, f"rule {r.name!r}")
    if dcfg is not None:
        check_order_by(dcfg.keep_order)


def check_rules(con, rules) -> None:
    """Parse every rule (one expression, nothing else), then bind it against the ``samples`` view; name
    the missing scorer if any."""
    import duckdb

    check_rule_syntax(rules)
    for r in rules:
        try:
            rows = con.execute(f"SELECT typeof(({r.keep})) FROM samples LIMIT 1").fetchall()
        except duckdb.Error as e:
            col = missing_column(str(e))
            if col:
                raise RuleError(explain_missing(r.name, col)) from None
            raise RuleError(f"rule {r.name!r}: {r.keep!r} is not a valid DuckDB expression: "
                            f"{first_line(e)}") from None
        if rows and rows[0][0] not in ("BOOLEAN", "NULL"):
            raise RuleError(f"rule {r.name!r}: expected a true/false expression, got a {rows[0][0]}: {r.keep!r}")


def dedup_plan(con, dcfg) -> ExactDedup | None:
    """Exact deduplication for this run (None: ``select.dedup.exact`` is off).

    ``keep_order`` is bound against the ``samples`` view; the default order falls back to
    ``key`` when the run has no ``aesthetic_score`` column, any other missing column is refused.
    """
    if not dcfg.exact:
        return None
    cols = {r[0] for r in con.execute("DESCRIBE samples").fetchall()}
    return ExactDedup(keep_order=bound_keep_order(con, dcfg), by_sha256="sha256" in cols, by_url="url" in cols)


def bound_keep_order(con, dcfg) -> str:
    """``select.dedup.keep_order`` bound against the ``samples`` view (the default falls back to ``key``)."""
    import duckdb

    order = dcfg.keep_order
    check_order_by(order)
    try:
        con.execute(f"SELECT key FROM samples ORDER BY {order}, key LIMIT 0").fetchall()
    except duckdb.Error as e:
        col = missing_column(str(e))
        if col and order == DEFAULT_KEEP_ORDER:
            log.info("dedup: no %s column in this run; the first copy by key is kept", col)
            order = FALLBACK_KEEP_ORDER
        elif col:
            raise RuleError(explain_missing("select.dedup.keep_order", col)) from None
        else:
            raise RuleError(f"select.dedup.keep_order: {order!r} is not a valid DuckDB ORDER BY: "
                            f"{first_line(e)}") from None
    return order


def explain_failure(con, rules, keep_order: str | None) -> RuleError | None:
    """The one-line error of a select query that failed at run time (a cast that fails on some sample's
    value, say): the rules, then the keep order, are evaluated one by one to name the one that fails
    (None: none of them fails alone; the query's own error stands)."""
    import duckdb

    ok = "status = 'success' AND score_status = 'ok'"
    for r in rules:
        try:
            con.execute(f"SELECT count(*) FROM samples WHERE {ok} AND NOT coalesce(({r.keep}), false)").fetchall()
        except duckdb.Error as e:
            return RuleError(f"rule {r.name!r} ({r.keep!r}) fails on this run's samples: {first_line(e)}")
    if keep_order is not None:
        try:
            con.execute(f"SELECT max(r) FROM (SELECT row_number() OVER (ORDER BY {keep_order}, key) AS r "
                        f"FROM samples WHERE {ok})").fetchall()
        except duckdb.Error as e:
            return RuleError(f"select.dedup.keep_order ({keep_order!r}) fails on this run's samples: "
                             f"{first_line(e)}")
    return None


def check_complete(run_dir: Path, con, scfg=None) -> None:
    """Every input row must have a download result and every download shard current scores: made
    from that download shard by this config's scorer settings (never a mix of old and new)."""
    from t2i_curate.pipeline.core.scores import current_shards, scorer_settings

    n_input = con.execute("SELECT count(*) FROM input").fetchall()[0][0]
    n_down = con.execute("SELECT count(*) FROM downloads").fetchall()[0][0] if _has(con, "downloads") else 0
    n_refused = con.execute("SELECT count(*) FROM refused").fetchall()[0][0] if _has(con, "refused") else 0
    if n_down + n_refused != n_input:
        raise StageOrderError(
            f"download is not finished: {n_down + n_refused} of {n_input} input rows have a result "
            f"({n_refused} refused before any fetch); run `curate download` first"
        )
    lay = RunLayout(run_dir)
    stats = file_stats(lay.download)  # one listing serves the shard list and every source stamp
    finished = lay.finished_downloads(set(stats))
    scored = set(shard_ids(lay.scores, ".parquet"))  # one listing, also for the currency check below
    missing = sorted(set(finished) - scored)
    if missing:
        raise StageOrderError(
            f"score is not finished: shards {missing[:10]}{'...' if len(missing) > 10 else ''} "
            f"have no scores; run `curate score` first"
        )
    if scfg is not None:
        current = current_shards(lay, finished, scorer_settings(scfg), stats, scored)
        stale = [s for s in finished if s not in current]
        if stale:
            raise StageOrderError(
                f"scores of shards {stale[:10]}{'...' if len(stale) > 10 else ''} were made with other scorer "
                f"settings (or from an older download); run `curate score` with this config first")


def _has(con, view: str) -> bool:
    return bool(con.execute(
        "SELECT count(*) FROM duckdb_views() WHERE view_name = ?", [view]).fetchall()[0][0])


def refused_views(con) -> tuple[str | None, str | None]:
    """(the view of rows the URL guard refused, for ``decision_sql``; the SQL of the decisions of rows a
    url / domain blocklist refused: ``dropped`` under the list's rule), each None when there is none."""
    from t2i_curate.filters.rules import REFUSED_KEY

    if not _has(con, "refused"):
        return None, None
    if "rule" not in {r[0] for r in con.execute("DESCRIBE refused").fetchall()}:  # a run from before blocklists
        return "refused", None
    con.execute("CREATE OR REPLACE TEMP VIEW refused_guard AS SELECT * FROM refused WHERE rule IS NULL")
    return "refused_guard", (f"SELECT {REFUSED_KEY} AS key, 'dropped' AS state, rule, NULL::VARCHAR AS error, "
                             f"NULL::VARCHAR AS failed_stage, NULL::VARCHAR AS duplicate_of FROM refused "
                             f"WHERE rule IS NOT NULL")


def with_blocked(sql: str, blocked: str | None) -> str:
    """``sql`` (the decisions) with the blocklisted rows' decisions added, ordered by key."""
    return sql if blocked is None else f"SELECT * FROM ({sql}) UNION ALL BY NAME ({blocked}) ORDER BY key"


def select_stage(cfg: RunConfig, run_dir: Path) -> dict[str, int]:
    """Judge every sample; write the decisions table; return state counts.

    The rules are parsed before anything runs (:func:`check_rule_syntax`), and the query runs on a
    connection that can touch no file outside the run folder (``catalog.lock_down``)."""
    import duckdb

    check_rule_syntax(cfg.select.rules, cfg.select.dedup)
    con = open_run(run_dir, locked=True)
    if not _has(con, "input"):
        raise StageOrderError("no download input in this run; run `curate download` first")
    check_complete(run_dir, con, cfg.score)
    source = "samples" if _has(con, "downloads") else None  # None: every URL was refused
    dedup, rules = None, list(cfg.select.rules)
    if source:
        check_rules(con, cfg.select.rules)
        dedup = dedup_plan(con, cfg.select.dedup)
        rules = hash_rules(cfg, con) + rules  # image-hash blocklists first (pipeline/blocklist.py)
    refused, blocked = refused_views(con)
    try:
        table = arrow(con, with_blocked(decision_sql(rules, source, refused, dedup), blocked))
    except duckdb.Error:
        err = explain_failure(con, rules if source else [], dedup.keep_order if dedup else None)
        if err is None:
            raise
        raise err from None
    if source:  # near duplicates (pHash, SemDeDup) among what the rules and exact dedup kept
        order = bound_keep_order(con, cfg.select.dedup)
        try:
            table, _ = near_dedup(con, table, cfg.select.dedup, order, run_dir)
        except duckdb.Error:
            err = explain_failure(con, [], order)
            if err is None:
                raise
            raise err from None
    decisions = RunLayout(run_dir).decisions
    write_parquet(decisions, table)
    counts = dict(con.execute(
        "SELECT state, count(*) FROM read_parquet(?) GROUP BY state",
        [sql_path(decisions)]).fetchall())
    return {s: counts.get(s, 0) for s in ("selected", "dropped", "failed")}
