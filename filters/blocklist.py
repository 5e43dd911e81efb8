"""Blocklists (removal lists, as in Re-LAION-5B's cleaning): rows they name end ``dropped`` with rule
``blocklist:<name>``.

Config (top level): ``blocklists: [{name, path, kind, max_distance, column}]``.

- ``url`` and ``domain`` lists apply **before download** (``download.split_refused``): a listed URL is
  never fetched; it lands in ``download/_refused.parquet`` with ``rule`` set, and select turns it into a
  ``dropped`` decision. URLs match after the normalisation of exact dedup (``filters.dedup.url_key_sql``);
  a domain matches its host and every subdomain. Their content is part of the run's fingerprint.
- ``sha256``, ``md5`` and ``phash`` lists apply **at select**, as rules evaluated before the config's
  own: ``sha256`` against img2dataset's hash of the downloaded bytes, ``phash`` against the ``phash``
  scorer's column (16 hex digits; exact, or within ``max_distance`` bits of Hamming distance),
  ``md5`` against an ``md5`` column, which this pipeline's download does not record (img2dataset
  computes one hash, sha256): an md5 list is refused before any work.

A list is ``.parquet`` (one string column, or ``column``) or text: one entry a line, blank lines and
lines starting with ``#`` skipped (for hash and domain lists, ``#`` starts a comment anywhere).
Every list is read and checked when a run folder is prepared, before any download: a malformed entry
is reported with its file and line (parquet: row) number and what was expected, never with its text
(a configured path may name any file). Each list's sha256 and entry count go into
the curated shards' ``manifest.json`` (``blocklists``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from t2i_curate.pipeline.core.errors import UserError

log = logging.getLogger(__name__)

PRE_DOWNLOAD = ("url", "domain")
HEX_DIGITS = {"md5": 32, "sha256": 64, "phash": 16}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://\S+$")
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_HOST = re.compile(rf"^(?:\[[0-9a-f:.]+\]|{_LABEL}(?:\.{_LABEL})*)$")
# the host of a URL already normalised by url_key_sql (scheme://[userinfo@]host...)
_HOST_OF_KEY = r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^/?#@]*@)?(\[[^\]/?#]*\]|[^:/?#]*)"
_MAX_REPORTED = 5


class BlocklistError(UserError):
    """A blocklist cannot be used; the message names the file (and line) and what was expected."""


@dataclass(frozen=True)
class LoadedList:
    name: str
    kind: str
    path: Path
    sha256: str
    entries: tuple[str, ...]  # normalised: URLs as given, hosts and hashes lower-case
    max_distance: int = 0

    @property
    def rule(self) -> str:
        return rule_name(self.name)


@dataclass(frozen=True)
class BlockRule:
    """A select rule over the samples (``filters.rules.decision_sql`` reads ``name`` and ``keep``)."""

    name: str
    keep: str
    description: str = ""


_CACHE: dict[tuple, LoadedList] = {}


def rule_name(name: str) -> str:
    return f"blocklist:{name}"


def _expected(kind: str) -> str:
    if kind in HEX_DIGITS:
        return f"{HEX_DIGITS[kind]} hex digits"
    return "a URL (scheme://host/...)" if kind == "url" else "a host name (example.com)"


def normalise_entry(kind: str, text: str) -> str | None:
    """One list entry, normalised; None when it is malformed for ``kind``."""
    if kind != "url":
        text = text.split("#", 1)[0]
    text = text.strip()
    if kind == "url":
        return text if _URL.match(text) else None
    text = text.lower()
    if kind == "domain":
        text = text.removeprefix("*.").removeprefix(".").removesuffix(".")
        return text if _HOST.match(text) else None
    return text if re.fullmatch(f"[0-9a-f]{{{HEX_DIGITS[kind]}}}", text) else None


def _text_entries(path: Path, kind: str) -> list[tuple[str, str | None]]:
    """(where, text) of each entry of a text list; text None: the line is not UTF-8."""
    out: list[tuple[str, str | None]] = []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            out.append((f"{path}:{n}", None))
            continue
        bare = line.strip()
        if not bare or bare.startswith("#") or (kind != "url" and not bare.split("#", 1)[0].strip()):
            continue
        out.append((f"{path}:{n}", line))
    return out


def _parquet_entries(path: Path, column: str | None, name: str) -> list[tuple[str, str | None]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise BlocklistError(f"{path}: blocklist {name!r}: cannot read as parquet: {e}") from e
    cols = table.column_names
    if column is None and len(cols) != 1:
        raise BlocklistError(f"{path}: blocklist {name!r}: expected one column (or set `column`), found {cols}")
    col = column or cols[0]
    if col not in cols:
        raise BlocklistError(f"{path}: blocklist {name!r}: no column {col!r}; found {cols}")
    if not (pa.types.is_string(table[col].type) or pa.types.is_large_string(table[col].type)):
        raise BlocklistError(f"{path}: blocklist {name!r}: column {col!r} must hold strings, got {table[col].type}")
    return [(f"{path}: row {i + 1}", v) for i, v in enumerate(table[col].to_pylist())]


def load(spec) -> LoadedList:
    """Read and check one configured list (``config.Blocklist``); cached by path, size and mtime."""
    from t2i_curate.pipeline.core.io import sha256_file

    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise BlocklistError(f"blocklists: {spec.name!r}: expected a list file at {path}; no such file")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, spec.kind, spec.column, spec.name, spec.max_distance,
           spec.sha256)
    if key in _CACHE:
        return _CACHE[key]
    if path.name.lower().endswith(".parquet"):
        raw = _parquet_entries(path, spec.column, spec.name)
    elif spec.column is not None:
        raise BlocklistError(f"{path}: blocklist {spec.name!r}: `column` applies to parquet lists only")
    else:
        raw = _text_entries(path, spec.kind)
    entries, bad = [], []
    for where, text in raw:
        norm = normalise_entry(spec.kind, text) if text is not None else None
        if norm is None:  # the line itself is never shown: the path may name any file (a secret's, say)
            got = "bytes that are not UTF-8" if text is None else "something else (the line is not shown)"
            bad.append(f"  {where}: expected {_expected(spec.kind)}, got {got}")
        else:
            entries.append(norm)
    if bad:
        more = f"\n  ... and {len(bad) - _MAX_REPORTED} more" if len(bad) > _MAX_REPORTED else ""
        raise BlocklistError(f"blocklist {spec.name!r} ({spec.kind}): {len(bad)} malformed entr"
                             f"{'y' if len(bad) == 1 else 'ies'}\n" + "\n".join(bad[:_MAX_REPORTED]) + more)
    digest = sha256_file(path)
    if spec.sha256 is not None and spec.sha256 != digest:
        raise BlocklistError(f"{path}: blocklist {spec.name!r}: expected sha256 {spec.sha256} (blocklists[].sha256), "
                             f"the file has {digest}; a list applied before download may not change in a run "
                             f"folder (use another run name)")
    loaded = LoadedList(spec.name, spec.kind, path, digest, tuple(entries), spec.max_distance)
    _CACHE[key] = loaded
    return loaded


def check_blocklists(cfg) -> list[LoadedList]:
    """Every configured list read and checked (before any work); a list the run cannot apply is refused."""
    lists = [load(b) for b in cfg.blocklists]
    for bl in lists:
        if bl.kind == "phash" and "phash" not in cfg.score.scorers:
            raise BlocklistError(
                f"blocklist {bl.name!r} (phash) needs the phash scorer (column `phash`): add 'phash' to "
                f"score.scorers in the config")
        if bl.kind == "md5":
            raise BlocklistError(
                f"blocklist {bl.name!r} (md5): the download stage records only the sha256 of each downloaded "
                f"file (img2dataset computes one hash, compute_hash='sha256'), so an md5 list matches nothing; "
                f"give the list as sha256 (kind: sha256), or block the images by URL or pHash")
    return lists


def provenance(cfg) -> list[dict[str, Any]]:
    """Each list's name, kind, path, sha256 and entry count (for ``manifest.json``)."""
    out = []
    for b in cfg.blocklists:
        bl = load(b)
        d = {"name": bl.name, "rule": bl.rule, "kind": bl.kind, "path": str(b.path), "sha256": bl.sha256,
             "rows": len(bl.entries)}
        if bl.kind == "phash":
            d["max_distance"] = bl.max_distance
        out.append(d)
    return out


# --- before download: URL and domain lists ---------------------------------------------------

_MATCH_TABLES: dict[tuple, object] = {}  # per process: each list's match keys, computed once


def _match_table(bl: LoadedList):
    """The list as an Arrow table of match keys (``k``: normalised URLs; ``u``: hosts), built once per
    process: a run calls :func:`blocked_urls` once per input batch, and a takedown list can be millions
    of lines."""
    import duckdb
    import pyarrow as pa

    from t2i_curate.filters.dedup import url_key_sql
    from t2i_curate.pipeline.core.catalog import arrow

    key = (str(bl.path), bl.sha256, bl.kind)
    if key not in _MATCH_TABLES:
        raw = pa.table({"u": pa.array(bl.entries, pa.string())})
        if bl.kind == "url":
            con = duckdb.connect()
            con.register("raw", raw)
            raw = arrow(con, f"SELECT DISTINCT {url_key_sql('u')} AS k FROM raw")
            con.close()
        _MATCH_TABLES[key] = raw
    return _MATCH_TABLES[key]


def _url_hits(con, bl: LoadedList) -> set[int]:
    con.register("bl_list", _match_table(bl))
    try:
        if bl.kind == "url":
            sql = "SELECT DISTINCT i FROM bl_keys JOIN bl_list USING (k)"
        else:  # the host and each of its parent domains, joined to the list
            sql = ("SELECT DISTINCT i FROM (SELECT i, array_to_string(p[x + 1:], '.') AS u FROM (SELECT i, p, "
                   "unnest(range(len(p))) AS x FROM (SELECT i, string_split(host, '.') AS p FROM bl_keys "
                   "WHERE host <> ''))) JOIN bl_list USING (u)")
        return {r[0] for r in con.execute(sql).fetchall()}
    finally:
        con.unregister("bl_list")


def blocked_urls(cfg, urls: list[str | None]) -> list[tuple[str, str] | None]:
    """For each URL, ``(rule, reason)`` of the first url / domain list (config order) naming it, else None."""
    import duckdb
    import pyarrow as pa

    from t2i_curate.filters.dedup import url_key_sql
    from t2i_curate.pipeline.core.urls import fetch_form

    lists = [load(b) for b in cfg.blocklists if b.kind in PRE_DOWNLOAD]
    out: list[tuple[str, str] | None] = [None] * len(urls)
    if not lists or not urls:
        return out
    # matched as urllib will fetch them: " http://evil.com" and full-width hosts are evil.com
    fetched = [None if u is None else fetch_form(u) for u in urls]
    con = duckdb.connect()
    con.register("bl_in", pa.table({"i": pa.array(range(len(urls)), pa.int64()), "u": pa.array(fetched, pa.string())}))
    con.execute(f"CREATE TEMP TABLE bl_keys AS SELECT i, k, rtrim(lower(regexp_extract(k, '{_HOST_OF_KEY}', 1)), "
                f"'.') AS host FROM (SELECT i, {url_key_sql('u')} AS k FROM bl_in)")
    for bl in lists:
        what = "URL" if bl.kind == "url" else "host (or a parent domain)"
        for i in _url_hits(con, bl):
            if out[i] is None:
                out[i] = (bl.rule, f"blocked: {what} in {bl.kind} blocklist {bl.name!r}")
    con.close()
    return out


# --- at select: image-hash lists -------------------------------------------------------------

def _phash_near_sql(entries: str, d: int) -> str:
    """Sample keys within ``d`` bits of a listed pHash. Pigeonhole: two 64-bit hashes within ``d`` bits
    agree exactly on at least one of ``d + 1`` disjoint bit blocks, so candidates come from an equality
    join per block (no full cross product), and the exact distance is checked on those."""
    k = d + 1
    blocks = ", ".join(f"({j}, {j * 64 // k}, {(1 << ((j + 1) * 64 // k - j * 64 // k)) - 1}::UBIGINT)"
                       for j in range(k))
    val = "try_cast('0x' || {} AS UBIGINT)"
    return f"""
WITH blk(j, lo, mask) AS (VALUES {blocks}),
e AS (SELECT {val.format('h')} AS v FROM {entries}),
s AS (SELECT key, {val.format('lower(phash)')} AS v FROM samples WHERE phash IS NOT NULL),
eb AS (SELECT j, (v >> lo) & mask AS b, v FROM e, blk WHERE v IS NOT NULL),
sb AS (SELECT j, (v >> lo) & mask AS b, v, key FROM s, blk WHERE v IS NOT NULL)
SELECT DISTINCT sb.key FROM sb JOIN eb ON sb.j = eb.j AND sb.b = eb.b WHERE bit_count(xor(sb.v, eb.v)) <= {d}"""


def hash_rules(cfg, con) -> list[BlockRule]:
    """The image-hash lists as select rules over ``con``'s ``samples`` view (run them before the config's
    rules). Each list's matching keys are computed once into a temporary table of ``con``."""
    import pyarrow as pa

    lists = [load(b) for b in cfg.blocklists if b.kind not in PRE_DOWNLOAD]
    if not lists:
        return []
    cols = {r[0] for r in con.execute("DESCRIBE samples").fetchall()}
    rules = []
    for i, bl in enumerate(lists):
        if bl.kind not in cols:
            scorer = " (add the phash scorer to score.scorers and run `curate score`)" if bl.kind == "phash" else ""
            raise BlocklistError(f"blocklist {bl.name!r} ({bl.kind}): the samples have no {bl.kind!r} column"
                                 f"{scorer}")
        entries, hits = f"_blocklist_{i}_entries", f"_blocklist_{i}_hits"
        con.register(entries, pa.table({"h": pa.array(bl.entries, pa.string())}))
        if bl.kind == "phash" and bl.max_distance:
            sql = _phash_near_sql(entries, bl.max_distance)
        else:
            sql = f"SELECT DISTINCT s.key FROM samples s JOIN {entries} e ON lower(s.{bl.kind}) = e.h"
        con.execute(f"CREATE OR REPLACE TEMP TABLE {hits} AS {sql}")
        n = con.execute(f"SELECT count(*) FROM {hits}").fetchall()[0][0]
        log.info("blocklist %s (%s, %d entries): %d sample(s) listed", bl.name, bl.kind, len(bl.entries), n)
        rules.append(BlockRule(bl.rule, f"key NOT IN (SELECT key FROM {hits})", f"not in {bl.kind} list {bl.path}"))
    return rules


def pinned(cfg):
    """``cfg`` with each list's ``sha256`` filled in (what a run folder's config.yaml records)."""
    if not cfg.blocklists:
        return cfg
    lists = [b.model_copy(update={"sha256": load(b).sha256}) for b in cfg.blocklists]
    return cfg.model_copy(update={"blocklists": lists})
