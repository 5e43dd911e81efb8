"""The ``curate`` command line: one subcommand per stage, and ``run`` for all of them."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("curate")


def _user_errors() -> tuple[type[BaseException], ...]:
    from filters.rules import RuleError
    from pipeline.config import ConfigError
    from pipeline.download import InputError
    from pipeline.executors import ShardFailure
    from pipeline.funnel import AccountingError
    from pipeline.models import WeightsMismatchError, WeightsMissingError
    from pipeline.runfolder import RunFolderError
    from pipeline.selection import StageOrderError
    from pipeline.verify import VerifyError

    return (ConfigError, InputError, RunFolderError, RuleError, StageOrderError, AccountingError, ShardFailure,
            WeightsMissingError, WeightsMismatchError, VerifyError)


def _config(args):
    from pipeline.config import load_config

    overrides = list(args.set or [])
    if getattr(args, "urls", None):
        overrides.append(f"input.urls={args.urls}")
    return load_config(args.config, overrides)


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
    from pipeline.download import download_stage, read_url_list
    from pipeline.runfolder import prepare_run, url_source

    cfg = _config(args)
    with url_source(cfg) as urls:
        table = read_url_list(urls, cfg.input)  # bad input is refused before the run folder is touched
        return download_stage(cfg, prepare_run(cfg), urls, table)


def cmd_retry_failed(args) -> dict:
    from pipeline.download import retry_failed
    from pipeline.runfolder import prepare_run, url_source

    cfg = _config(args)
    run = prepare_run(cfg)
    with url_source(cfg) as urls:
        from pipeline.download import prepare_input

        prepare_input(run, urls, cfg.input)  # fresh URLs (the demo server's port changes)
        return retry_failed(cfg, run)


def cmd_score(args) -> dict:
    from pipeline.download import finished_shards
    from pipeline.runfolder import prepare_run
    from pipeline.score import score_stage

    cfg = _config(args)
    run = prepare_run(cfg)
    return score_stage(cfg, run, finished_shards(run / "download"))


def cmd_select(args) -> dict:
    from pipeline.runfolder import prepare_run
    from pipeline.selection import select_stage

    cfg = _config(args)
    return select_stage(cfg, prepare_run(cfg))


def cmd_write(args) -> dict:
    from pipeline.runfolder import prepare_run
    from pipeline.write import write_stage

    cfg = _config(args)
    run = prepare_run(cfg)
    return write_stage(cfg, run, _model_manifest(run))


def _model_manifest(run: Path) -> dict:
    from pipeline.score import read_provenance

    prov = read_provenance(run)
    return {"models": prov, "tiny_models": any(v.get("tiny") == "true" for v in prov.values())}


def cmd_funnel(args) -> dict:
    from pipeline.funnel import funnel

    run = _run_dir(args)
    f = funnel(run)
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
    from pipeline.catalog import refresh_catalog
    from pipeline.download import download_stage, finished_shards, read_url_list
    from pipeline.funnel import funnel
    from pipeline.runfolder import prepare_run, url_source
    from pipeline.score import score_stage
    from pipeline.selection import select_stage
    from pipeline.write import write_stage

    cfg = _config(args)
    times = {}
    t = time.perf_counter()
    with url_source(cfg) as urls:
        table = read_url_list(urls, cfg.input)
        run = prepare_run(cfg)
        d = download_stage(cfg, run, urls, table)
    times["download"] = time.perf_counter() - t
    t = time.perf_counter()
    s = score_stage(cfg, run, finished_shards(run / "download"))
    times["score"] = time.perf_counter() - t
    t = time.perf_counter()
    sel = select_stage(cfg, run)
    times["select"] = time.perf_counter() - t
    t = time.perf_counter()
    w = write_stage(cfg, run, _model_manifest(run))
    times["write"] = time.perf_counter() - t
    refresh_catalog(run)
    f = funnel(run)
    _print_funnel(f)
    from pipeline.verify import check_run

    check_run(run)
    log.info("verify: %s is consistent (shards, parquet, manifest, accounting)", run)
    _summary(f"run {run}", [
        ("downloaded ok / failed", f"{d['success']} / {d['failed']}"),
        ("scored / failed / skipped shards", f"{s['scored']} / {s['failed']} / {s['skipped']}"),
        ("selected / dropped / failed", f"{sel['selected']} / {sel['dropped']} / {sel['failed']}"),
        ("shards written (skipped)", f"{w['shards']} ({w['skipped']})"),
        *[(f"{k} seconds", f"{v:.1f}") for k, v in times.items()],
    ])
    return {"written": f["written"]}


def cmd_weights(args) -> dict:
    """Fetch every real weight the config needs (or all of MODELS.md with --all)."""
    from pipeline.models import WEIGHT_FILES, fetch_all, needed_weights

    cfg = _config(args)
    scfg = cfg.score.model_copy(deep=True)
    scfg.models.preset = "real"
    if args.all:
        clips = sorted({scfg.models.aesthetic_clip, scfg.models.similarity_clip, "ViT-L-14/openai", "ViT-B-32/openai"})
        heads = list(WEIGHT_FILES.values())
    else:
        clips, heads = needed_weights(scfg)
    paths = fetch_all(scfg.models, clips, heads)
    _summary("weights", list(paths.items()))
    return paths


def cmd_verify(args) -> dict:
    from pipeline.verify import check_run

    run = Path(args.run_dir) if args.run_dir else _config(args).run_dir
    check_run(run)
    log.info("verify: %s is consistent (shards, parquet, manifest, accounting)", run)
    return {}


def _run_dir(args) -> Path:
    if getattr(args, "run", None):
        run = Path(args.run)
        if not run.is_dir():
            from pipeline.runfolder import RunFolderError

            raise RunFolderError(f"--run {run}: no such run folder")
        return run
    return _config(args).run_dir


def cmd_query(args) -> dict:
    from pipeline.catalog import arrow, open_run, refresh_catalog

    run = _run_dir(args)
    refresh_catalog(run)
    con = open_run(run)
    import duckdb

    try:
        table = arrow(con, args.sql)
    except duckdb.Error as e:
        views = [r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()]
        from pipeline.config import ConfigError

        raise ConfigError(f"query failed: {e}\nviews in this run: {', '.join(sorted(views))}") from None
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
        from pipeline.config import ConfigError

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
    sp = sub.add_parser("weights", help="download the real model weights into the cache (needs internet)")
    _common(sp, urls=False)
    sp.add_argument("--all", action="store_true", help="every model of MODELS.md, not just the config's")
    sp.set_defaults(fn=cmd_weights)
    sp = sub.add_parser("verify", help="check every shard against its parquet and the manifest; exit 1 on problems")
    sp.add_argument("run_dir", nargs="?", help="run folder (default: from the config)")
    _common(sp, urls=False)
    sp.set_defaults(fn=cmd_verify)
    sp = sub.add_parser("funnel", help="count written / dropped / failed samples of a run")
    _common(sp, urls=False)
    sp.add_argument("--run", help="run folder (default: from the config)")
    sp.set_defaults(fn=cmd_funnel)
    sp = sub.add_parser("query", help="run SQL over the run's catalog (views: input, downloads, scores, "
                        "samples, decisions, funnel, shards)")
    sp.add_argument("sql")
    _common(sp, urls=False)
    sp.add_argument("--run", help="run folder (default: from the config)")
    sp.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table")
    sp.add_argument("--output", "-o", help="write to this file instead of stdout")
    sp.set_defaults(fn=cmd_query)
    return p


def setup_logging(verbose: bool) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)],
    )
    for noisy in ("urllib3", "PIL", "filelock", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        args.fn(args)
    except _user_errors() as e:
        log.error("%s", e)
        return 1 if type(e).__name__ in ("ShardFailure", "VerifyError") else 2
    except KeyboardInterrupt:
        log.error("interrupted; finished shards are kept, rerun the same command to resume")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
