"""LAION-style input: a folder or glob of URL-list parts, checked before any work, then streamed.

The parts may be local or on an object store: ``input.urls`` may be an fsspec URL of a folder
(``s3://bucket/laion/``) or a glob (``s3://bucket/laion/*.parquet``), listed with the store's own
filesystem (``fs.glob`` / ``fs.ls``), stamped by its size and last-modified time, and read by pyarrow
through the fsspec filesystem (parquet: footer, then row groups; CSV / JSONL: one streamed file object).

``discover_parts(spec, icfg)`` lists the parts (a folder: its files of one format, sorted by name; a glob:
its matches) and reads each one's schema only (a parquet footer; a CSV / JSONL first block). Parts that
disagree on the URL or caption column (missing, another type), or on the other carried columns, are
refused naming the part; an unreadable part too, unless ``input.skip_bad_parts``.

``download_parts(cfg, run_dir, parts)`` then normalises each part batch by batch (``BATCH_ROWS`` rows in
memory, never the list) into ``download/_input/part-NNNNN.parquet``, the URL guard's and blocklists'
refusals into ``download/_refused/part-NNNNN.parquet`` and the rows to fetch into
``download/_fetch/part-NNNNN-CCCC.parquet`` (at most ``FETCH_CHUNK_ROWS`` rows each, since img2dataset
reads one such file whole), and hands ``download/_fetch/`` to img2dataset, which numbers shards on across
its files in name order. ``download/_input/_parts.json`` records each finished part, last.

Decisions:
- ``input_row`` is a running index over every part (parts in the order this run folder first saw them),
  so keys of refused rows and joins on input_row stay unique; ``input_file`` (the part's name relative to
  the folder / glob base) and ``part_row`` (its row within the part) name the source row.
- A part is identified by name, size and mtime_ns (no hashing: 128 LAION parts of 1-2 GB would cost
  minutes per run), and on a store also by its content tag (ETag), since a store's last-modified has whole
  seconds. A recorded part that changed (size, mtime or tag; ``touch`` counts) or is gone is refused
  before any work. A new part is appended after the recorded ones whatever its name sorts as, so its
  fetch files sort last, its shards get new numbers, and finished shards are never touched.
- A part unreadable at discovery (a bad footer / first block) has unknown rows: with skip_bad_parts it
  is listed by name in ``_parts.json`` and the funnel's ``skipped_parts``, with ``rows: null``. A parquet
  part whose footer reads but whose data does not (found while streaming) has rows known from the
  footer: with skip_bad_parts they become input rows refused as ``unreadable input part ...`` (failed at
  download in the funnel); without it the run stops there, before any download.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import math
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from t2i_curate.pipeline.core.columns import ROW_COLUMNS
from t2i_curate.pipeline.core.config import InputConfig, RunConfig
from t2i_curate.pipeline.core.io import (
    TMP_MARK,
    arrow_dataset,
    as_path,
    is_remote,
    parquet_file,
    parquet_writer,
    read_metadata,
    replace,
    write_json,
)
from t2i_curate.pipeline.core.layout import RunLayout
from t2i_curate.pipeline.core.lock import RunFolderError
from t2i_curate.pipeline.download.base import (
    _detect_format,
    _img2dataset_kwargs,
    _repair_utf8,
    download_summary,
    guard_settings,
    normalise_input,
    redo_short_shards,
    run_img2dataset,
)
from t2i_curate.pipeline.download.columns import InputError, json_safe, plan_columns

log = logging.getLogger(__name__)

BATCH_ROWS = 65_536  # rows of one part in memory at a time
FETCH_CHUNK_ROWS = 262_144  # rows per file handed to img2dataset (it reads each file whole)
MANIFEST_VERSION = 1


def is_multi(spec: str | Path) -> bool:
    """True when ``input.urls`` names a folder or a glob (parts), not one file; local or an fsspec URL."""
    if is_remote(spec):
        p = as_path(spec)
        if p.is_file():
            return False
        return glob.has_magic(str(p)) or p.is_dir()
    s = os.path.expanduser(str(spec))
    if Path(s).is_file():  # a file named like a glob ("urls[2].csv") is that file
        return False
    return glob.has_magic(s) or Path(s).is_dir()


@dataclass
class Part:
    path: Path  # a UPath for a part on an object store
    name: str  # relative to the folder / the glob's base: recorded as ``input_file``
    fmt: str
    size: int
    mtime_ns: int
    etag: str | None = None  # a store's content tag (S3's ETag, GCS's / Azure's etag); None on a disk
    rows: int | None = None  # known from a parquet footer; None for CSV / JSONL or unreadable
    schema: object = None  # pyarrow Schema as read (None: unreadable)
    error: str | None = None


@dataclass
class PartSet:
    """The checked parts of ``spec`` and the normalised columns they share."""

    spec: str
    parts: list[Part]
    columns: list[str] = field(default_factory=list)  # normalised names, before ROW_COLUMNS
    source: list[str] = field(default_factory=list)  # input names, same order
    extras: list[str] = field(default_factory=list)  # img2dataset's save_additional_columns
    schema: object = None  # pyarrow Schema of a normalised part (columns, then ROW_COLUMNS)

    @property
    def total_rows(self) -> int:
        return sum(p.rows or 0 for p in self.parts)


# --- discovery and schema checks ---------------------------------------------------------------


def find_parts(spec: str | Path, fmt: str = "auto") -> list[tuple[Path, str]]:
    """The part files of a folder (one format, sorted) or a glob (sorted), with their names."""
    if is_remote(spec):
        return _find_remote_parts(spec, fmt)
    s = os.path.expanduser(str(spec))
    if glob.has_magic(s):
        base = Path(s.split("*")[0].split("?")[0].split("[")[0])
        base = base if str(s).endswith(os.sep) or base.is_dir() else base.parent
        files = sorted(Path(p) for p in glob.glob(s, recursive=True) if Path(p).is_file())
        if not files:
            raise InputError(f"input.urls: the glob {s!r} matches no file")
    else:
        base = Path(s)
        files = sorted(p for p in base.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
        files = _of_one_format(files, fmt, base)
    return [(p, str(p.relative_to(base)) if p.is_relative_to(base) else str(p)) for p in files]


def _of_one_format(files: list, fmt: str, folder) -> list:
    """The files of a folder's one format (local paths or UPaths); refused when it has none or several."""
    known = {p: _format_or_none(p, fmt) for p in files}
    formats = sorted({f for f in known.values() if f})
    if not formats:
        raise InputError(f"input.urls: folder {folder} holds no .parquet, .csv, .tsv or .jsonl file")
    if len(formats) > 1:
        raise InputError(f"input.urls: folder {folder} mixes formats {formats}; expected parts of one format "
                         f"(set input.format, or use a glob such as {str(folder).rstrip('/')}/*.parquet)")
    return [p for p in files if known[p]]


def _find_remote_parts(spec, fmt: str) -> list:
    """:func:`find_parts` on an object store: the store's listing (``fs.glob`` / ``fs.ls``), names relative
    to the folder / the glob's base (the glob's text before its first wildcard, up to the last ``/``)."""
    root = as_path(spec)
    fs, s = root.fs, root.path
    if glob.has_magic(s):
        head = s[: min(s.find(c) for c in "*?[" if c in s)]
        base = head.rstrip("/") if head.endswith("/") else posixpath.dirname(head)
        found = fs.glob(s, detail=True)
        keys = sorted(k for k, info in found.items() if info.get("type") == "file")
        if not keys:
            raise InputError(f"input.urls: the glob {str(root)!r} matches no file")
    else:
        base = s.rstrip("/")
        listed = fs.ls(base, detail=True)
        keys = sorted(e["name"] for e in listed if e.get("type") == "file"
                      and not posixpath.basename(e["name"]).startswith((".", "_")))
        by_path = {as_path(fs.unstrip_protocol(k)): k for k in keys}
        keys = [by_path[p] for p in _of_one_format(list(by_path), fmt, root)]
    return [(as_path(fs.unstrip_protocol(k)), k[len(base) + 1:] if base and k.startswith(base + "/") else k)
            for k in keys]


STORE_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"}


def _stamp(path) -> tuple[int, int, str | None]:
    """(size, mtime_ns, etag) of a part: ``os.stat`` locally; on a store its size, last-modified time and
    content tag from one metadata request. A store's last-modified has whole seconds, so a part re-uploaded
    with the same size within the same second differs only in its tag."""
    if not is_remote(path):
        st = path.stat()
        return int(st.st_size), int(st.st_mtime_ns), None
    from upath._stat import UPathStatResult

    info = path.fs.info(path.path)
    st = UPathStatResult.from_info(info)
    etag = str(info.get("ETag") or info.get("etag") or "")
    # an object store's tag names the content; an HTTP server's may be weak (W/...) or differ between
    # CDN nodes, so only stores' strong tags count
    if path.protocol not in STORE_PROTOCOLS or not etag or etag.startswith("W/"):
        etag = ""
    return int(st.st_size), int(st.st_mtime_ns), etag.strip('"') or None


def _format_or_none(path: Path, fmt: str) -> str | None:
    try:
        found = _detect_format(path, "auto")
    except InputError:
        return None
    return found if fmt in ("auto", found) else None


def _read_schema(part: Part, icfg: InputConfig) -> None:
    """Fill ``part.schema`` (and rows, for parquet) from the footer / first block, or ``part.error``."""
    import pyarrow as pa

    try:
        if part.fmt == "parquet":
            meta = read_metadata(part.path)
            part.rows, part.schema = meta.num_rows, meta.schema.to_arrow_schema()
        else:
            with _open_text(part, icfg) as reader:
                part.schema = reader.schema
    except (pa.ArrowException, OSError, ValueError) as e:
        part.error = f"{type(e).__name__}: {e}"


def _string_class(t) -> str:
    import pyarrow as pa

    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "binary"
    return str(t)


def _column_problem(part: Part, icfg: InputConfig, ref: Part | None) -> str | None:
    """Why ``part``'s URL / caption column cannot be read with the others (None: fine)."""
    names = part.schema.names
    for what, col in (("URL", icfg.url_col), ("caption", icfg.caption_col)):
        if col is None:
            continue
        if col not in names:
            key = "input.url_col" if what == "URL" else "input.caption_col"
            return f"expected a {what} column {col!r} (set {key}); found columns {names}"
        got = _string_class(part.schema.field(col).type)
        if what == "URL" and got not in ("string", "binary", "null"):
            return f"URL column {col!r} must hold strings, got {got}"
        if ref is not None:
            want = _string_class(ref.schema.field(col).type)
            if got != want and "null" not in (got, want):
                return f"{what} column {col!r} is {got}, but part {ref.name!r} has {want}"
    return None


def _check_extras(parts: list[Part], ps: PartSet, icfg: InputConfig) -> None:
    """Every good part carries the same other columns, of one type (by name)."""
    ref = parts[0]
    base = {icfg.url_col, icfg.caption_col}
    want = {c: _string_class(ref.schema.field(c).type) for c in ps.source if c not in base}
    for p in parts[1:]:
        have = {c: _string_class(p.schema.field(c).type) for c in p.schema.names if c not in base}
        if icfg.extra_columns is not None:
            have = {c: t for c, t in have.items() if c in want}
        if have != want:
            diff = sorted(set(have.items()) ^ set(want.items()))
            raise InputError(f"input part {p.path}: its other columns differ from part {ref.name!r}'s "
                             f"({diff}); expected parts with one schema (or list the shared ones in "
                             f"input.extra_columns)")


def discover_parts(spec: str | Path, icfg: InputConfig) -> PartSet:
    """List and check every part before any work; raise :class:`InputError` naming the first bad one."""
    import pyarrow as pa

    parts = []
    for path, name in find_parts(spec, icfg.format):
        parts.append(Part(path, name, _detect_format(path, icfg.format), *_stamp(path)))
    for p in parts:
        _read_schema(p, icfg)
        if p.error and not icfg.skip_bad_parts:
            raise InputError(f"input part {p.path}: cannot read it as {p.fmt} ({p.error}); fix or remove it, "
                             f"or set input.skip_bad_parts: true to list it in the funnel and go on")
        if p.error:
            log.warning("input part %s is unreadable (%s): skipped, listed in the funnel", p.path, p.error)
    good = [p for p in parts if p.error is None]
    if not good:
        raise InputError(f"input.urls: none of the {len(parts)} part(s) of {spec} can be read")
    for p in good:
        problem = _column_problem(p, icfg, None if p is good[0] else good[0])
        if problem:
            raise InputError(f"input part {p.path}: {problem}")
    ps = PartSet(str(spec), parts)
    # the columns as the stream delivers them (normalise_batch), then renamed and converted as the single
    # list is: names the pipeline writes carried as input_<name>, types img2dataset cannot write as text
    delivered = _delivered_schema(good[0], icfg)
    try:
        ps.source = plan_columns(delivered, icfg).source
        normalised, renamed = normalise_input(delivered.empty_table(), icfg)  # logs what it renames / converts
    except InputError as e:
        raise InputError(f"input part {good[0].path}: {e}") from e
    ps.columns = [c for c in normalised.column_names if c != "input_row"]
    ps.extras = [c for c in renamed if c != "input_row"] + list(ROW_COLUMNS)
    _check_extras(good, ps, icfg)
    ps.schema = pa.schema(list(normalised.schema) + [pa.field("input_file", pa.string()),
                                                     pa.field("part_row", pa.int64())])
    log.info("input: %d part(s) of %s, %d rows known from footers", len(parts), spec, ps.total_rows)
    return ps


def _delivered_schema(ref: Part, icfg: InputConfig):
    """The first good part's columns as :func:`normalise_batch` has them before renaming: URL and caption as
    strings; other columns as the part has them (CSV: strings; any string type as string)."""
    import pyarrow as pa

    fields = []
    for f in ref.schema:
        text = f.name in (icfg.url_col, icfg.caption_col) or ref.fmt in ("csv", "tsv") or _string_class(f.type) == "string"
        fields.append(pa.field(f.name, pa.string() if text else f.type))
    return pa.schema(fields)


# --- streaming ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_text(part: Part, icfg: InputConfig, names: list[str] | None = None) -> Iterator:
    """A streaming reader of a CSV / TSV / JSONL part (URL and caption read as bytes, repaired later); a
    remote part is read from one file object of its store, closed with the reader."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson

    block = 1 << 20
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(part.path.open("rb")) if is_remote(part.path) else part.path
        if part.fmt == "jsonl":
            reader = pjson.open_json(src, read_options=pjson.ReadOptions(block_size=block))
        else:
            parse = pcsv.ParseOptions(delimiter="," if part.fmt == "csv" else "\t")
            types = {}
            if names is not None:  # every column a string (one schema across blocks and parts), text as bytes
                types = {n: pa.string() for n in names}
                types.update({c: pa.binary() for c in (icfg.url_col, icfg.caption_col) if c in names})
            reader = pcsv.open_csv(src, read_options=pcsv.ReadOptions(block_size=block), parse_options=parse,
                                   convert_options=pcsv.ConvertOptions(column_types=types))
        with reader:
            yield reader


def iter_part(part: Part, icfg: InputConfig, columns: list[str]) -> Iterator:
    """Record batches of ``columns`` of one part, at most ``BATCH_ROWS`` rows each."""
    if part.fmt == "parquet":
        pf = parquet_file(part.path)
        yield from pf.iter_batches(batch_size=BATCH_ROWS, columns=columns)
        return
    with _open_text(part, icfg, part.schema.names) as reader:
        for batch in reader:
            batch = batch.select(columns)
            for start in range(0, batch.num_rows, BATCH_ROWS):
                yield batch.slice(start, BATCH_ROWS)


def _constant(value: str, n: int):
    import numpy as np
    import pyarrow as pa

    return pa.array([value], type=pa.string()).take(pa.array(np.zeros(n, dtype=np.int64)))


def normalise_batch(batch, ps: PartSet, icfg: InputConfig, part: Part, first_row: int, part_row: int):
    """One raw batch -> normalised rows: URL / caption as strings, columns renamed, ROW_COLUMNS added."""
    import numpy as np
    import pyarrow as pa

    t = pa.Table.from_batches([batch])
    for col in (icfg.url_col, icfg.caption_col):
        if col is None:
            continue
        t = _repair_utf8(t, col, part.path)
        if not pa.types.is_string(t.schema.field(col).type):
            t = t.set_column(t.column_names.index(col), col, t[col].cast(pa.string()))
    t = json_safe(t.select(ps.source).rename_columns(ps.columns))  # as normalise_input converts the single list
    t = t.cast(pa.schema(list(ps.schema)[: len(ps.columns)]))
    n = t.num_rows
    rows = np.arange(part_row, part_row + n, dtype=np.int64)
    t = t.append_column("input_row", pa.array(rows + first_row))
    t = t.append_column("input_file", _constant(part.name, n))
    return t.append_column("part_row", pa.array(rows))


def placeholder_batches(ps: PartSet, rows: int, part: Part, first_row: int) -> Iterator:
    """Rows of a part whose data is unreadable: every column NULL but ROW_COLUMNS."""
    import numpy as np
    import pyarrow as pa

    for start in range(0, rows, BATCH_ROWS):
        n = min(BATCH_ROWS, rows - start)
        cols = {c: pa.nulls(n, type=ps.schema.field(c).type) for c in ps.columns}
        r = np.arange(start, start + n, dtype=np.int64)
        cols.update(input_row=pa.array(r + first_row), input_file=_constant(part.name, n), part_row=pa.array(r))
        yield pa.Table.from_pydict(cols, schema=ps.schema)


def surely_allowed(col, dcfg):
    """Rows ``url_refusal`` allows for certain, found by one RE2 match over the column (vectorised): an
    allowed http(s) scheme, then a host name of DNS labels whose last one starts with a letter (so no
    literal address, no userinfo, no brackets), no ``localhost`` / ``ip6-`` anywhere, no whitespace. Every
    other row goes through ``url_refusal`` itself (tests/test_parts.py checks the two agree)."""
    import re

    import numpy as np
    import pyarrow.compute as pc

    schemes = [re.escape(s) for s in dcfg.allowed_schemes if s.lower() in ("http", "https")]
    if not schemes or len(col) == 0:
        return np.zeros(len(col), dtype=bool)
    pat = (rf"(?i)^({'|'.join(schemes)})://[a-z0-9-]+(\.[a-z0-9-]+)*\.[a-z][a-z0-9-]*(:[0-9]{{1,5}})?"
           rf"([/?#][^\s]*)?$")
    ok = pc.and_(pc.match_substring_regex(col, pat), pc.invert(pc.match_substring_regex(col, "(?i)localhost|ip6-")))
    return ok.fill_null(False).to_numpy(zero_copy_only=False)


def _reasons(cfg: RunConfig, col, dcfg) -> tuple[list, list]:
    """Per row: the refusal reason (None: fetch) and the blocklist hit (rule, reason) or None."""
    import numpy as np

    from t2i_curate.filters.blocklist import PRE_DOWNLOAD, blocked_urls
    from t2i_curate.pipeline.core.urls import url_refusal

    n = len(col)
    lists = any(b.kind in PRE_DOWNLOAD for b in cfg.blocklists)
    blocked = blocked_urls(cfg, col.to_pylist()) if lists else [None] * n
    reasons: list = [None] * n
    slow = np.flatnonzero(~surely_allowed(col, dcfg))
    for i, u in zip(slow.tolist(), col.take(slow).to_pylist(), strict=True):
        reasons[i] = url_refusal(u, dcfg)
    return [b[1] if b else r for r, b in zip(reasons, blocked, strict=True)], blocked


def split_batch(cfg: RunConfig, table, dcfg, reason: str | None = None):
    """(rows to fetch, refused rows with reason / rule, how many a blocklist named). ``reason``: refuse all."""
    import pyarrow as pa

    if reason:
        reasons, blocked = [reason] * table.num_rows, [None] * table.num_rows
    else:
        reasons, blocked = _reasons(cfg, table[cfg.input.url_col], dcfg)
    refused = [i for i, r in enumerate(reasons) if r is not None]
    if not refused:
        return table, None, 0
    allowed = table.filter(pa.array([r is None for r in reasons], type=pa.bool_()))
    idx = pa.array(refused, type=pa.int64())
    caps = table[cfg.input.caption_col].take(idx) if cfg.input.caption_col else pa.nulls(len(refused), pa.string())
    out = pa.table({
        "input_row": table["input_row"].take(idx),
        "url": table[cfg.input.url_col].take(idx).cast(pa.string()),
        "caption": caps,
        "reason": pa.array([reasons[i] for i in refused], type=pa.string()),
        "rule": pa.array([blocked[i][0] if blocked[i] else None for i in refused], type=pa.string()),
        "input_file": table["input_file"].take(idx),
        "part_row": table["part_row"].take(idx),
    })
    return allowed, out, sum(b is not None for b in blocked)


# --- one part's outputs ----------------------------------------------------------------------


class _PartWriter:
    """One part's normalised rows, refusals and fetch chunks, written to temporaries; ``commit`` renames
    them into place (a killed run leaves only temporaries, which the next run removes)."""

    def __init__(self, lay: RunLayout, index: int, schema, chunk_rows: int):
        self.lay, self.index, self.schema, self.chunk_rows = lay, index, schema, chunk_rows
        self.tmps: list[tuple[Path, Path]] = []
        self.writers: list = []
        self.input = self._open(lay.input_part(index), schema)
        self.refused = self.fetch = None
        self.chunks: list[list] = []  # [file name, rows]
        self.n_refused = self.n_blocked = 0

    def _open(self, final: Path, schema):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f"{TMP_MARK}{final.name}")
        self.tmps.append((tmp, final))
        self.writers.append(parquet_writer(tmp, schema))
        return self.writers[-1]

    def write(self, table, fetch, refused, n_blocked: int) -> None:
        self.input.write_table(table)
        if refused is not None:
            if self.refused is None:
                self.refused = self._open(self.lay.refused_part(self.index), refused.schema)
            self.refused.write_table(refused)
            self.n_refused += refused.num_rows - n_blocked
            self.n_blocked += n_blocked
        while fetch.num_rows:
            if self.fetch is None:
                path = self.lay.fetch_chunk(self.index, len(self.chunks))
                self.fetch = self._open(path, self.schema)
                self.chunks.append([path.name, 0])
            head = fetch.slice(0, self.chunk_rows - self.chunks[-1][1])
            fetch = fetch.slice(head.num_rows)
            self.fetch.write_table(head)
            self.chunks[-1][1] += head.num_rows
            if self.chunks[-1][1] == self.chunk_rows:
                self.fetch = None  # closed with the others at commit

    def commit(self) -> None:
        for w in self.writers:
            w.close()
        for tmp, final in self.tmps:
            replace(tmp, final)

    def abort(self) -> None:
        for w in self.writers:
            try:
                w.close()
            except (OSError, ValueError) as e:  # a half-written temporary is removed next
                log.debug("closing %s: %s", w, e)
        for tmp, _ in self.tmps:
            tmp.unlink(missing_ok=True)


def _remove_part_files(lay: RunLayout, index: int) -> None:
    """Outputs of a part a killed run left unrecorded (never img2dataset's: it runs after every part)."""
    lay.input_part(index).unlink(missing_ok=True)
    lay.refused_part(index).unlink(missing_ok=True)
    if lay.fetch_dir.is_dir():
        for p in lay.fetch_dir.glob(f"{lay.fetch_chunk(index, 0).name[:-len('-0000.parquet')]}-*.parquet"):
            p.unlink()


class PartReadError(Exception):
    """A part's rows cannot be read (only reading: a failed write or a bug in processing propagates)."""


def _reading(batches: Iterator) -> Iterator:
    import pyarrow as pa

    try:
        yield from batches  # exceptions of the consumer's own work are raised in its frame, not here
    except (pa.ArrowException, OSError, ValueError) as e:
        raise PartReadError(f"{type(e).__name__}: {e}") from e


def _stream(cfg: RunConfig, ps: PartSet, part: Part, first_row: int, w: _PartWriter, bar) -> int:
    dcfg = guard_settings(cfg)
    n = 0
    for batch in _reading(iter_part(part, cfg.input, ps.source)):
        t = normalise_batch(batch, ps, cfg.input, part, first_row, n)
        fetch, refused, n_blocked = split_batch(cfg, t, dcfg)
        w.write(t, fetch, refused, n_blocked)
        n += t.num_rows
        bar.update(t.num_rows)
    if part.rows is not None and n != part.rows:
        raise PartReadError(f"read {n} rows, but its footer says {part.rows}")
    return n


def normalise_part(cfg: RunConfig, lay: RunLayout, ps: PartSet, part: Part, index: int, first_row: int,
                   bar) -> dict:
    """Normalise one part (streamed) and return its manifest entry."""

    entry = {"index": index, "name": part.name, "path": str(part.path), "format": part.fmt, "size": part.size,
             "mtime_ns": part.mtime_ns, "etag": part.etag, "first_row": first_row, "status": "ok", "rows": part.rows,
             "error": part.error, "fetch": [], "refused": 0, "blocked": 0}
    if part.error:  # unreadable at discovery (skip_bad_parts): rows unknown, listed by name
        return {**entry, "status": "skipped"}
    chunk = max(1, FETCH_CHUNK_ROWS // cfg.download.samples_per_shard) * cfg.download.samples_per_shard
    _remove_part_files(lay, index)
    w = _PartWriter(lay, index, ps.schema, chunk)
    try:
        entry["rows"] = _stream(cfg, ps, part, first_row, w, bar)
    except PartReadError as e:
        w.abort()
        err = str(e)
        if not cfg.input.skip_bad_parts:
            raise InputError(f"input part {part.path}: cannot read its rows ({err}); fix or remove it, or set "
                             f"input.skip_bad_parts: true to list it in the funnel and go on") from e
        log.warning("input part %s: rows unreadable (%s): %s", part.path, err,
                    "its rows end failed" if part.rows is not None else "skipped, rows unknown")
        if part.rows is None:
            return {**entry, "status": "skipped", "error": err}
        w = _PartWriter(lay, index, ps.schema, chunk)
        reason = f"unreadable input part {part.name}: {err}"
        for t in placeholder_batches(ps, part.rows, part, first_row):
            w.write(t, *split_batch(cfg, t, None, reason=reason))
        entry.update(status="failed", error=err, rows=part.rows)
    w.commit()
    return {**entry, "fetch": w.chunks, "refused": w.n_refused, "blocked": w.n_blocked}


# --- the run folder's parts, and the download stage ----------------------------------------


def load_manifest(lay: RunLayout) -> dict | None:
    import json

    if not lay.parts_manifest.exists():
        return None
    return json.loads(lay.parts_manifest.read_text())


def _schema_list(ps: PartSet) -> list[list[str]]:
    return [[f.name, str(f.type)] for f in ps.schema]


def check_recorded(man: dict, ps: PartSet) -> None:
    """Refuse (before any work) a part this run read that changed or is gone, or a new schema."""
    now = {p.name: p for p in ps.parts}
    for e in man["parts"]:
        p = now.get(e["name"])
        if p is None and e["status"] != "skipped":
            raise RunFolderError(f"input part {e['name']} ({e['path']}) was read by this run folder and is gone; "
                                 f"restore it, or start a new run (--set name=...)")
        # a tag is compared when both readings have one (manifests written before tags were recorded have none)
        tags_differ = bool(p and p.etag and e.get("etag") and p.etag != e["etag"])
        if p is not None and ((p.size, p.mtime_ns) != (e["size"], e["mtime_ns"]) or tags_differ):
            raise RunFolderError(
                f"input part {p.path} changed since this run folder read it (size {e['size']} -> {p.size} bytes, "
                f"mtime_ns {e['mtime_ns']} -> {p.mtime_ns}"
                + (f", etag {e.get('etag')} -> {p.etag}" if p.etag or e.get("etag") else "")
                + "); parts may be added, never changed: restore it, or start a new run (--set name=...)")
    if man["schema"] != _schema_list(ps):
        raise RunFolderError(f"the input parts' columns {_schema_list(ps)} differ from those this run folder "
                             f"recorded {man['schema']}; start a new run (--set name=...)")


def prepare_parts(cfg: RunConfig, run_dir: Path, ps: PartSet) -> dict:
    """Normalise every part not yet recorded (streamed, one batch in memory); return the manifest."""
    from tqdm import tqdm

    lay = RunLayout(run_dir)
    man = load_manifest(lay) or {"version": MANIFEST_VERSION, "spec": ps.spec, "schema": _schema_list(ps),
                                 "extras": ps.extras, "parts": []}
    check_recorded(man, ps)
    done = {e["name"] for e in man["parts"]}
    todo = [p for p in ps.parts if p.name not in done]
    known = all(p.rows is not None or p.error for p in ps.parts)
    initial = sum(e["rows"] or 0 for e in man["parts"])
    with tqdm(total=ps.total_rows if known else None, initial=initial, unit="rows", unit_scale=True,
              desc=f"input: {len(ps.parts)} parts", disable=None) as bar:
        for p in todo:
            first = max((e["first_row"] + (e["rows"] or 0) for e in man["parts"]), default=0)
            bar.set_postfix_str(p.name)
            man["parts"].append(normalise_part(cfg, lay, ps, p, len(man["parts"]), first, bar))
            write_json(lay.parts_manifest, man)  # last: the part is done
    if todo:
        log.info("input: %d new part(s) normalised, %d in all", len(todo), len(man["parts"]))
    return man


def download_parts(cfg: RunConfig, run_dir: Path, url_path: Path, ps: PartSet | None = None) -> dict:
    """The download stage for parts: normalise new parts, then img2dataset on ``download/_fetch/``
    (finished shards skipped: img2dataset's incremental mode). Returns download_stage's counts."""
    ps = ps or discover_parts(url_path, cfg.input)
    lay = RunLayout(run_dir)
    man = prepare_parts(cfg, run_dir, ps)
    spp = cfg.download.samples_per_shard
    n_shards = sum(math.ceil(rows / spp) for e in man["parts"] for _, rows in e["fetch"])
    redo_short_shards(lay)  # a shard with fewer rows than its stats count is not finished
    todo = set(range(n_shards)) - set(lay.finished_downloads())
    if todo:
        log.info("download: %d of %d shards to fetch, over %d part(s)", len(todo), n_shards, len(man["parts"]))
        run_img2dataset(lay.fetch_dir, lay.download, _img2dataset_kwargs(cfg, man["extras"]), cfg.ray,
                        cfg.download.max_image_pixels)
    elif n_shards == 0:
        log.warning("download: every URL was refused; nothing to fetch")
    else:
        log.info("download: all %d shards finished already", n_shards)
    d = download_summary(lay)
    n_refused = sum(e["refused"] for e in man["parts"])
    n_blocked = sum(e["blocked"] for e in man["parts"])
    skipped = [e["name"] for e in man["parts"] if e["status"] == "skipped"]
    return {**d, "rows": d["rows"] + n_refused + n_blocked, "failed": d["failed"] + n_refused,
            "refused": n_refused, "blocked": n_blocked, "parts": len(man["parts"]), "skipped_parts": len(skipped)}


def skipped_parts(lay: RunLayout) -> list[dict]:
    """Parts skipped unread (``input.skip_bad_parts``, rows unknown): name, path, error, ``rows: None``."""
    man = load_manifest(lay)
    return [{"part": e["name"], "path": e["path"], "rows": None, "error": e["error"]}
            for e in (man or {}).get("parts", []) if e["status"] == "skipped"]


def read_input_rows(lay: RunLayout, rows: list[int]):
    """The normalised input rows with these ``input_row`` values, in that order (retry-failed)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = pa.array(rows, type=pa.int64())
    table = arrow_dataset(lay.input_files()).to_table(
        filter=pc.field("input_row").isin(wanted))
    return table.take(pc.index_in(wanted, table["input_row"]))
