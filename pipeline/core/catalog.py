"""The DuckDB catalog: views over every parquet table of a run.

``open_run(run_dir)`` returns an in-memory connection with the views (stages
use it); ``refresh_catalog(run_dir)`` writes the same views into
``catalog.duckdb`` so anyone can ``duckdb runs/<name>/catalog.duckdb``.
Views use absolute paths and are rebuilt whenever a stage finishes.
"""

from __future__ import annotations

import errno
import logging
import tempfile
from pathlib import Path

from t2i_curate.pipeline.core.columns import DECISION_COLUMNS
from t2i_curate.pipeline.core.errors import UserError
from t2i_curate.pipeline.core.io import (
    as_path,
    atomic_path,
    duck_connect,
    is_remote,
    shard_ids,
    sql_path,
    upload,
)
from t2i_curate.pipeline.core.layout import RunLayout

log = logging.getLogger(__name__)

# view name -> the shard-numbered parquet files of a run that it reads
SHARD_TABLES = {
    "downloads": lambda lay: [lay.download_parquet(i) for i in lay.finished_downloads()],
    "scores": lambda lay: [lay.score_parquet(i) for i in shard_ids(lay.scores, ".parquet")],
    "shards": lambda lay: [lay.selected_parquet(i) for i in shard_ids(lay.selected, ".parquet")],
    # one file, or one per input part (a folder / glob of parts: pipeline/parts.py)
    "input": lambda lay: lay.input_files(),
    "refused": lambda lay: lay.refused_files(),  # URLs refused before any fetch (core/urls.py)
}
# view name -> single file inside the run
FILE_TABLES = {
    "decisions": lambda lay: lay.decisions,
    "coverage": lambda lay: lay.coverage_file,  # concept coverage (`curate coverage`, pipeline/coverage.py)
    "coverage_rules": lambda lay: lay.coverage_rules_file,  # the same per dropping rule
}


def arrow(con, sql: str, params: list | None = None):
    """Run ``sql`` and return a pyarrow Table (DuckDB >= 1.4 and 2.x spellings)."""
    return arrow_of(con.sql(sql, params=params))


def arrow_of(rel):
    """A DuckDB relation as a pyarrow Table (DuckDB >= 1.4 and 2.x spellings)."""
    fn = getattr(rel, "to_arrow_table", None) or rel.fetch_arrow_table
    return fn()


def _sql_list(paths: list[Path]) -> str:
    return "[" + ", ".join("'" + sql_path(p).replace("'", "''") + "'" for p in paths) + "]"


def view_statements(run_dir: Path, leave_out: frozenset[str] = frozenset()) -> list[str]:
    """CREATE VIEW statements for every table present in the run (``leave_out``: files, as
    :func:`sql_path` spells them, that cannot be read: see :func:`create_views`)."""
    lay = RunLayout(run_dir)
    stmts = []
    for view, paths in SHARD_TABLES.items():
        found = [p for p in paths(lay) if sql_path(p) not in leave_out]
        if not found:
            continue
        files = _sql_list(found)
        stmts.append(
            f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM read_parquet({files}, union_by_name=true)"
        )
    for view, path in FILE_TABLES.items():
        if path(lay).exists() and sql_path(path(lay)) not in leave_out:
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


# columns a single-file table must have for the views built on it (a foreign file is left out)
FILE_COLUMNS = {"decisions": set(DECISION_COLUMNS) - {"duplicate_of"}}  # runs before dedup had no duplicate_of


def unreadable_files(run_dir: Path) -> dict[str, str]:
    """``{sql path: reason}`` of the run's table files whose parquet footer cannot be read, or that lack
    the columns their views need: what a truncated, damaged or foreign file looks like."""
    import pyarrow as pa

    from t2i_curate.pipeline.core.io import read_schema

    lay = RunLayout(run_dir)
    files = [(None, p) for paths in SHARD_TABLES.values() for p in paths(lay)]
    files += [(view, path(lay)) for view, path in FILE_TABLES.items() if path(lay).exists()]
    bad = {}
    for view, p in files:
        try:
            names = set(read_schema(p).names)
            if view in FILE_COLUMNS and FILE_COLUMNS[view] - names:
                bad[sql_path(p)] = f"lacks the columns {sorted(FILE_COLUMNS[view] - names)}"
        except (OSError, ValueError, pa.ArrowException) as e:
            bad[sql_path(p)] = f"{type(e).__name__}: {e}"
    return bad


def create_views(con, run_dir: Path) -> list[str]:
    """Create the run's views on ``con``. A table file that cannot be read (truncated, damaged, foreign)
    is left out with one warning line: its stage rewrites it on the next run, and ``curate verify`` names
    it; nothing else stops on it. Returns the statements run."""
    import duckdb

    leave_out: dict[str, str] = {}
    while True:
        try:
            stmts = view_statements(run_dir, frozenset(leave_out))
            for s in stmts:
                con.execute(s)
            return stmts
        except duckdb.Error:
            bad = {p: why for p, why in unreadable_files(run_dir).items() if p not in leave_out}
            if not bad:
                raise
            for p, why in bad.items():
                log.warning("%s cannot be read (%s): left out of the catalog's views; its stage rewrites it "
                            "(`curate run`), `curate verify` lists it", p, why)
            leave_out.update(bad)


def open_run(run_dir: Path, locked: bool = False):
    """In-memory DuckDB connection with the run's views (a remote run's filesystem registered).

    ``locked``: the connection may then touch no file outside the run folder (:func:`lock_down`)."""
    con = duck_connect(run_dir)
    create_views(con, run_dir)
    if locked:
        lock_down(con, run_dir)
    return con


class QueryError(UserError):
    """``curate query``: SQL that does not run, or that a reader may not run (see ``--allow-writes``)."""


def check_read_only_sql(con, sql: str) -> None:
    """Refuse ``sql`` unless it is one SELECT (``FROM``, ``WITH``, ``DESCRIBE``, ``SUMMARIZE`` and ``SHOW``
    are SELECTs too): COPY, EXPORT, ATTACH, INSTALL / LOAD, SET, CREATE, PRAGMA, CALL, EXPLAIN (whose
    ANALYZE runs the statement) and several statements need ``--allow-writes``."""
    import duckdb

    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(f"query failed: {str(e).strip()}") from None
    if len(statements) != 1:
        raise QueryError(f"curate query runs one SELECT; got {len(statements)} statements "
                         f"(--allow-writes runs any SQL)")
    kind = str(statements[0].type).rsplit(".", 1)[-1]
    if kind != "SELECT":
        raise QueryError(f"curate query only reads: a {kind} statement needs --allow-writes "
                         f"(which gives the SQL DuckDB's full power)")


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def allowed_dirs(*folders) -> list[str]:
    """The spellings of ``folders`` DuckDB's ``allowed_directories`` needs: the absolute path locally; on a
    store the URL, also as ``proto:///path`` (how some fsspec filesystems hand back the names they list)."""
    out: list[str] = []
    for f in folders:
        p = as_path(f)
        forms = [sql_path(p)]
        if is_remote(p):
            proto = p.protocol if isinstance(p.protocol, str) else p.protocol[0]
            bare = p.path.lstrip("/")
            forms += [f"{proto}://{bare}", f"{proto}:///{bare}"]
        out += [x.rstrip("/") + "/" for x in forms if x.rstrip("/") + "/" not in out]
    return out


def lock_down(con, *folders) -> None:
    """Limit ``con`` to the files under ``folders`` (the run folder; DuckDB's own spill folder stays
    allowed): no other file or URL read or written, no ATTACH elsewhere, no extension installed or loaded,
    and the configuration locked, so no later ``SET`` undoes it. Filesystems registered before (a store's
    fsspec one, ``io.duck_connect``) keep working under the allowed folders."""
    dirs = ", ".join(_sql_str(d) for d in allowed_dirs(*folders))
    for stmt in ("SET autoinstall_known_extensions = false", "SET autoload_known_extensions = false",
                 f"SET allowed_directories = [{dirs}]", "SET enable_external_access = false",
                 "SET lock_configuration = true"):
        con.execute(stmt)


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
    """Write the views into a new database file ``db`` and check it (the caller moves it into place). A
    full disk is an ``OSError`` (ENOSPC) naming the file, whatever layer noticed it."""
    import duckdb

    from t2i_curate.pipeline.core.errors import is_disk_full

    try:
        _write_views(run_dir, db)
    except duckdb.Error as e:
        if is_disk_full(e):
            raise OSError(errno.ENOSPC, f"no space left writing the catalog ({e})", str(db)) from e
        raise
    finally:
        db.with_name(db.name + ".wal").unlink(missing_ok=True)


def _write_views(run_dir, db: Path) -> None:
    con = duck_connect(run_dir, database=str(db))
    try:
        stmts = create_views(con, run_dir)
        con.execute("CHECKPOINT")  # the views into the file itself: raises here on a full disk
    finally:
        con.close()
    wal = db.with_name(db.name + ".wal")
    if wal.exists():  # a checkpoint that did not complete: the file may hold none of the views
        raise OSError(errno.EIO, "the catalog's checkpoint did not complete (write-ahead log left)", str(wal))
    _check_catalog(db, {s.split()[4] for s in stmts})


def _check_catalog(db: Path, want: set[str]) -> None:
    """The new catalog file opens and holds every view the run has, before it replaces the old one."""
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        held = {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
    finally:
        con.close()
    if not want <= held:
        raise OSError(errno.EIO, f"the new catalog lacks the views {sorted(want - held)}; the old one is kept",
                      str(db))
