"""The DuckDB catalog: views over every parquet table of a run.

``open_run(run_dir)`` returns an in-memory connection with the views (stages
use it); ``refresh_catalog(run_dir)`` writes the same views into
``catalog.duckdb`` so anyone can ``duckdb runs/<name>/catalog.duckdb``.
Views use absolute paths and are rebuilt whenever a stage finishes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.io import atomic_path, shard_ids

log = logging.getLogger(__name__)

# view name -> (folder inside the run, file suffix); shard-numbered files only
SHARD_TABLES = {
    "downloads": ("download", ".parquet"),
    "scores": ("scores", ".parquet"),
    "shards": ("selected", ".parquet"),
}
# view name -> single file inside the run
FILE_TABLES = {
    "input": "download/_input.parquet",
    "decisions": "selected/decisions.parquet",
}


def arrow(con, sql: str, params: list | None = None):
    """Run ``sql`` and return a pyarrow Table (DuckDB >= 1.4 and 2.x spellings)."""
    rel = con.sql(sql, params=params)
    fn = getattr(rel, "to_arrow_table", None) or rel.fetch_arrow_table
    return fn()


def _sql_list(paths: list[Path]) -> str:
    return "[" + ", ".join("'" + str(p.resolve()).replace("'", "''") + "'" for p in paths) + "]"


def _finished_download_shards(run_dir: Path) -> list[int]:
    from pipeline.download import finished_shards

    return finished_shards(run_dir / "download")


def view_statements(run_dir: Path) -> list[str]:
    """CREATE VIEW statements for every table present in the run."""
    run_dir = Path(run_dir)
    stmts = []
    for view, (folder, suffix) in SHARD_TABLES.items():
        d = run_dir / folder
        ids = _finished_download_shards(run_dir) if view == "downloads" else shard_ids(d, suffix)
        if not ids:
            continue
        files = _sql_list([d / f"{i:05d}{suffix}" for i in ids])
        stmts.append(
            f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM read_parquet({files}, union_by_name=true)"
        )
    for view, rel in FILE_TABLES.items():
        if (run_dir / rel).exists():
            stmts.append(f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM read_parquet({_sql_list([run_dir / rel])})")
    names = {s.split()[4] for s in stmts}
    if {"downloads", "scores"} <= names:
        stmts.append(
            "CREATE OR REPLACE VIEW samples AS SELECT d.*, s.* EXCLUDE (key) "
            "FROM downloads d LEFT JOIN scores s USING (key)"
        )
    elif "downloads" in names:
        stmts.append(
            "CREATE OR REPLACE VIEW samples AS SELECT *, NULL::VARCHAR AS score_status, "
            "NULL::VARCHAR AS score_error FROM downloads"
        )
    if "decisions" in names:
        stmts.append(
            "CREATE OR REPLACE VIEW funnel AS SELECT "
            "CASE WHEN state = 'selected' THEN 'written' ELSE state END AS state, "
            "coalesce(rule, failed_stage) AS reason, count(*) AS samples "
            "FROM decisions GROUP BY ALL ORDER BY samples DESC"
        )
    stmts.extend(_eval_views(run_dir))
    return stmts


def _eval_views(run_dir: Path) -> list[str]:
    """Eval tables (eval/<tag>/<table>.parquet) across every evaluated model."""
    stmts = []
    for table in ("eval_images", "eval_metrics", "eval_failures", "eval_bias"):
        files = sorted((run_dir / "eval").glob(f"*/{table}.parquet"))
        if files:
            stmts.append(
                f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM "
                f"read_parquet({_sql_list(files)}, union_by_name=true)"
            )
    return stmts


def open_run(run_dir: Path):
    """In-memory DuckDB connection with the run's views."""
    import duckdb

    con = duckdb.connect()
    for s in view_statements(run_dir):
        con.execute(s)
    return con


def refresh_catalog(run_dir: Path) -> Path:
    """(Re)write ``catalog.duckdb`` with views over the run's tables."""
    import duckdb

    run_dir = Path(run_dir)
    path = run_dir / "catalog.duckdb"
    with atomic_path(path) as tmp:
        con = duckdb.connect(str(tmp))
        try:
            for s in view_statements(run_dir):
                con.execute(s)
        finally:
            con.close()
        wal = tmp.with_name(tmp.name + ".wal")
        if wal.exists():
            wal.unlink()
    return path
