"""Read a TensorFlow SavedModel's variables and lookup tables without TensorFlow, and build the LAION
NSFW detector files (``laion_nsfw_*.safetensors`` + ``*_categorical.json``) from LAION's zips.

Formats, hand-parsed (stdlib + numpy):

- protobuf wire format (:func:`fields`): varints, fixed 32/64-bit and length-delimited fields;
- ``variables/variables.index``: an SSTable (LevelDB table: prefix-compressed keys in blocks, an index
  block, a 48-byte footer with magic ``0xdb4775248b80fb57``) mapping each checkpoint key to a
  ``BundleEntryProto`` (dtype 1, shape 2, shard_id 3, offset 4, size 5);
- ``variables/variables.data-00000-of-00001``: the tensors' raw little-endian bytes at those offsets;
- ``saved_model.pb``: the graph's ``Const`` nodes (``AttrValue.tensor``: a ``TensorProto`` with
  ``string_val`` / ``int64_val`` / ``tensor_content``). Autokeras' categorical columns are
  ``StaticHashTable``s initialised in the graph by a call taking (table handle, keys ``Const``, values
  ``Const``); the tables follow the columns' order (the ``encoding_layers/<column>`` keys, ascending).
  The checkpoint's own ``token_counts`` tables are empty (they only count during ``adapt``).
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Any

from t2i_curate.pipeline.core.errors import UserError

SSTABLE_MAGIC = 0xDB4775248B80FB57
# tensorflow DataType enum -> numpy dtype
DTYPES = {1: "<f4", 2: "<f8", 3: "<i4", 4: "u1", 5: "<i2", 6: "i1", 9: "<i8", 10: "?", 19: "<f2"}
DT_STRING, DT_INT64, DT_RESOURCE = 7, 9, 20
ENCODING = "layer_with_weights-0/encoding_layers/"


class SavedModelError(UserError):
    """A file is not the TensorFlow SavedModel (or zip of one) that was expected."""


def varint(buf: bytes, i: int) -> tuple[int, int]:
    """The varint at ``buf[i:]`` and the index after it."""
    out = shift = 0
    while True:
        if i >= len(buf):
            raise SavedModelError("protobuf: a varint runs past the end of its buffer")
        c = buf[i]
        i += 1
        out |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return out, i


def fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """A protobuf message's fields in order: (number, wire type, int or bytes)."""
    out, i = [], 0
    while i < len(buf):
        key, i = varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = varint(buf, i)
        elif wt == 1:
            v, i = struct.unpack_from("<Q", buf, i)[0], i + 8
        elif wt == 2:
            n, i = varint(buf, i)
            v, i = bytes(buf[i : i + n]), i + n
        elif wt == 5:
            v, i = struct.unpack_from("<I", buf, i)[0], i + 4
        else:
            raise SavedModelError(f"protobuf: unsupported wire type {wt} (field {num})")
        out.append((num, wt, v))
    return out


def field(buf: bytes, num: int) -> list[Any]:
    return [v for n, _, v in fields(buf) if n == num]


def _packed_varints(values: list[Any]) -> list[int]:
    """A repeated integer field: packed (bytes) or one varint per occurrence."""
    out: list[int] = []
    for v in values:
        if isinstance(v, bytes):
            i = 0
            while i < len(v):
                x, i = varint(v, i)
                out.append(x)
        else:
            out.append(v)
    return out


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """The (key, value) entries of one uncompressed SSTable block."""
    n_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end, i, key, out = len(block) - 4 - 4 * n_restarts, 0, b"", []
    while i < end:
        shared, i = varint(block, i)
        unshared, i = varint(block, i)
        vlen, i = varint(block, i)
        key = key[:shared] + block[i : i + unshared]
        i += unshared
        out.append((key, block[i : i + vlen]))
        i += vlen
    return out


def _block(data: bytes, handle: bytes) -> bytes:
    off, i = varint(handle, 0)
    size, _ = varint(handle, i)
    if data[off + size] != 0:  # the trailer's compression byte: TF's tensor bundles are uncompressed
        raise SavedModelError(f"SSTable block at {off}: compression type {data[off + size]}, "
                              f"expected 0 (none)")
    return data[off : off + size]


def read_sstable(data: bytes) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a LevelDB-format table, in key order."""
    if len(data) < 48 or struct.unpack_from("<Q", data, len(data) - 8)[0] != SSTABLE_MAGIC:
        raise SavedModelError("variables.index: not an SSTable (no LevelDB table magic in its last 8 bytes)")
    footer = data[-48:]
    _, i = varint(footer, 0)  # metaindex handle: offset, size
    _, i = varint(footer, i)
    index = _block(data, footer[i:])
    return [kv for _, handle in _block_entries(index) for kv in _block_entries(_block(data, handle))]


def read_bundle(index: bytes, data: bytes) -> dict[str, Any]:
    """Checkpoint key -> numpy array, for every numeric tensor of a one-shard tensor bundle
    (string tensors, e.g. the object graph and empty table keys, are left out)."""
    import numpy as np

    out = {}
    for key, value in read_sstable(index):
        if not key:  # the BundleHeaderProto
            continue
        entry = {n: v for n, _, v in fields(value)}
        dtype = entry.get(1, 0)
        if dtype == DT_STRING:
            continue
        if dtype not in DTYPES or entry.get(3, 0) != 0 or 7 in entry:
            raise SavedModelError(f"checkpoint tensor {key.decode()}: dtype {dtype}, "
                                  f"shard {entry.get(3, 0)}, "
                                  f"slices {7 in entry}; expected an unsliced numeric tensor in shard 0")
        shape = [field(d, 1)[0] if field(d, 1) else 0 for d in field(entry.get(2, b""), 2)]
        off, size = entry.get(4, 0), entry.get(5, 0)
        out[key.decode()] = np.frombuffer(data[off : off + size], dtype=DTYPES[dtype]).reshape(shape).copy()
    return out


def tensor_proto(buf: bytes) -> Any:
    """A TensorProto's value: a list of bytes for strings, a numpy array otherwise."""
    import numpy as np

    f = {}
    for n, _, v in fields(buf):
        f.setdefault(n, []).append(v)
    dtype = f.get(1, [0])[0]
    if dtype == DT_STRING:
        return list(f.get(8, []))
    if 4 in f:  # tensor_content
        return np.frombuffer(f[4][0], dtype=DTYPES[dtype]).copy()
    if dtype == DT_INT64:
        return np.array(_packed_varints(f.get(10, [])), dtype=np.uint64).astype(np.int64)
    raise SavedModelError(f"TensorProto of dtype {dtype} without tensor_content: not supported")


def _graph_nodes(saved_model_pb: bytes) -> list[dict[str, Any]]:
    """The top-level graph's nodes: name, op, inputs, attrs (name -> AttrValue bytes)."""
    metas = field(saved_model_pb, 2)
    if not metas:
        raise SavedModelError("saved_model.pb: no MetaGraphDef")
    graph = field(metas[0], 2)[0]
    nodes = []
    for nb in field(graph, 1):
        nodes.append({"name": field(nb, 1)[0].decode(), "op": field(nb, 2)[0].decode(),
                      "inputs": [x.decode() for x in field(nb, 3)],
                      "attrs": {field(a, 1)[0].decode(): field(a, 2)[0] for a in field(nb, 5)}})
    return nodes


def table_initialisers(saved_model_pb: bytes) -> list[tuple[list[bytes], list[int]]]:
    """(keys, values) of each hash table the graph initialises from constants, in the order the tables
    are created (the order of their handle nodes)."""
    nodes = _graph_nodes(saved_model_pb)
    order = {n["name"]: i for i, n in enumerate(nodes)}
    consts = {n["name"]: tensor_proto(field(n["attrs"]["value"], 8)[0]) for n in nodes
              if n["op"] == "Const" and "value" in n["attrs"]}
    found = []
    for n in nodes:
        ins = [x.split(":")[0] for x in n["inputs"] if not x.startswith("^")]
        if n["op"] != "StatefulPartitionedCall" or len(ins) != 3 or not all(x in consts for x in ins[1:]):
            continue
        keys, values = consts[ins[1]], consts[ins[2]]
        if isinstance(keys, list) and not isinstance(values, list) and len(keys) == len(values):
            found.append((order[ins[0]], [k for k in keys], [int(v) for v in values]))
    return [(k, v) for _, k, v in sorted(found)]


def read_zip(zip_path: Path) -> tuple[dict[str, Any], bytes]:
    """(numeric variables, ``saved_model.pb`` bytes) of a zipped SavedModel folder."""
    try:
        with zipfile.ZipFile(zip_path) as z:
            names = z.namelist()

            def member(suffix: str) -> bytes:
                hits = [n for n in names if n.endswith(suffix)]
                if len(hits) != 1:
                    raise SavedModelError(f"{zip_path}: expected one '*{suffix}' in the zip (a SavedModel "
                                          f"folder), found {len(hits)}")
                return z.read(hits[0])

            index = member("variables/variables.index")
            data = member("variables/variables.data-00000-of-00001")
            return read_bundle(index, data), member("saved_model.pb")
    except zipfile.BadZipFile as e:
        raise SavedModelError(f"{zip_path}: not a zip file ({e})") from e


def nsfw_tensors(variables: dict[str, Any]) -> dict[str, Any]:
    """The detector's tensors under the checkpoint's names: every ``layer_with_weights-*`` variable with
    at least one dimension (the Normalization's scalar ``count`` and the metrics are not needed)."""
    return {k: v for k, v in variables.items() if k.startswith("layer_with_weights-") and v.ndim >= 1}


def nsfw_tables(variables: dict[str, Any], saved_model_pb: bytes) -> dict[str, Any]:
    """The categorical lookup tables as ``*_categorical.json`` holds them: columns ascending, each
    ``{"%f" string: index}`` in the graph's order, 0 for a value not in the table."""
    columns = sorted({int(k[len(ENCODING):].split("/")[0]) for k in variables if k.startswith(ENCODING)})
    inits = table_initialisers(saved_model_pb)
    if len(inits) != len(columns):
        raise SavedModelError(f"saved_model.pb: {len(inits)} lookup tables initialised from constants, "
                              f"expected one per categorical column ({columns})")
    tables = {str(c): {k.decode(): v for k, v in zip(keys, values, strict=True)}
              for c, (keys, values) in zip(columns, inits, strict=True)}
    return {"columns": columns, "format": "%f", "oov": 0, "tables": tables}


def write_nsfw_weights(zip_path: Path, dest: Path) -> None:
    """``laion_nsfw_*.safetensors`` from LAION's zip (float32 / int64, the checkpoint's names)."""
    from safetensors.numpy import save_file

    variables, _ = read_zip(zip_path)
    save_file(nsfw_tensors(variables), str(dest))


def write_nsfw_tables(zip_path: Path, dest: Path) -> None:
    """``laion_nsfw_*_categorical.json`` from LAION's zip."""
    variables, pb = read_zip(zip_path)
    Path(dest).write_text(json.dumps(nsfw_tables(variables, pb)), encoding="utf-8")
