"""The DuckDB catalog: views over every parquet table of a run.

``open_run(run_dir)`` returns an in-memory connection with the views (stages
use it); ``refresh_catalog(run_dir)`` writes the same views into
``catalog.duckdb`` so anyone can ``duckdb runs/<name>/catalog.duckdb``.
Views use absolute paths and are rebuilt whenever a stage finishes.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from t2i_curate.pipeline.io import as_path, atomic_path, duck_connect, is_remote, shard_ids, sql_path, upload
from t2i_curate.pipeline.layout import RunLayout

log = logging.getLogger(__name__)

# view name -> the shard-numbered parquet files of a run that it reads
SHARD_TABLES = {
    "downloads": lambda lay: [lay.download_parquet(i) for i in lay.finished_downloads()],
    "scores": lambda lay: [lay.score_parquet(i) for i in shard_ids(lay.scores, ".parquet")],
    "shards": lambda lay: [lay.selected_parquet(i) for i in shard_ids(lay.selected, ".parquet")],
    # one file, or one per input part (a folder / glob of parts: pipeline/parts.py)
    "input": lambda lay: lay.input_files(),
    "refused": lambda lay: lay.refused_files(),  # URLs refused before any fetch (pipeline/urlguard.py)
}
# view name -> single file inside the run
FILE_TABLES = {
    "decisions": lambda lay: lay.decisions,
    "coverage": lambda lay: lay.coverage_file,  # concept coverage (`curate coverage`, pipeline/coverage.py)
    "coverage_rules": lambda lay: lay.coverage_rules_file,  # the same per dropping rule
}


def arrow(con, sql: str, params: list | None = None):
    """Run ``sql`` and return a pyarrow Table (DuckDB >= 1.4 and 2.x spellings)."""
    rel = con.sql(sql, params=params)
    fn = getattr(rel, "to_arrow_table", None) or rel.fetch_arrow_table
    return fn()


def _sql_list(paths: list[Path]) -> str:
    return "[" + ", ".join("'" + sql_path(p).replace("'", "''") + "'" for p in paths) + "]"


def view_statements(run_dir: Path) -> list[str]:
    """CREATE VIEW statements for every table present in the run."""
    lay = RunLayout(run_dir)
    stmts = []
    for view, paths in SHARD_TABLES.items():
        found = paths(lay)
        if not found:
            continue
        files = _sql_list(found)
        stmts.append(
            f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM read_parquet({files}, union_by_name=true)"
        )
    for view, path in FILE_TABLES.items():
        if path(lay).exists():
            stmts.append(f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM read_parquet({_sql_list([path(lay)])})")
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
    elif "refused" in names:  # every URL was refused before any fetch: no sample, but the view exists
        cols = ("key", "url", "caption", "status", "error_message", "score_status", "score_error")
        stmts.append("CREATE OR REPLACE VIEW samples AS SELECT "
                     + ", ".join(f"NULL::VARCHAR AS {c}" for c in cols) + ", NULL::BIGINT AS input_row LIMIT 0")
    if "decisions" in names:
        stmts.append(
            "CREATE OR REPLACE VIEW funnel AS SELECT "
            "CASE WHEN state = 'selected' THEN 'written' ELSE state END AS state, "
            "coalesce(rule, failed_stage) AS reason, count(*) AS samples "
            "FROM decisions GROUP BY ALL ORDER BY samples DESC"
        )
    stmts.extend(_eval_views(lay))
    return stmts


def _eval_views(lay: RunLayout) -> list[str]:
    """Eval tables (eval/<tag>/<table>.parquet) across every evaluated model: only folders with their
    ``metrics.json``, written (or uploaded) after the tables, so an unfinished eval is never read."""
    stmts = []
    finished = {m.parent.name for m in lay.eval.glob("*/metrics.json")}
    for table in ("eval_images", "eval_judgements", "eval_metrics", "eval_failures", "eval_bias"):
        files = sorted(f for f in lay.eval.glob(f"*/{table}.parquet") if f.parent.name in finished)
        if files:
            stmts.append(
                f"CREATE OR REPLACE VIEW {table} AS SELECT * FROM "
                f"read_parquet({_sql_list(files)}, union_by_name=true)"
            )
    return stmts


def open_run(run_dir: Path):
    """In-memory DuckDB connection with the run's views (a remote run's filesystem registered)."""
    con = duck_connect(run_dir)
    for s in view_statements(run_dir):
        con.execute(s)
    return con


def refresh_catalog(run_dir: Path) -> Path:
    """(Re)write ``catalog.duckdb`` with views over the run's tables.

    A run on an object store gets the same file, built locally and uploaded: its views name
    ``s3://...`` paths, which the DuckDB CLI reads with its httpfs extension (``curate query``
    registers the fsspec filesystem instead, offline)."""
    run_dir = as_path(run_dir)
    path = RunLayout(run_dir).catalog
    if not is_remote(path):
        with atomic_path(path) as tmp:
            _write_catalog(run_dir, tmp)
        return path
    with tempfile.TemporaryDirectory(prefix="t2i-catalog-") as d:
        local = Path(d) / "catalog.duckdb"
        _write_catalog(run_dir, local)
        upload(local, path)
    return path


def _write_catalog(run_dir, db: Path) -> None:
    con = duck_connect(run_dir, database=str(db))
    try:
        for s in view_statements(run_dir):
            con.execute(s)
    finally:
        con.close()
    wal = db.with_name(db.name + ".wal")
    if wal.exists():
        wal.unlink()
