"""A rule is one expression over a sample's columns, never a SQL program.

A rule's ``keep`` and ``select.dedup.keep_order`` are pasted into the select query (``filters/rules.py``,
``filters/dedup.py``), so each is parsed by DuckDB's own parser first (``json_serialize_sql``) and its
syntax tree walked: one statement, one expression (or ORDER BY list), no comment, no subquery, no window
or aggregate, no parameter, and only scalar functions (no table function, nothing that reads files,
settings, variables or sequences).
"""

from __future__ import annotations

import functools
import json

from t2i_curate.pipeline.core.errors import UserError


class RuleError(UserError):
    """A rule cannot run on the columns this run has."""


# expression classes of DuckDB's parsed tree a rule may contain
_ALLOWED_CLASSES = frozenset({"CONSTANT", "COLUMN_REF", "COMPARISON", "CONJUNCTION", "OPERATOR", "FUNCTION", "CASE",
                              "CAST", "BETWEEN", "COLLATE", "LAMBDA", "TYPE"})
# scalar functions that read outside the row: settings, variables, sequences, logs, the clock of a sleep
_DENIED_FUNCTIONS = frozenset({"current_setting", "getvariable", "getenv", "setseed", "nextval", "currval",
                               "write_log", "sleep_ms", "pg_sleep", "which_secret", "current_query", "query",
                               "query_table", "json_execute_serialized_sql", "unnest", "unlist"})
_DENIED_PREFIXES = ("read_", "glob", "duckdb_", "pragma_", "parquet_", "sniff_", "__internal", "iceberg_",
                    "delta_", "sqlite_", "postgres_", "mysql_")


@functools.lru_cache(maxsize=1)
def allowed_functions() -> frozenset[str]:
    """Names of the DuckDB scalar functions (and scalar macros without a query inside) a rule may call."""
    import duckdb

    con = duckdb.connect()
    try:
        rows = con.execute(
            "SELECT DISTINCT lower(function_name) FROM duckdb_functions() WHERE function_type = 'scalar' "
            "OR (function_type = 'macro' AND NOT regexp_matches(coalesce(macro_definition, ''), "
            "'(?i)\\b(select|from|unnest)\\b'))").fetchall()
    finally:
        con.close()
    return frozenset(n for (n,) in rows
                     if n not in _DENIED_FUNCTIONS and not n.startswith(_DENIED_PREFIXES))


def _parse(sql: str, what: str, text: str) -> dict:
    """The one SELECT node DuckDB parses ``sql`` into; refused when it has a comment or is not one SELECT."""
    import duckdb

    if any(kind == duckdb.token_type.comment for _, kind in _tokens(sql, what, text)):
        raise RuleError(f"{what}: comments are not allowed in {text!r}")
    con = duckdb.connect()
    try:
        try:
            statements = con.extract_statements(sql)
        except duckdb.Error as e:
            raise RuleError(f"{what}: {text!r} is not valid DuckDB SQL: {first_line(e)}") from None
        if len(statements) != 1:
            raise RuleError(f"{what}: expected one expression, got {len(statements)} SQL statements: {text!r}")
        tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0])
    finally:
        con.close()
    if tree.get("error") or len(tree.get("statements") or []) != 1:
        raise RuleError(f"{what}: {text!r} is not valid DuckDB SQL: {tree.get('error_message', '')}")
    statements = tree["statements"]
    node = statements[0].get("node") or {}
    if node.get("type") != "SELECT_NODE" or (node.get("cte_map") or {}).get("map"):
        raise RuleError(f"{what}: expected one expression, got a query: {text!r}")
    if any(node.get(k) for k in ("where_clause", "group_expressions", "group_sets", "having", "sample", "qualify")):
        raise RuleError(f"{what}: expected one expression, got a query: {text!r}")
    if node.get("aggregate_handling", "STANDARD_HANDLING") != "STANDARD_HANDLING":
        raise RuleError(f"{what}: expected one expression, got a query: {text!r}")
    return node


def _tokens(sql: str, what: str, text: str):
    import duckdb

    try:
        return duckdb.tokenize(sql)
    except duckdb.Error as e:
        raise RuleError(f"{what}: {text!r} is not valid DuckDB SQL: {first_line(e)}") from None


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an error message, at most ``limit`` characters (DuckDB adds the query after it)."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]


def _walk(node, what: str, text: str) -> None:
    """Refuse anything in a parsed expression tree that is not a plain per-row expression."""
    if isinstance(node, list):
        for v in node:
            _walk(v, what, text)
        return
    if not isinstance(node, dict):
        return
    if "node" in node or node.get("type") in ("SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE"):
        raise RuleError(f"{what}: subqueries are not allowed in a rule: {text!r}")
    cls = node.get("class")
    if cls is not None:
        if cls == "SUBQUERY":
            raise RuleError(f"{what}: subqueries are not allowed in a rule: {text!r}")
        if cls == "WINDOW":
            raise RuleError(f"{what}: window functions are not allowed in a rule (it is judged per sample): "
                            f"{text!r}")
        if cls not in _ALLOWED_CLASSES:
            raise RuleError(f"{what}: {cls.lower().replace('_', ' ')} expressions are not allowed in a rule: "
                            f"{text!r}")
        if cls == "FUNCTION":
            _check_function(node, what, text)
    for v in node.values():
        _walk(v, what, text)


def _check_function(node: dict, what: str, text: str) -> None:
    name = str(node.get("function_name", ""))
    if node.get("catalog") or node.get("schema"):
        raise RuleError(f"{what}: call {name}() without a schema or catalog name: {text!r}")
    if node.get("filter") or (node.get("order_bys") or {}).get("orders") or node.get("distinct") \
            or node.get("export_state"):
        raise RuleError(f"{what}: aggregates are not allowed in a rule (it is judged per sample): {text!r}")
    if name.lower() not in allowed_functions():
        raise RuleError(f"{what}: function {name}() is not allowed in a rule: a rule may call DuckDB's scalar "
                        f"functions, never a table, aggregate or file-reading one: {text!r}")


@functools.lru_cache(maxsize=256)
def check_expression(text: str, what: str) -> None:
    """Refuse ``text`` unless it is a single DuckDB expression over a sample's columns (see above).

    ``what`` names it in the error (``rule 'name'``)."""
    if not isinstance(text, str) or not text.strip():
        raise RuleError(f"{what}: expected a true/false expression, got nothing")
    node = _parse(f"SELECT {text}", what, text)
    items = node.get("select_list") or []
    from_table = node.get("from_table") or {}
    if len(items) != 1 or node.get("modifiers") or from_table.get("type") != "EMPTY":
        raise RuleError(f"{what}: expected one expression, got more: {text!r}")
    if items[0].get("alias"):
        raise RuleError(f"{what}: expected one expression, got a named one: {text!r}")
    _walk(items[0], what, text)


@functools.lru_cache(maxsize=64)
def check_order_by(text: str, what: str = "select.dedup.keep_order") -> None:
    """Refuse ``text`` unless it is a plain ORDER BY list of expressions over a sample's columns."""
    if not isinstance(text, str) or not text.strip():
        raise RuleError(f"{what}: expected an ORDER BY list (e.g. 'aesthetic_score DESC'), got nothing")
    node = _parse(f"SELECT key FROM samples ORDER BY {text}", what, text)
    mods = node.get("modifiers") or []
    from_table = node.get("from_table") or {}
    items = node.get("select_list") or []
    if (len(mods) != 1 or mods[0].get("type") != "ORDER_MODIFIER" or len(items) != 1
            or from_table.get("type") != "BASE_TABLE" or from_table.get("table_name") != "samples"
            or from_table.get("sample")):
        raise RuleError(f"{what}: expected an ORDER BY list (e.g. 'aesthetic_score DESC'), got {text!r}")
    for order in mods[0].get("orders") or []:
        _walk(order.get("expression"), what, text)
