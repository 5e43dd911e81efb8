"""The ``curate`` command line: one subcommand per stage, and ``run`` for all of them."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from t2i_curate.pipeline.core.errors import UserError, disk_full, is_disk_full

log = logging.getLogger("curate")


def _config(args):
    from t2i_curate.pipeline.core.config import load_config

    overrides = list(args.set or [])
    if getattr(args, "urls", None):
        overrides.append(f"input.urls={args.urls}")
    if getattr(args, "model", None):
        overrides.append(f"eval.model={args.model}")
    for key in ("images", "prompts"):  # curate eval --images DIR --prompts FILE
        if getattr(args, key, None):
            overrides.append(f"eval.{key}={args.__dict__[key]}")
    cfg = load_config(args.config, overrides)
    from t2i_curate.filters.registry import configured

    configured(cfg.score)  # an unknown scorer name is refused before any work
    return cfg


def _summary(title: str, rows: list[tuple[str, object]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    t.add_column("what")
    t.add_column("value", justify="right")
    for k, v in rows:
        t.add_row(str(k), str(v))
    Console(stderr=True).print(t)


# --- stages -------------------------------------------------------------------------------


def cmd_download(args) -> dict:
    from t2i_curate.pipeline.download.stage import download_stage, read_url_list
    from t2i_curate.pipeline.runfolder import prepare_run, url_source

    cfg = _config(args)
    with url_source(cfg) as urls:
        table = read_url_list(urls, cfg.input)  # bad input is refused before the run folder is touched
        return download_stage(cfg, prepare_run(cfg), urls, table)


def cmd_retry_failed(args) -> dict:
    from t2i_curate.pipeline.download.stage import retry_failed
    from t2i_curate.pipeline.runfolder import prepare_run, url_source

    cfg = _config(args)
    run = prepare_run(cfg)
    with url_source(cfg) as urls:
        from t2i_curate.pipeline.download.stage import prepare_input

        prepare_input(run, urls, cfg.input)  # fresh URLs (the demo server's port changes)
        return retry_failed(cfg, run)


def cmd_score(args) -> dict:
    from t2i_curate.pipeline.core.layout import RunLayout
    from t2i_curate.pipeline.runfolder import prepare_run
    from t2i_curate.pipeline.score.stage import score_stage

    cfg = _config(args)
    run = prepare_run(cfg)
    return score_stage(cfg, run, RunLayout(run).finished_downloads())


def cmd_select(args) -> dict:
    from t2i_curate.pipeline.runfolder import prepare_run
    from t2i_curate.pipeline.select.stage import select_stage

    cfg = _config(args)
    return select_stage(cfg, prepare_run(cfg))


def cmd_write(args) -> dict:
    from t2i_curate.pipeline.runfolder import prepare_run
    from t2i_curate.pipeline.write.stage import write_stage

    cfg = _config(args)
    run = prepare_run(cfg)
    from t2i_curate.pipeline.run import model_manifest

    return write_stage(cfg, run, model_manifest(run))


def cmd_funnel(args) -> dict:
    from t2i_curate.pipeline.report.funnel import funnel

    run = _run_dir(args)
    f = funnel(run, save_required=False)  # a reader: on a read-only run folder, report/funnel.* is not saved
    _print_funnel(f)
    return {"written": f["written"], "dropped": f["dropped"], "failed": f["failed"]}


def _print_funnel(f: dict) -> None:
    rows: list[tuple[str, object]] = [("input rows", f["input"]), ("written", f["written"])]
    rows += [(f"dropped: {r}", n) for r, n in f["dropped_by_rule"].items()]
    rows += [(f"failed ({r['stage']}): {r['error'][:60]}", r["samples"]) for r in f["failed_by_reason"]]
    rows.append(("written + dropped + failed", f["written"] + f["dropped"] + f["failed"]))
    title = "funnel" + (" (TINY RANDOM MODELS: scores not meaningful)" if f.get("tiny_models") else "")
    _summary(title, rows)


def cmd_run(args) -> dict:
    from t2i_curate.pipeline.run import run_curation

    r = run_curation(_config(args))
    _print_funnel(r["funnel"])
    d, s, sel, w = r["download"], r["score"], r["select"], r["write"]
    _summary(f"run {r['run']}", [
        ("downloaded ok / failed", f"{d['success']} / {d['failed']}"),
        ("scored / failed / skipped shards", f"{s['scored']} / {s['failed']} / {s['skipped']}"),
        ("selected / dropped / failed", f"{sel['selected']} / {sel['dropped']} / {sel['failed']}"),
        ("shards written (skipped)", f"{w['shards']} ({w['skipped']})"),
        *[(f"{k} seconds", f"{v:.1f}") for k, v in r["seconds"].items()],
    ])
    log.info("curation report: %s", r["report"])  # the last line `make filter` prints
    return {"written": r["funnel"]["written"]}


def cmd_weights(args) -> dict:
    """Fetch every real weight the config needs (or every scorer's with --all)."""
    from t2i_curate.filters.registry import all_weights, needed_weights
    from t2i_curate.pipeline.core.weights import fetch_all

    cfg = _config(args)
    scfg = cfg.score.model_copy(deep=True)
    scfg.models.preset = "real"
    clips, files = all_weights(scfg) if args.all else needed_weights(scfg)
    paths = fetch_all(scfg.models, clips, files)
    _summary("weights", list(paths.items()))
    return paths


def cmd_eval(args) -> dict:
    """Sample the model over the prompt suites, measure, and write the report."""
    from t2i_curate.eval.evaluate import run_eval

    m = run_eval(_config(args))
    rows = [("images", m["n_images"]), ("FID", f"{m['fid']:.2f} ({m['fid_protocol']['protocol']}, {m['fid_protocol']['feature']})"),
            ("KID", f"{m['kid_mean']:.4f} ± {m['kid_std']:.4f}"), ("CLIP score", f"{m['clip_score']:.2f}")]
    rows += [(f"failure {f['category']} / {f['judge']}",
              (f"{f['rate']:.2f} [{f['ci_low']:.2f}, {f['ci_high']:.2f}] of {f['n']}" if f["n"] else "n/a")
              + (f", {f['unknown']} unknown" if f.get("unknown") else "")) for f in m["failures"]]
    if m["bias"]:
        b = m["bias"]
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        rows.append(("gender MAD / skin-tone MAD (faces)", f"{fmt(b['gender_mad'])} / {fmt(b['skin_tone_mad'])}"))
        rows.append(("the same, whole image (HEIM)", f"{fmt(b.get('heim_gender_mad'))} / "
                                                     f"{fmt(b.get('heim_skin_tone_mad'))}"))
    if m.get("input_problems"):
        p = m["input_problems"]
        rows.append(("images without prompt / prompts without image / unreadable",
                     f"{p['no_prompt']} / {p['no_image']} / {p['unreadable']}"))
    rows += [(f"{k} seconds", f"{v:.1f}") for k, v in m["seconds"].items()] + [("report", m["report"])]
    _summary("eval" + (" (TINY RANDOM PIPELINE: numbers not meaningful)" if m["tiny_model"] else ""), rows)
    return m


def cmd_report(args) -> dict:
    """A run folder: its curation report; an eval folder: its eval report; neither given (--config /
    --run): the run's curation report, and the config's eval report when the run was evaluated."""
    from t2i_curate.pipeline.core.layout import RunLayout
    from t2i_curate.pipeline.report.curation import build_run_report

    if args.eval_dir:
        from t2i_curate.pipeline.core.io import as_path

        folder = as_path(args.eval_dir)  # local, or on an object store
        if (folder / "metrics.json").exists():
            return _eval_report(folder)
        if not RunLayout(folder).decisions.exists():
            raise UserError(f"curate report: expected a run folder (with selected/decisions.parquet) or an eval "
                            f"folder (with metrics.json), got {folder}")
        log.info("report: %s", build_run_report(folder))
        return {}
    from t2i_curate.eval.evaluate import eval_dir

    cfg = _config(args)
    run = _run_dir(args)
    folder = RunLayout(run).eval_dir(eval_dir(cfg).name)  # the config's eval tag
    if not RunLayout(run).decisions.exists() and not (folder / "metrics.json").exists():
        raise UserError(f"curate report: {run} has neither a selection (run `curate run`) nor an eval of "
                        f"{folder.name} (run `curate eval`)")
    if RunLayout(run).decisions.exists():
        log.info("report: %s", build_run_report(run))
    if (folder / "metrics.json").exists():
        _eval_report(folder)
    return {}


def _eval_report(folder: Path) -> dict:
    """Rebuild an eval's report; one on an object store is rebuilt from its local staging folder (refused,
    naming that folder, when this machine has none) and the two report files uploaded."""
    from t2i_curate.eval.evaluate import local_eval_folder
    from t2i_curate.eval.report import build_report
    from t2i_curate.pipeline.core.io import is_remote, upload

    paths = build_report(local_eval_folder(folder))
    if is_remote(folder):
        for p in paths:
            upload(p, folder / p.name)
    log.info("report: %s, %s", *paths)
    return {}


def cmd_compare(args) -> dict:
    """Side by side metrics of evaluated models; refuses FID/KID computed differently."""
    import json

    from t2i_curate.eval.fid import check_comparable
    from t2i_curate.pipeline.core.io import as_path

    paths = [as_path(p) for p in args.evals]  # local, or on an object store (read through fsspec)
    ms = [json.loads((p / "metrics.json" if p.is_dir() else p).read_text()) for p in paths]
    for m in ms[1:]:
        check_comparable(ms[0]["fid_protocol"], m["fid_protocol"])
    rows = [(m["tag"], f"FID {m['fid']:.2f} | KID {m['kid_mean']:.4f} | CLIP {m['clip_score']:.2f} | "
             f"N {m['n_images']}" + (" | TINY" if m["tiny_model"] else "")) for m in ms]
    p0 = ms[0]["fid_protocol"]
    _summary(f"compare ({p0.get('protocol', 'no protocol name')}, {p0['feature']})", rows)
    return {}


def cmd_verify(args) -> dict:
    from t2i_curate.pipeline.report.verify import check_run

    run = _run_dir(args)
    check_run(run)
    log.info("verify: %s is consistent (shards, parquet, manifest, accounting)", run)
    return {}


def cmd_coverage(args) -> dict:
    """Concept coverage of a run (eval suites or --concepts FILE): report/coverage.parquet and a table."""
    from t2i_curate.pipeline.report.coverage import print_coverage, resolve_run, write_coverage

    given = args.run_dir or args.run
    run = resolve_run(given, _config(args).runs_dir) if given else _config(args).run_dir
    cov, rules = write_coverage(run, args.concepts, args.clip_threshold, args.chunk_rows)
    print_coverage(cov.to_pylist(), rules.to_pylist())
    log.info("coverage: %s (catalog views coverage, coverage_rules)", run / "report" / "coverage.parquet")
    return {}


def _run_dir(args) -> Path:
    """``--run DIR`` (every read-only command takes it; ``verify`` also as its positional), else the config's."""
    from t2i_curate.pipeline.core.io import as_path

    given = getattr(args, "run", None) or getattr(args, "run_dir", None)
    if given:
        run = as_path(given)
        if not run.is_dir():
            from t2i_curate.pipeline.core.lock import RunFolderError

            raise RunFolderError(f"--run {run}: no such run folder")
        return run
    return _config(args).run_dir


def cmd_query(args) -> dict:
    """Run one SQL statement over the run's views, built in memory: the run folder is never written
    (``catalog.duckdb`` is neither created nor replaced), so a read-only run folder works. Unless
    ``--allow-writes``, only a SELECT runs, on a connection that can read nothing outside the run folder."""
    import duckdb

    from t2i_curate.pipeline.core.catalog import (
        QueryError,
        arrow_of,
        check_read_only_sql,
        lock_down,
        open_run,
    )

    run = _run_dir(args)
    con = open_run(run)
    views = [r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()]
    if not views:
        raise QueryError(f"{run}: no run tables here (input, downloads, scores, decisions...); expected a run "
                         f"folder (runs/<name>)")
    if not args.allow_writes:
        check_read_only_sql(con, args.sql)
        lock_down(con, run)
    try:
        rel = con.sql(args.sql)
        table = None if rel is None else arrow_of(rel)
    except duckdb.Error as e:
        hint = ""
        if isinstance(e, duckdb.PermissionException) and not args.allow_writes:
            hint = "\ncurate query reads only the run folder; --allow-writes gives DuckDB's full power"
        raise QueryError(f"query failed: {str(e).strip()}\nviews in this run: {', '.join(sorted(views))}"
                         f"{hint}") from None
    if table is None:  # --allow-writes: a statement that returns no rows (COPY, ATTACH, SET...)
        log.info("done: the last statement returns no rows")
        return {}
    _emit(table, args.format, args.output)
    return {}


def _emit(table, fmt: str, output: str | None) -> None:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if fmt == "table":
        from rich.console import Console
        from rich.table import Table

        t = Table(*table.column_names)
        for row in table.slice(0, 200).to_pylist():
            t.add_row(*["" if v is None else str(v) for v in row.values()])
        Console().print(t)
        if table.num_rows > 200:
            log.info("showing 200 of %d rows; use --format csv/json/parquet --output FILE for all", table.num_rows)
        return
    if fmt == "parquet" and not output:
        from t2i_curate.pipeline.core.config import ConfigError

        raise ConfigError("--format parquet needs --output FILE")
    if fmt == "parquet":
        pq.write_table(table, output)
    elif fmt == "csv":
        pcsv.write_csv(table, output or sys.stdout.buffer)
    else:
        import json

        text = "\n".join(json.dumps(r, default=str) for r in table.to_pylist()) + "\n"
        if output:
            Path(output).write_text(text)
        else:
            sys.stdout.write(text)


# --- parser --------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, urls: bool = True) -> None:
    p.add_argument("-c", "--config", default="demo", help="YAML config file or preset name (default: demo)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, dotted (e.g. --set download.processes=8); repeatable")
    if urls:
        p.add_argument("--urls", help="URL list (parquet/csv/tsv/jsonl); same as --set input.urls=PATH")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="curate", description="Curate LAION-style image-text data.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, helptext in (
        ("run", cmd_run, "download, score, select and write: the whole curation job"),
        ("download", cmd_download, "download the URL list with img2dataset (resumable)"),
        ("retry-failed", cmd_retry_failed, "re-download only the rows that failed in finished shards"),
        ("score", cmd_score, "add score columns for every downloaded sample (resumable)"),
        ("select", cmd_select, "apply the config's rules; record why each sample went"),
        ("write", cmd_write, "write the selected samples into new webdataset shards (resumable)"),
    ):
        sp = sub.add_parser(name, help=helptext)
        _common(sp)
        sp.set_defaults(fn=fn)
    _more_parsers(sub)
    return p


def _more_parsers(sub) -> None:
    """The commands besides the curation stages."""
    sp = sub.add_parser("weights", help="download the real model weights into the cache (needs internet); "
                        "builds the LAION NSFW detector files from its zips (no TensorFlow)")
    _common(sp, urls=False)
    sp.add_argument("--all", action="store_true", help="every model of MODELS.md, not just the config's")
    sp.set_defaults(fn=cmd_weights)
    sp = sub.add_parser("eval", help="sample a text-to-image model over prompt suites, measure, report")
    _common(sp, urls=False)
    sp.add_argument("--model", help="diffusers hub id or folder (same as --set eval.model=...); default tiny")
    sp.add_argument("--images", help="measure images made elsewhere in this folder instead of sampling")
    sp.add_argument("--prompts", help="with --images: jsonl/csv mapping each image file to its prompt and category")
    sp.set_defaults(fn=cmd_eval)
    sp = sub.add_parser("report", help="rebuild a run's curation report (report/index.html) or an eval's "
                        "report.html / report.md from the saved files alone")
    sp.add_argument("eval_dir", nargs="?", metavar="FOLDER",
                    help="runs/<name> (curation report) or runs/<name>/eval/<tag> (eval report); "
                    "default: the config's run and its eval, if any")
    _common(sp, urls=False)
    sp.add_argument("--run", help="run folder (default: from the config)")
    sp.set_defaults(fn=cmd_report)
    sp = sub.add_parser("compare", help="compare evaluated models; refuses FID/KID computed differently")
    sp.add_argument("evals", nargs="+", help="eval folders (runs/<name>/eval/<tag>) or metrics.json files")
    sp.set_defaults(fn=cmd_compare)
    sp = sub.add_parser("verify", help="check every shard against its parquet and the manifest; exit 1 on problems")
    sp.add_argument("run_dir", nargs="?", help="run folder (same as --run; default: from the config)")
    _common(sp, urls=False)
    sp.add_argument("--run", help="run folder (default: from the config)")
    sp.set_defaults(fn=cmd_verify)
    sp = sub.add_parser("coverage", help="how much of a run covers each eval concept (caption words, CLIP "
                        "retrieval), before and after selection, and which rule removed it")
    sp.add_argument("run_dir", nargs="?", metavar="RUN", help="run folder or run name (default: from the config)")
    _common(sp, urls=False)
    sp.add_argument("--run", help="run folder (same as RUN)")
    sp.add_argument("--concepts", help="jsonl/csv: concept, terms ('|'-separated) and/or prompt "
                    "(default: every category and prompt of the eval suites)")
    sp.add_argument("--clip-threshold", type=float, default=0.25,
                    help="cosine (image, prompt) at which an image covers a concept (default 0.25, for ViT-L/14)")
    sp.add_argument("--chunk-rows", type=int, default=65536, help="embeddings read at a time (bounds memory)")
    sp.set_defaults(fn=cmd_coverage)
    sp = sub.add_parser("funnel", help="count written / dropped / failed samples of a run")
    _common(sp, urls=False)
    sp.add_argument("--run", help="run folder (default: from the config)")
    sp.set_defaults(fn=cmd_funnel)
    sp = sub.add_parser("query", help="run SQL over the run's catalog (views: input, downloads, scores, "
                        "samples, decisions, funnel, shards, coverage, coverage_rules); reads only",
                        description="Run one SELECT over the run's views (built in memory; the run folder is "
                        "never written). It can read files under the run folder only: no other file, no "
                        "network, no COPY, ATTACH, INSTALL or SET.")
    sp.add_argument("sql")
    _common(sp, urls=False)
    sp.add_argument("--run", help="run folder (default: from the config)")
    sp.add_argument("--allow-writes", action="store_true",
                    help="give the SQL DuckDB's full power: any statement (COPY ... TO, ATTACH, INSTALL, SET, "
                    "several statements), any file or URL this user can reach")
    sp.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table")
    sp.add_argument("--output", "-o", help="write to this file instead of stdout")
    sp.set_defaults(fn=cmd_query)


def setup_logging(verbose: bool) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.INFO
    # third-party INFO chatter (open_clip logs through the root logger) stays quiet unless -v
    logging.basicConfig(
        level=level if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)],
    )
    for ours in ("curate", "t2i_curate"):
        logging.getLogger(ours).setLevel(level)


# commands that write the run folder hold its lock for their whole duration; readers take none
WRITERS = frozenset({"run", "download", "retry-failed", "score", "select", "write", "eval"})
# ... and these write into a run folder they are given (report/, the catalog): its lock, then its
# report folder's leftovers from a killed run removed
REPORT_WRITERS = frozenset({"report", "coverage"})


@contextlib.contextmanager
def _lock(args):
    """The run folder's lock for a writing command, taken before any download or demo server."""
    from t2i_curate.pipeline.core.lock import run_lock

    if args.command in WRITERS:
        with run_lock(_config(args).run_dir, f"curate {args.command}"):
            yield
        return
    run = _reported_run(args) if args.command in REPORT_WRITERS else None
    if run is None:
        yield
        return
    from t2i_curate.pipeline.core.io import clean_tmp
    from t2i_curate.pipeline.core.layout import RunLayout

    with run_lock(run, f"curate {args.command}"):
        n = clean_tmp(RunLayout(run).report)
        if n:
            log.info("removed %d temporary file(s) left in %s by an interrupted command", n, RunLayout(run).report)
        yield


def _reported_run(args):
    """The run folder ``report`` or ``coverage`` writes into, or None (an eval folder outside a run,
    or no such folder: the command itself says so)."""
    from t2i_curate.pipeline.core.io import as_path
    from t2i_curate.pipeline.core.layout import RunLayout

    if args.command == "coverage":
        from t2i_curate.pipeline.report.coverage import resolve_run

        given = args.run_dir or args.run
        run = resolve_run(given, _config(args).runs_dir) if given else _config(args).run_dir
    elif args.eval_dir:
        run = as_path(args.eval_dir)
        if (run / "metrics.json").exists():  # an eval folder: runs/<name>/eval/<tag> locks its run
            run = run.parent.parent if run.parent.name == "eval" else None
    else:
        run = _run_dir(args)
    return run if run is not None and RunLayout(run).config.exists() else None


def _disk_of(args) -> str:
    """The folder a command writes, for a full-disk message (the run folder; else the working folder)."""
    try:
        run = _run_dir(args)
        return str(run if run.exists() else run.parent)
    except Exception:  # the message must not fail: name the working folder instead
        return os.getcwd()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        with _lock(args):
            args.fn(args)
    except Exception as e:  # noqa: BLE001 (a full disk anywhere: ours, DuckDB's, a shard worker's)
        if is_disk_full(e):
            filename = getattr(e, "filename", None)
            e = disk_full(Path(filename).parent if isinstance(filename, str) else _disk_of(args))
        elif not isinstance(e, UserError):
            raise  # a bug: its traceback
        log.error("%s", e)  # input, config, stage order, incomplete work, full disk: one message
        return e.exit_code
    except KeyboardInterrupt:
        log.error("interrupted; finished shards are kept, rerun the same command to resume")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
