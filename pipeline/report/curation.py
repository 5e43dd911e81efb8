"""The curation report: ``runs/<name>/report/index.html``, one self-contained page built from the run's files.

Sections: the funnel as an SVG chart (input -> failed by reason -> dropped by rule, in rule order ->
written), a histogram per numeric score column with the simple rule thresholds drawn and the share on
each side, thumbnail grids per score bucket, examples dropped by each rule, duplicate groups side by
side, failures by reason and by domain, provenance, and (when ``pipeline/coverage.py`` exists) concept
coverage.

Bounded for any run size: every aggregate runs in DuckDB (histograms, top-k samples by
``hash(key)`` with ``min_by(..., k)``), Python only sees bounded lists, thumbnails are cached under
``report/thumbs/`` (:mod:`.thumbs`) and embedded under a byte budget so the page stays below
``max_bytes``. Readers take no lock; the page is written atomically.
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from t2i_curate.pipeline.core.catalog import open_run
from t2i_curate.pipeline.core.errors import UserError
from t2i_curate.pipeline.core.io import as_path, atomic_path
from t2i_curate.pipeline.core.layout import RunLayout
from t2i_curate.pipeline.report.thumbs import THUMB_PX, Embedder, ensure_thumbs

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 20_000_000
PER_BUCKET = 6
HIST_BINS = 30
DEDUP_RULES = ("duplicate", "near_duplicate_phash", "semantic_duplicate")  # filters/dedup.py, semdedup.py
NOT_SCORES = frozenset({"key", "embedding_row", "input_row"})
NUMERIC = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
           "UBIGINT", "FLOAT", "DOUBLE", "REAL")
# fixed bucket edges for the LAION-named columns; any other column (or one whose fixed bins hold
# nearly everything in one bin, as with tiny random models) gets quartile bins of this run
FIXED_EDGES = {
    "aesthetic_score": [3.0, 4.0, 5.0, 6.0],
    "pwatermark": [0.1, 0.5, 0.8],
    "punsafe": [0.1, 0.5, 0.9],
    "pnudity": [0.1, 0.5, 0.9],
    "text_area": [0.001, 0.05, 0.1, 0.3],
    "similarity": [0.2, 0.25, 0.3],
}
_THRESHOLD = re.compile(r"^\s*\"?([A-Za-z_][A-Za-z0-9_]*)\"?\s*(>=|<=|>|<)\s*(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)\s*$")


class ReportError(UserError):
    """The run has nothing to report yet."""


@dataclass
class Threshold:
    rule: str
    column: str
    op: str
    value: float


@dataclass
class Ctx:
    """What every section reads: the run, its catalog connection, funnel, rules and score columns."""

    run_dir: Path
    con: Any
    funnel: dict
    rules: list[dict]
    columns: list[str]
    views: set[str]
    per_bucket: int = PER_BUCKET
    picked: dict[str, dict] = field(default_factory=dict)  # key -> caption, state, rule (filled once)


def parse_threshold(rule: dict) -> Threshold | None:
    """``col >= x`` / ``col <= x`` / ``col > x`` / ``col < x`` keep predicates; None for anything else."""
    m = _THRESHOLD.match(rule.get("keep") or "")
    return Threshold(rule["name"], m.group(1), m.group(2), float(m.group(3))) if m else None


def _esc(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _num(v: float | None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if float(v).is_integer() and abs(v) < 1e9:
        return str(int(v))
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.1f}%" if total else "n/a"


def _qi(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# --- loading -------------------------------------------------------------------------------------


def load_rules(run_dir: Path) -> list[dict]:
    """The run's selection rules (name, keep, description) from ``config.yaml``, else the manifest."""
    import yaml

    lay = RunLayout(run_dir)
    if lay.config.exists():
        cfg = yaml.safe_load(lay.config.read_text()) or {}
        rules = ((cfg.get("select") or {}).get("rules")) or []
        if rules:
            return [dict(r) for r in rules]
    if lay.manifest.exists():
        return list(json.loads(lay.manifest.read_text()).get("rules", []))
    return []


def load_funnel(run_dir: Path) -> dict:
    """``report/funnel.json`` when it is newer than the decisions, else counted again (pipeline/funnel.py)."""
    lay = RunLayout(run_dir)
    path = lay.report / "funnel.json"
    if not lay.decisions.exists():
        raise ReportError(f"{run_dir} has no selected/decisions.parquet: run `curate run` (or select) first")
    if path.exists() and path.stat().st_mtime_ns >= lay.decisions.stat().st_mtime_ns:
        return json.loads(path.read_text())
    from t2i_curate.pipeline.report.funnel import funnel

    return funnel(run_dir)


def rule_order(f: dict, rules: list[dict]) -> list[str]:
    """Dropping rules in the order selection applies them: blocklists, config rules, then dedup."""
    names = list(f.get("dropped_by_rule", {}))
    config = [r["name"] for r in rules]
    rank = {n: i for i, n in enumerate([*sorted(n for n in names if n.startswith("blocklist:")), *config,
                                       *DEDUP_RULES])}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def score_columns(con, views: set[str]) -> list[str]:
    """Numeric columns of the ``scores`` view (bookkeeping columns left out), in the view's order."""
    if "scores" not in views:
        return []
    rows = con.execute("DESCRIBE scores").fetchall()
    return [r[0] for r in rows if r[0] not in NOT_SCORES and str(r[1]).upper() in NUMERIC]


# --- funnel -------------------------------------------------------------------------------------


def funnel_rows(f: dict, order: list[str]) -> list[tuple[str, str, int]]:
    """(state, reason, samples): input, each failure class, each dropping rule in rule order, written."""
    rows = [("input", "", f["input"])]
    rows += [("failed", f"{r['stage']}: {r['error']}", r["samples"]) for r in f.get("failed_by_reason", [])]
    rows += [("dropped", rule, f["dropped_by_rule"][rule]) for rule in order]
    rows.append(("written", "", f["written"]))
    return rows


COLORS = {"input": "#777", "failed": "#c0392b", "dropped": "#e67e22", "written": "#27ae60"}


def funnel_svg(rows: list[tuple[str, str, int]], width: int = 1000) -> str:
    h, pad, right = 24, 330, 150
    total = max(rows[0][2], 1)
    out = []
    for i, (state, reason, n) in enumerate(rows):
        y = i * h + 4
        label = state if not reason else f"{state}: {reason}"
        short = label if len(label) <= 48 else label[:47] + "…"
        w = (width - pad - right) * n / total
        out.append(f'<g><title>{_esc(label)}: {n}</title>'
                   f'<text x="0" y="{y + 15}" font-size="12">{_esc(short)}</text>'
                   f'<rect class="funnel-bar" data-state="{state}" data-reason="{_esc(reason)}" data-samples="{n}" '
                   f'x="{pad}" y="{y}" width="{max(w, 0.5):.1f}" height="{h - 6}" fill="{COLORS[state]}"/>'
                   f'<text x="{width - 5}" y="{y + 15}" font-size="12" text-anchor="end">'
                   f'{n} ({_pct(n, total)})</text></g>')
    height = len(rows) * h + 8
    return (f'<svg class="funnel" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
            f'xmlns="http://www.w3.org/2000/svg">{"".join(out)}</svg>')


def funnel_section(ctx: Ctx) -> str:
    rows = funnel_rows(ctx.funnel, rule_order(ctx.funnel, ctx.rules))
    f = ctx.funnel
    check = (f"written {f['written']} + dropped {f['dropped']} + failed {f['failed']} = "
             f"{f['written'] + f['dropped'] + f['failed']} (input {f['input']})")
    return (f"<section id='funnel'><h2>Funnel</h2><p>Every input row ends in one state. Failures are grouped "
            f"by error class; rules are listed in the order selection applies them (a row is dropped by the "
            f"first rule it fails). {_esc(check)}.</p>{funnel_svg(rows)}</section>")


# --- histograms ---------------------------------------------------------------------------------


def _range(con, col: str, extra: list[float]) -> tuple[float, float, int, bool] | None:
    """(low, high, values, clipped): the histogram's range, clipped to the 1st-99th percentile when
    outliers would squeeze everything into one bin; thresholds are always inside it."""
    v = f"{_qi(col)}::DOUBLE"
    lo, hi, q01, q99, n = con.execute(
        f"SELECT min({v}), max({v}), approx_quantile({v}, 0.01), approx_quantile({v}, 0.99), count({v}) "
        f"FROM scores WHERE isfinite({v})").fetchall()[0]
    if not n:
        return None
    clipped = q99 > q01 and (hi - lo) > 10 * (q99 - q01)
    if clipped:
        lo, hi = q01, q99
    lo, hi = min([lo, *extra]), max([hi, *extra])
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi, n, clipped


def histogram(con, col: str, thresholds: list[float], bins: int = HIST_BINS) -> dict | None:
    """Bin counts of ``col`` over the scored rows, computed in DuckDB; values outside the range
    fall in the end bins."""
    r = _range(con, col, thresholds)
    if r is None:
        return None
    lo, hi, n, clipped = r
    w = (hi - lo) / bins
    v = f"{_qi(col)}::DOUBLE"
    rows = con.execute(
        f"SELECT least(greatest(floor(({v} - ?) / ?)::BIGINT, 0), {bins - 1}) AS b, count(*) "
        f"FROM scores WHERE isfinite({v}) GROUP BY b", [lo, w]).fetchall()
    counts = [0] * bins
    for b, c in rows:
        counts[int(b)] = c
    nulls = con.execute(f"SELECT count(*) - count({v}) FROM scores").fetchall()[0][0]
    return {"lo": lo, "hi": hi, "counts": counts, "n": n, "nulls": nulls, "clipped": clipped}


def threshold_share(con, t: Threshold) -> tuple[int, int]:
    """(rows the predicate keeps, rows with a value) over every scored row, whatever other rules did."""
    v = f"{_qi(t.column)}::DOUBLE"
    kept, n = con.execute(f"SELECT count(*) FILTER (WHERE {v} {t.op} ?), count({v}) FROM scores "
                          f"WHERE {v} IS NOT NULL", [t.value]).fetchall()[0]
    return kept, n


def hist_svg(col: str, h: dict, marks: list[tuple[Threshold, int, int]], width: int = 480) -> str:
    height, top, bottom = 170, 30, 22
    plot = height - top - bottom
    peak = max(h["counts"]) or 1
    bw = width / len(h["counts"])
    x_of = lambda x: (x - h["lo"]) / (h["hi"] - h["lo"]) * width  # noqa: E731
    out = [f'<rect class="hist-bar" x="{i * bw:.1f}" y="{top + plot - plot * c / peak:.1f}" '
           f'width="{max(bw - 1, 0.5):.1f}" height="{plot * c / peak:.1f}" fill="#4a7fb5"><title>{c}</title></rect>'
           for i, c in enumerate(h["counts"])]
    for j, (t, kept, n) in enumerate(marks):
        x = min(max(x_of(t.value), 1), width - 1)
        side = "right" if t.op.startswith(">") else "left"
        text = f"{t.rule}: keeps {_pct(kept, n)} ({side}), drops {_pct(n - kept, n)}"
        anchor = "start" if x < width / 2 else "end"
        out.append(f'<line class="threshold" data-rule="{_esc(t.rule)}" x1="{x:.1f}" x2="{x:.1f}" y1="{top - 4}" '
                   f'y2="{top + plot}" stroke="#c0392b" stroke-width="2" stroke-dasharray="4 2"/>'
                   f'<text x="{x + (4 if anchor == "start" else -4):.1f}" y="{10 + 11 * j}" font-size="10" '
                   f'text-anchor="{anchor}" fill="#c0392b">{_esc(text)}</text>')
    out.append(f'<text x="0" y="{height - 6}" font-size="10">{_num(h["lo"])}</text>'
               f'<text x="{width}" y="{height - 6}" font-size="10" text-anchor="end">{_num(h["hi"])}</text>')
    return (f'<svg class="hist" data-column="{_esc(col)}" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" xmlns="http://www.w3.org/2000/svg">{"".join(out)}</svg>')


def histogram_section(ctx: Ctx) -> str:
    thresholds = [t for t in map(parse_threshold, ctx.rules) if t is not None]
    figs = []
    for col in ctx.columns:
        mine = [t for t in thresholds if t.column == col]
        h = histogram(ctx.con, col, [t.value for t in mine])
        if h is None:
            figs.append(f"<figure class='histfig' data-column='{_esc(col)}'><figcaption><b>{_esc(col)}</b>: "
                        f"no values</figcaption></figure>")
            continue
        marks = [(t, *threshold_share(ctx.con, t)) for t in mine]
        note = f"{h['n']} values" + (f", {h['nulls']} missing" if h["nulls"] else "") + (
            "; range clipped to the 1st-99th percentile, the end bins hold the rest" if h["clipped"] else "")
        figs.append(f"<figure class='histfig' data-column='{_esc(col)}'>{hist_svg(col, h, marks)}"
                    f"<figcaption><b>{_esc(col)}</b>: {_esc(note)}</figcaption></figure>")
    drawn = {t.rule for t in thresholds}
    listed = [r for r in ctx.rules if r["name"] not in drawn]
    rows = "".join(f"<tr><td>{_esc(r['name'])}</td><td><code>{_esc(r.get('keep'))}</code></td>"
                   f"<td>{_esc(r.get('description'))}</td></tr>" for r in listed)
    other = (f"<p>Rules that are not a simple threshold on one column (listed, not drawn):</p><table><tr>"
             f"<th>rule</th><th>keep</th><th>description</th></tr>{rows}</table>") if listed else ""
    return ("<section id='histograms'><h2>Score distributions</h2><p>Every scored row, whatever its final "
            "state. Dashed red lines: thresholds of <code>column &gt;= x</code> / <code>&lt;= x</code> rules, "
            "with the share of rows each side (each rule alone; the funnel shows what each rule dropped in "
            f"order).</p><div class='hists'>{''.join(figs)}</div>{other}</section>")


# --- picking samples (bounded: top-k by hash(key) per group, in DuckDB) -------------------------


def bucket_edges(con, col: str) -> tuple[str, list[float]]:
    """("fixed", edges) for the LAION-named columns when they spread the rows, else ("quartile", edges)."""
    v = f"{_qi(col)}::DOUBLE"
    fixed = FIXED_EDGES.get(col)
    if fixed:
        cases = " ".join(f"WHEN {v} < {e!r} THEN {i}" for i, e in enumerate(fixed))
        counts = [c for _, c in con.execute(f"SELECT CASE {cases} ELSE {len(fixed)} END AS b, count(*) "
                                            f"FROM scores WHERE isfinite({v}) GROUP BY b").fetchall()]
        if counts and max(counts) <= 0.9 * sum(counts):
            return "fixed", fixed
    qs = con.execute(f"SELECT approx_quantile({v}, [0.25, 0.5, 0.75]) FROM scores WHERE isfinite({v})").fetchall()
    edges = sorted({float(q) for q in (qs[0][0] or []) if q is not None})
    return "quartile", edges


def bucket_label(edges: list[float], i: int) -> str:
    if not edges:
        return "all"
    if i == 0:
        return f"< {_num(edges[0])}"
    if i == len(edges):
        return f"≥ {_num(edges[-1])}"
    return f"{_num(edges[i - 1])} – {_num(edges[i])}"


def bucket_picks(con, col: str, edges: list[float], k: int) -> list[tuple[str, int, list[tuple[str, float]]]]:
    """(label, rows in the bucket, up to k (key, value) picked by hash(key)) per bucket, low to high."""
    v = f"{_qi(col)}::DOUBLE"
    cases = " ".join(f"WHEN {v} < {e!r} THEN {i}" for i, e in enumerate(edges))
    b = f"CASE {cases} ELSE {len(edges)} END" if edges else "0"
    salt = "'" + col.replace("'", "''") + "'"  # another pseudo-random sample per column
    rows = con.execute(f"SELECT {b} AS b, count(*), min_by(struct_pack(k := key, v := {v}), hash(key || {salt}), "
                       f"{int(k)}) FROM scores WHERE isfinite({v}) GROUP BY b ORDER BY b").fetchall()
    return [(bucket_label(edges, int(i)), n, [(s["k"], s["v"]) for s in picks]) for i, n, picks in rows]


def dropped_picks(con, k: int) -> dict[str, list[str]]:
    rows = con.execute(f"SELECT rule, min_by(key, hash(key), {int(k)}) FROM decisions "
                       f"WHERE state = 'dropped' GROUP BY rule").fetchall()
    return {r: keys for r, keys in rows}


def duplicate_picks(con, groups: int, per_group: int = 4) -> list[tuple[str, str, list[str]]]:
    """(rule, kept key, dropped copies) for a few duplicate groups per dedup rule: the groups are
    picked by hash first (bounded), then their members read."""
    rules = ", ".join(f"'{r}'" for r in DEDUP_RULES)
    # the rows with the smallest hash(duplicate_of), bounded (a large group may fill them: fewer groups then)
    heads = con.execute(f"SELECT rule, list_sort(list_distinct(min_by(duplicate_of, hash(duplicate_of), 64))) "
                        f"FROM decisions WHERE rule IN ({rules}) AND duplicate_of IS NOT NULL "
                        f"GROUP BY rule ORDER BY rule").fetchall()
    wanted = [(r, h) for r, hs in heads for h in hs[:groups]]
    if not wanted:
        return []
    rows = con.execute(f"SELECT rule, duplicate_of, min_by(key, hash(key), {per_group - 1}) FROM decisions "
                       f"WHERE rule IN ({rules}) AND duplicate_of IN (SELECT unnest(?)) GROUP BY ALL",
                       [[h for _, h in wanted]]).fetchall()
    members = {(r, h): ks for r, h, ks in rows}
    return [(r, h, members.get((r, h), [])) for r, h in wanted]


def describe_keys(ctx: Ctx, keys: set[str]) -> dict[str, dict]:
    """caption, state and rule of a bounded set of keys (scans, no full load)."""
    if not keys:
        return {}
    con, ks = ctx.con, sorted(keys)
    out = {k: {"caption": None, "state": None, "rule": None} for k in ks}
    for key, state, rule in con.execute("SELECT key, state, rule FROM decisions WHERE key IN (SELECT unnest(?))",
                                        [ks]).fetchall():
        out[key].update(state=state, rule=rule)
    if "downloads" in ctx.views and "caption" in _cols(con, "downloads"):
        for key, cap in con.execute("SELECT key, caption FROM downloads WHERE key IN (SELECT unnest(?))",
                                    [ks]).fetchall():
            out[key]["caption"] = cap
    if "refused" in ctx.views and "caption" in _cols(con, "refused"):
        from t2i_curate.filters.rules import REFUSED_KEY

        for key, cap in con.execute(f"SELECT {REFUSED_KEY} AS k, caption FROM refused WHERE k IN "
                                    f"(SELECT unnest(?))", [ks]).fetchall():
            out[key]["caption"] = cap
    return out


def _cols(con, view: str) -> set[str]:
    return {r[0] for r in con.execute(f"DESCRIBE {view}").fetchall()}


# --- rendering the picture sections ----------------------------------------------------------------


def figure(ctx: Ctx, emb: Embedder, key: str, note: str = "") -> str:
    d = ctx.picked.get(key, {})
    uri = emb.uri(key)
    img = (f"<img src='{uri}' alt='{_esc(key)}'/>" if uri else
           "<div class='noimg'>no image</div>")
    state = d.get("state") or ""
    if d.get("rule"):
        state += f" ({d['rule']})"
    cap = (d.get("caption") or "")[:90]
    return (f"<figure class='thumb' data-key='{_esc(key)}'>{img}<figcaption><b>{_esc(note)}</b> "
            f"<code>{_esc(key)}</code> {_esc(state)}<br>{_esc(cap)}</figcaption></figure>")


def buckets_section(ctx: Ctx, emb: Embedder, picks: dict[str, tuple[str, list]]) -> str:
    parts = ["<section id='buckets'><h2>Samples per score bucket</h2><p>Up to "
             f"{ctx.per_bucket} scored rows per bucket, picked by <code>hash(key)</code> (a fixed pseudo-random "
             "sample). Fixed bins for the LAION-named scores; quartile bins of this run for other columns, "
             "and for a named score whose fixed bins hold 90% of the rows in one bin.</p>"]
    for col, (kind, buckets) in picks.items():
        parts.append(f"<h3 data-column='{_esc(col)}'>{_esc(col)} <small>({kind} bins)</small></h3>")
        for label, n, items in buckets:
            figs = "".join(figure(ctx, emb, k, _num(v)) for k, v in items)
            parts.append(f"<div class='bucket'><h4>{_esc(col)} {_esc(label)}: {n} rows</h4>"
                         f"<div class='grid'>{figs}</div></div>")
    return "".join(parts) + "</section>"


def dropped_section(ctx: Ctx, emb: Embedder, picks: dict[str, list[str]], order: list[str]) -> str:
    parts = ["<section id='dropped'><h2>Examples dropped by each rule</h2>"]
    for rule in order:
        if rule in DEDUP_RULES or rule not in picks:
            continue
        n = ctx.funnel["dropped_by_rule"].get(rule, 0)
        figs = "".join(figure(ctx, emb, k) for k in picks[rule])
        parts.append(f"<h3>{_esc(rule)}: {n} dropped</h3><div class='grid'>{figs}</div>")
    return "".join(parts) + "</section>"


def duplicates_section(ctx: Ctx, emb: Embedder, groups: list[tuple[str, str, list[str]]]) -> str:
    if not groups:
        return ("<section id='duplicates'><h2>Duplicate groups</h2><p>No sample was dropped as a duplicate "
                "in this run.</p></section>")
    parts = ["<section id='duplicates'><h2>Duplicate groups</h2><p>The kept copy first, then dropped copies "
             "(<code>decisions.duplicate_of</code>); a few groups per dedup rule.</p>"]
    for rule, kept, copies in groups:
        figs = figure(ctx, emb, kept, "kept") + "".join(figure(ctx, emb, k, "dropped") for k in copies)
        parts.append(f"<div class='dupgroup' data-rule='{_esc(rule)}'><h4>{_esc(rule)}</h4>"
                     f"<div class='grid'>{figs}</div></div>")
    return "".join(parts) + "</section>"


# --- tables ---------------------------------------------------------------------------------------


def _table(head: list[str], rows: list[list[Any]], cls: str = "") -> str:
    return (f"<table class='{cls}'><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


DOMAIN = r"lower(regexp_extract(url, '^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/]*@)?([^/:?#]+)', 1))"


def failures_by_domain(ctx: Ctx, limit: int = 20) -> list[list[Any]]:
    """Per domain (the most failures first): rows, failed, failed at download, failed at scoring."""
    con, src = ctx.con, []
    if "downloads" in ctx.views:
        src.append("SELECT key, url FROM downloads")
    if "refused" in ctx.views:
        from t2i_curate.filters.rules import REFUSED_KEY

        src.append(f"SELECT {REFUSED_KEY} AS key, url FROM refused")
    if not src:
        return []
    urls = " UNION ALL ".join(src)
    rows = con.execute(
        f"SELECT coalesce(nullif({DOMAIN}, ''), '(no host)') AS domain, count(*) AS n, "
        f"count(*) FILTER (WHERE state = 'failed') AS failed, "
        f"count(*) FILTER (WHERE failed_stage = 'download') AS dl, count(*) FILTER (WHERE failed_stage = 'score') "
        f"FROM decisions LEFT JOIN ({urls}) u USING (key) GROUP BY domain HAVING failed > 0 "
        f"ORDER BY failed DESC, n DESC, domain LIMIT {int(limit)}").fetchall()
    return [[d, n, f, _pct(f, n), dl, sc] for d, n, f, dl, sc in rows]


def failures_section(ctx: Ctx) -> str:
    f = ctx.funnel
    reasons = [[r["stage"], r["error"], r["samples"], _pct(r["samples"], f["input"]), r.get("example", "")]
               for r in f.get("failed_by_reason", [])]
    domains = failures_by_domain(ctx)
    return ("<section id='failures'><h2>Failures</h2><h3>By reason (error class)</h3>"
            + (_table(["stage", "error class", "samples", "share of input", "example"], reasons, "failures")
               if reasons else "<p>No failures.</p>")
            + "<h3>By domain (20 with the most failures)</h3>"
            + (_table(["domain", "rows", "failed", "failed share", "at download", "at scoring"], domains, "domains")
               if domains else "<p>No failures.</p>") + "</section>")


# --- provenance, coverage, page --------------------------------------------------------------------

VERSION_PACKAGES = ("t2i-curate", "duckdb", "pyarrow", "img2dataset", "open_clip_torch", "torch", "pillow",
                    "rapidocr-onnxruntime", "onnxruntime", "nudenet")


def _versions() -> list[list[str]]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for p in VERSION_PACKAGES:
        try:
            out.append(["versions (when the report was built)", p, version(p)])
        except PackageNotFoundError:
            continue
    return out


def _manifest(run_dir: Path) -> dict:
    path = RunLayout(run_dir).manifest
    return json.loads(path.read_text()) if path.exists() else {}


def tiny_warning(f: dict, manifest: dict) -> str:
    if not (manifest.get("tiny_models") or f.get("tiny_models")):
        return ""
    return ("<p class='warn'><b>Scored with tiny random models: these scores are not meaningful.</b> "
            "They show that the pipeline runs end to end; the thresholds and buckets below say nothing about "
            "image quality.</p>")


def _flat(v: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested provenance dicts -> (dotted key, value) pairs."""
    if isinstance(v, dict):
        return [kv for k, x in v.items() for kv in _flat(x, f"{prefix}{k} ")]
    if isinstance(v, list):
        v = ", ".join(map(str, v))
    return [(prefix.strip(), str(v))]


def provenance_section(ctx: Ctx, manifest: dict) -> str:
    models = manifest.get("models") or ctx.funnel.get("models") or {}
    rows = [[scorer, k, v] for scorer, d in sorted(models.items()) for k, v in (_flat(d) or [("", "")])]
    rows = [[s, k or "(no model: computed from the image header)", v] for s, k, v in rows]
    rows += [["run", "name", manifest.get("run", ctx.run_dir.name)],
             ["run", "config fingerprint", manifest.get("config_fingerprint", "n/a")],
             ["run", "tiny models", str(bool(manifest.get("tiny_models", ctx.funnel.get("tiny_models"))))]]
    rows += _versions()
    cfg = RunLayout(ctx.run_dir).config
    text = cfg.read_text() if cfg.exists() else "(no config.yaml in the run folder)"
    return ("<section id='provenance'><h2>Provenance: the models that made these scores</h2>"
            + _table(["scorer", "what", "value"], rows, "provenance")
            + f"<details><summary>config.yaml</summary><pre>{_esc(text)}</pre></details></section>")


def coverage_hook(run_dir: Path) -> str:
    """The concept coverage section (``pipeline/coverage.py``'s ``coverage_section``), or '' when that
    module or its data is absent."""
    try:
        from t2i_curate.pipeline.report.coverage import coverage_section
    except ImportError:
        return ""
    try:
        return coverage_section(run_dir) or ""
    except FileNotFoundError as e:  # no coverage table computed for this run yet
        log.info("report: no concept coverage section (%s)", e)
        return ""


STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:1.5em auto;padding:0 10px}"
         ".warn{background:#fee;padding:.5em}svg{max-width:100%;height:auto}"
         "table{border-collapse:collapse;max-width:100%;font-size:13px}td,th{border:1px solid #ccc;"
         "padding:2px 6px;overflow-wrap:anywhere;vertical-align:top}pre{white-space:pre-wrap;"
         "overflow-wrap:anywhere;font-size:11px}.hists{display:flex;flex-wrap:wrap;gap:12px}"
         ".histfig{margin:0;width:480px;max-width:100%}.grid{display:flex;flex-wrap:wrap;gap:6px}"
         ".thumb{margin:0;width:132px;font-size:10px;overflow-wrap:anywhere}"
         ".thumb img{max-width:128px;max-height:128px;display:block}.noimg{width:128px;height:64px;"
         "background:#eee;color:#777;display:flex;align-items:center;justify-content:center}"
         ".dupgroup{border-left:3px solid #e67e22;padding-left:6px;margin:6px 0}h4{margin:.6em 0 .2em}"
         "nav a{margin-right:1em}")


def page(title: str, parts: list[str]) -> str:
    ids = re.findall(r"<section id='([\w-]+)'>", "".join(parts))  # every section present, coverage included
    nav = "".join(f"<a href='#{s}'>{s}</a>" for s in ids)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
            f"<style>{STYLE}</style></head><body><nav>{nav}</nav>{''.join(parts)}</body></html>")


# --- building --------------------------------------------------------------------------------------


def pick_samples(ctx: Ctx) -> tuple[dict, dict, list]:
    """Every sample the picture sections show (bounded), and their captions and states in ``ctx.picked``."""
    buckets = {}
    for col in ctx.columns:
        kind, edges = bucket_edges(ctx.con, col)
        buckets[col] = (kind, bucket_picks(ctx.con, col, edges, ctx.per_bucket))
    dropped = dropped_picks(ctx.con, ctx.per_bucket)
    dups = duplicate_picks(ctx.con, groups=max(2, ctx.per_bucket // 2))
    keys = {k for _, bs in buckets.values() for _, _, items in bs for k, _ in items}
    keys |= {k for ks in dropped.values() for k in ks}
    keys |= {k for _, kept, copies in dups for k in (kept, *copies)}
    ctx.picked = describe_keys(ctx, keys)
    return buckets, dropped, dups


def _views(con) -> set[str]:
    return {r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}


def build_run_report(run_dir: Path, max_bytes: int = DEFAULT_MAX_BYTES, per_bucket: int = PER_BUCKET,
                     px: int = THUMB_PX) -> Path:
    """Write ``report/index.html`` for the run and return its path; thumbnails are cached in
    ``report/thumbs/<px>/`` and embedded only while the page stays under ``max_bytes``."""
    run_dir = as_path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"expected a run folder, got {run_dir}: no such folder")
    t0 = time.perf_counter()
    f = load_funnel(run_dir)
    con = open_run(run_dir)
    views = _views(con)
    ctx = Ctx(run_dir, con, f, load_rules(run_dir), score_columns(con, views), views, per_bucket)
    manifest = _manifest(run_dir)
    head = [f"<h1>Curation report: {_esc(manifest.get('run', run_dir.name))}</h1>", tiny_warning(f, manifest),
            f"<p>{f['input']} input rows: {f['written']} written, {f['dropped']} dropped, {f['failed']} failed; "
            f"{f.get('shards', 'n/a')} curated shards. Built from the run's files alone.</p>"]
    text = [funnel_section(ctx), histogram_section(ctx)]
    tail = [failures_section(ctx), coverage_hook(run_dir), provenance_section(ctx, manifest)]
    buckets, dropped, dups = pick_samples(ctx)
    available = ensure_thumbs(run_dir, ctx.picked, px)
    order = rule_order(f, ctx.rules)

    def pictures(emb: Embedder) -> list[str]:
        return [buckets_section(ctx, emb, buckets), dropped_section(ctx, emb, dropped, order),
                duplicates_section(ctx, emb, dups)]

    bare = pictures(Embedder(run_dir, set(), 0, px))  # the markup alone, to size the thumbnails' budget
    fixed = sum(len(p.encode()) for p in head + text + tail + bare) + 10_000
    emb = Embedder(run_dir, available, budget=max(max_bytes - fixed, 0), px=px)
    shown = pictures(emb)
    if fixed > max_bytes:
        log.warning("report: the page without thumbnails (%d bytes) is over the %d byte limit", fixed, max_bytes)
    if emb.refused:
        head.append(f"<p class='warn'>{emb.refused} thumbnails left out to keep the page under "
                    f"{max_bytes / 1e6:g} MB.</p>")
    body = page(f"curation report {run_dir.name}", head + text + shown + tail)
    out = RunLayout(run_dir).report_html
    with atomic_path(out) as tmp:
        tmp.write_text(body, encoding="utf-8")
    log.info("report: %s (%.1f MB, %d thumbnails embedded, %.1f s)", out, len(body.encode()) / 1e6,
             emb.given, time.perf_counter() - t0)
    return out
