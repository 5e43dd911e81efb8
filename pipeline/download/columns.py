"""The input's columns as img2dataset will carry them: names the pipeline writes carried as
``input_<name>`` (:func:`plan_columns`, from the schema alone, before any work) and types img2dataset
cannot write into its json converted to text (:func:`json_safe`), the same for one list and for parts."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from t2i_curate.pipeline.core.config import InputConfig
from t2i_curate.pipeline.core.errors import UserError

log = logging.getLogger(__name__)

# Columns img2dataset writes (``url`` / ``caption``: the configured input columns, renamed by it). With every
# other stage's columns they make the reserved names (filters/registry.py ``reserved_columns``, the single
# list): an input column equal to one of them (ignoring case) is carried as ``input_<name>`` instead.
ALIASES = {"aesthetic": "aesthetic_score"}  # LAION spellings of our columns: `aesthetic` -> input_aesthetic_score


class InputError(UserError):
    """The URL list cannot be used; the message says what was expected."""


@dataclass
class ColumnPlan:
    """How the input's columns are carried: which are kept (``source``, in order), under which names
    (``names``), which were renamed because the pipeline writes that name, and which are converted to text."""

    source: list[str]
    names: list[str]
    renamed: dict[str, str] = field(default_factory=dict)  # input name -> carried name
    notes: dict[str, str] = field(default_factory=dict)  # input name -> why not plain input_<name>
    converted: dict[str, str] = field(default_factory=dict)  # carried name -> "type -> text form"


def plan_columns(schema, icfg: InputConfig) -> ColumnPlan:
    """The input columns' plan from its schema alone; raises :class:`InputError` (before any work) for an
    unknown ``input.extra_columns`` entry, two columns equal but for case, or a type that cannot be carried."""
    from t2i_curate.filters.registry import reserved_columns

    keep_base = [icfg.url_col] + ([icfg.caption_col] if icfg.caption_col else [])
    others = [c for c in schema.names if c not in keep_base]
    if icfg.extra_columns is not None:
        missing = [c for c in icfg.extra_columns if c not in others]
        if missing:
            raise InputError(f"input.extra_columns: not in the input: {missing}; found {others}")
        others = list(icfg.extra_columns)
    reserved = reserved_columns()
    clash = {c: ALIASES.get(c.lower(), c.lower()) for c in others}
    clash = {c: low for c, low in clash.items() if low in reserved}
    taken = {c.lower() for c in keep_base}
    for c in others:  # columns kept under their own name first: a renamed one never takes theirs
        if c not in clash:
            if c.lower() in taken:
                raise InputError(f"input column {c!r} collides with another column as {c!r} (names are "
                                 f"compared ignoring case); rename one of them")
            taken.add(c.lower())
    plan = ColumnPlan(source=keep_base + others, names=list(keep_base))
    for c in others:
        new = c
        if c in clash:
            new = want = f"input_{clash[c]}"
            n = 2
            while new.lower() in taken or new.lower() in reserved:
                new, n = f"{want}_{n}", n + 1
            if new != want:
                plan.notes[c] = f"{want!r} is taken"
            plan.renamed[c] = new
        taken.add(new.lower())
        plan.names.append(new)
    for src, name in zip(plan.source, plan.names, strict=True):
        form = text_form(schema.field(src).type, name)
        if form is not None:
            plan.converted[name] = f"{schema.field(src).type} -> {form}"
    return plan


# --- types img2dataset cannot write ------------------------------------------------------------------
# img2dataset json.dumps every sample's columns into its tar; a value json cannot write (bytes, datetime,
# date, time, timedelta, Decimal) makes every successful sample fail after it was counted (its _stats.json
# claims successes its parquet does not hold), and a map column comes back as (key, value) pairs the write
# stage cannot rebuild. Such columns are carried as text, the same way on both input paths:
#   binary (any width)   lowercase hex (a hash column reads as usual; DuckDB: unhex(col))
#   timestamp            ISO 8601 with the stored precision: 2020-01-02T03:04:05.123456; with a time zone,
#                        in that zone with its offset (Z for UTC)
#   date, time           ISO 8601: 2020-01-02, 03:04:05.123
#   duration             ISO 8601 in seconds, exact: PT5S, PT1.500S (-PT... when negative)
#   decimal              exact decimal text: 1.20 (its scale kept)
#   map                  JSON text: an object for string keys, else [[key, value], ...]
#   uuid (extension)     canonical UUID text: 8-4-4-4-12 hex digits; other extension types: their storage
# A list or struct keeps its structure, its members converted the same way; a dictionary is decoded first.
# Interval and union types (which no parquet, CSV or JSONL input holds) are refused, naming the column
# (set input.extra_columns to leave such a column out).


def _is_binary(t) -> bool:
    import pyarrow as pa

    return (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)
            or pa.types.is_binary_view(t))


def _is_list(t) -> bool:
    import pyarrow as pa

    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def text_form(t, column: str = "?") -> str | None:
    """How a column of type ``t`` is carried: None when img2dataset writes it as it is, else the text form
    (a member of a list or struct: ``members as text``). Raises :class:`InputError` for a type neither."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        return text_form(t.value_type, column)
    if isinstance(t, pa.BaseExtensionType):  # its Python values are the extension's own objects
        if t.extension_name == "arrow.uuid":
            return "UUID text"
        return f"its storage type {t.storage_type}" + (f" as {f}" if (f := text_form(t.storage_type, column)) else "")
    if (pa.types.is_null(t) or pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_floating(t)
            or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)):
        return None
    if _is_binary(t):
        return "hex"
    if pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_time(t) or pa.types.is_duration(t):
        return "ISO 8601 text"
    if pa.types.is_decimal(t):
        return "exact decimal text"
    if pa.types.is_map(t):
        text_form(t.key_type, column)
        text_form(t.item_type, column)
        return "JSON text"
    if _is_list(t):
        return None if text_form(t.value_type, column) is None else "members as text"
    if pa.types.is_struct(t):
        forms = [text_form(t.field(i).type, column) for i in range(t.num_fields)]
        return None if all(f is None for f in forms) else "members as text"
    raise InputError(f"input column {column!r} has type {t}, which img2dataset cannot carry; convert it "
                     f"(or leave it out: list the columns to keep in input.extra_columns)")


def json_safe(table):
    """``table`` with every column :func:`text_form` converts carried as text (the same values, whatever the
    batches: the single list and each part's batches are converted alike)."""
    import pyarrow as pa

    for i, f in enumerate(table.schema):
        if text_form(f.type, f.name) is not None:
            col = table.column(i)
            chunks = [_safe_array(c) for c in col.chunks]
            typ = chunks[0].type if chunks else _safe_array(pa.array([], f.type)).type
            table = table.set_column(i, pa.field(f.name, typ), pa.chunked_array(chunks, type=typ))
    return table


def _safe_array(arr):
    """One array, converted as the table above says (recursively for lists and structs)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = arr.type
    if text_form(t) is None:
        return arr
    if pa.types.is_dictionary(t):
        return _safe_array(arr.dictionary_decode())
    if isinstance(t, pa.BaseExtensionType):
        if t.extension_name == "arrow.uuid":
            import uuid

            return pa.array([None if v is None else str(uuid.UUID(bytes=v)) for v in arr.storage.to_pylist()],
                            pa.string())
        return _safe_array(arr.storage)
    if _is_binary(t):
        return pa.array([None if v is None else v.hex() for v in arr.to_pylist()], pa.string())
    if pa.types.is_timestamp(t):  # Arrow's text is 2020-01-02 03:04:05.123[Z|+0100]: made ISO 8601
        text = pc.replace_substring(arr.cast(pa.string()), " ", "T", max_replacements=1)
        return pc.replace_substring_regex(text, r"([+-]\d\d)(\d\d)$", r"\1:\2")
    if pa.types.is_date(t) or pa.types.is_time(t) or pa.types.is_decimal(t):
        return arr.cast(pa.string())
    if pa.types.is_duration(t):
        from decimal import Decimal

        digits = {"s": 0, "ms": 3, "us": 6, "ns": 9}[t.unit]
        return pa.array([None if n is None else f"{'-' if n < 0 else ''}PT{Decimal(abs(n)).scaleb(-digits):f}S"
                         for n in arr.cast(pa.int64()).to_pylist()], pa.string())
    if pa.types.is_map(t):
        import json

        return pa.array([None if v is None else json.dumps(v, ensure_ascii=False, separators=(",", ":"))
                         for v in _plain(arr)], pa.string())
    mask = arr.is_null() if arr.null_count else None
    if pa.types.is_fixed_size_list(t):
        n = t.list_size
        values = _safe_array(arr.values.slice(arr.offset * n, len(arr) * n))
        return pa.FixedSizeListArray.from_arrays(values, n, mask=mask)
    if _is_list(t):
        offsets = arr.offsets
        start = offsets[0].as_py()
        values = _safe_array(arr.values.slice(start, offsets[-1].as_py() - start))
        offsets = pc.subtract(offsets, pa.scalar(start, offsets.type))
        cls = pa.LargeListArray if pa.types.is_large_list(t) else pa.ListArray
        return cls.from_arrays(offsets, values, mask=mask)
    children = [_safe_array(c) for c in arr.flatten()]  # struct: children adjusted to the slice
    fields = [pa.field(t.field(i).name, c.type) for i, c in enumerate(children)]
    return pa.StructArray.from_arrays(children, fields=fields, mask=mask)


def _plain(arr) -> list:
    """Python values of ``arr`` for JSON text: maps as dicts (string keys) or [key, value] pairs, other
    members converted as :func:`_safe_array` converts them."""
    import pyarrow as pa

    t = arr.type
    if pa.types.is_dictionary(t):
        return _plain(arr.dictionary_decode())
    if pa.types.is_map(t) or (pa.types.is_list(t) or pa.types.is_large_list(t)) and _holds_map(t):
        offsets = arr.offsets.to_pylist()
        valid = arr.is_valid().to_pylist()
        if pa.types.is_map(t):
            keys, items = _plain(arr.keys), _plain(arr.items)
            as_dict = pa.types.is_string(t.key_type) or pa.types.is_large_string(t.key_type)
            rows = []
            for i, ok in enumerate(valid):
                pairs = list(zip(keys[offsets[i]:offsets[i + 1]], items[offsets[i]:offsets[i + 1]], strict=True))
                rows.append(None if not ok else dict(pairs) if as_dict else [list(p) for p in pairs])
            return rows
        values = _plain(arr.values)
        return [values[offsets[i]:offsets[i + 1]] if ok else None for i, ok in enumerate(valid)]
    if pa.types.is_struct(t) and _holds_map(t):
        names = [t.field(i).name for i in range(t.num_fields)]
        cols = [_plain(c) for c in arr.flatten()]
        return [dict(zip(names, vals, strict=True)) if ok else None
                for ok, *vals in zip(arr.is_valid().to_pylist(), *cols, strict=True)]
    return _safe_array(arr).to_pylist()


def _holds_map(t) -> bool:
    import pyarrow as pa

    if pa.types.is_map(t):
        return True
    if pa.types.is_dictionary(t):
        return _holds_map(t.value_type)
    if _is_list(t):
        return _holds_map(t.value_type)
    if pa.types.is_struct(t):
        return any(_holds_map(t.field(i).type) for i in range(t.num_fields))
    return False
