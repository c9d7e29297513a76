"""The buffer's fixed layout: format version, codecs, columns, path and name rules, and the
codec of one shard object (encode / decode a whole shard in memory). No state here.

A shard object is what Zarr's sharding codec writes for one shard of one array: the
inner chunks (each compressed, then with a crc32c) followed by the shard index (with its
own crc32c). The buffer encodes and decodes whole objects in memory, with the array's
own metadata, so that the bytes it writes and reads are exactly the bytes it hashes.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from typing import Any

import numpy as np
import torch
import zarr
from zarr.buffer import cpu
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.storage import MemoryStore

from sae_ray.dtypes import ACTIVATION_DTYPES, STORAGE_DTYPES, TORCH_DTYPES, to_numpy

FORMAT_VERSION = 2
"""2: commit records (rows, size and hash of every shard object) and array records.
1 (no records) is not read: re-produce such a buffer."""

CODECS = ("zstd", "lz4", "none")
COLUMNS: dict[str, type[np.generic]] = {"tokens": np.int32, "doc_index": np.int64, "position": np.int32}
"""Column name -> stored dtype; one value per row, beside the ``acts/<hook>`` arrays."""

LAYOUT_KEYS = ("hooks", "dtype", "shard_rows", "chunk_rows")
"""Attributes that must match on reopen, besides the fingerprint itself."""

_READER_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")
DECODE_ERRORS = (ValueError, RuntimeError, IndexError, TypeError)
"""What zarr raises while decoding damaged bytes (checksum mismatch, short index, Blosc failure)."""


def json_normalise(value: Any, what: str) -> Any:
    """Round-trip through JSON so tuples become lists etc., as they will be on disk."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be plain JSON (str, int, float, bool, None, lists, dicts): {e}") from e


def diff(stored: dict, given: dict) -> dict[str, tuple[Any, Any]]:
    """{key: (stored, given)} for every key whose values differ ("<absent>" on the side that lacks it)."""
    absent = "<absent>"
    keys = sorted(set(stored) | set(given))
    return {k: (stored.get(k, absent), given.get(k, absent)) for k in keys if stored.get(k, absent) != given.get(k, absent)}


def normalise_path(path: str | os.PathLike) -> str:
    """A local path as given (``file://`` stripped), or an fsspec URL (``s3://...``) as is."""
    path = os.fspath(path)
    if not isinstance(path, str):
        raise ValueError(f"buffer path must be a str or os.PathLike, got {type(path).__name__}")
    return path[len("file://"):] if path.startswith("file://") else path


def is_local(path: str) -> bool:
    return "://" not in path


def join(path: str, key: str) -> str:
    """Human-readable location of ``key`` inside the buffer at ``path``."""
    return os.path.join(path, *key.split("/")) if is_local(path) else f"{path.rstrip('/')}/{key}"


def write_atomically(target: str, data: bytes) -> None:
    """Local file ``target`` holds ``data`` or what it held before, never a part (temp file + rename)."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_reader_id(reader_id: Any, path: str) -> str:
    """A reader id names a file: 1-200 letters, digits, '_', '.', '-', not starting with '.' or '-'."""
    if not isinstance(reader_id, str) or not _READER_ID.match(reader_id):
        raise ValueError(f"buffer at {path!r}: reader_id {reader_id!r} must be 1-200 characters of letters, digits, "
                         "'_', '.', '-' (not starting with '.' or '-')")
    return reader_id


def compressors(codec: str, level: int) -> list:
    """Bytes-to-bytes codecs of every inner chunk: compression (or none), then a crc32c."""
    if codec == "none":
        return [Crc32cCodec()]
    return [BloscCodec(cname=codec, clevel=level, shuffle="shuffle", blocksize=1 << 20), Crc32cCodec()]


def validate_layout(hooks: dict[str, int], shard_rows: int, chunk_rows: int, dtype: str, capacity_rows: int,
                    codec: str, codec_level: int) -> None:
    if not isinstance(hooks, dict) or not hooks:
        raise ValueError(f"hooks must be a non-empty dict {{hook_name: d_in}}, got {hooks!r}")
    for name, d_in in hooks.items():
        if not isinstance(name, str) or not name or "/" in name or name.startswith("__") or name in (".", ".."):
            raise ValueError(f"hook name {name!r} is not usable as an array name: need a non-empty string without '/' not starting with '__'")
        if not isinstance(d_in, int) or isinstance(d_in, bool) or d_in <= 0:
            raise ValueError(f"hooks[{name!r}] (d_in) must be a positive int, got {d_in!r}")
    for field, v in (("shard_rows", shard_rows), ("chunk_rows", chunk_rows)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{field} must be a positive int, got {v!r}")
    if shard_rows % chunk_rows:
        raise ValueError(f"shard_rows ({shard_rows}) must be a multiple of chunk_rows ({chunk_rows})")
    if dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; accepted: {', '.join(ACTIVATION_DTYPES)}")
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r} is not supported; accepted: {', '.join(CODECS)}")
    if not isinstance(codec_level, int) or isinstance(codec_level, bool) or not 0 <= codec_level <= 9:
        raise ValueError(f"codec_level must be an int from 0 to 9 (Blosc levels), got {codec_level!r}")
    if not isinstance(capacity_rows, int) or capacity_rows < 0:
        raise ValueError(f"capacity_rows must be an int >= 0, got {capacity_rows!r}")


def object_key(name: str, shard_id: int) -> str:
    """Store key of the object holding shard ``shard_id`` of array ``name``, e.g. ``acts/h/c/3/0``."""
    ndim = 2 if name.startswith("acts/") else 1
    return f"{name}/c/{shard_id}" + "/0" * (ndim - 1)


def _shard_array(metadata: dict[str, Any], shard_rows: int, obj: bytes | None) -> tuple[zarr.Array, dict, str]:
    """An in-memory array of one shard with ``metadata`` (an array's zarr.json), holding ``obj``
    as its only shard object; and the store dict and the object's key in it."""
    meta = {**metadata, "shape": [shard_rows, *metadata["shape"][1:]]}
    store: dict = {"zarr.json": cpu.Buffer.from_bytes(json.dumps(meta).encode())}
    arr = zarr.open_array(MemoryStore(store), mode="r+", zarr_format=3)
    key = arr.metadata.encode_chunk_key((0,) * len(meta["shape"]))
    if obj is not None:
        store[key] = cpu.Buffer.from_bytes(obj)
    return arr, store, key


def encode_object(metadata: dict[str, Any], shard_rows: int, rows: np.ndarray) -> bytes:
    """The shard object of ``rows`` ([n, ...], n <= shard_rows, written from row 0) as the
    array with ``metadata`` stores it; every chunk is written, even all-fill ones."""
    arr, store, key = _shard_array(metadata, shard_rows, None)
    arr.with_config({"write_empty_chunks": True})[: len(rows)] = rows
    return store[key].to_bytes()


def decode_object(metadata: dict[str, Any], shard_rows: int, obj: bytes, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the shard object ``obj`` of the array with ``metadata``.
    Damaged bytes raise one of ``DECODE_ERRORS``."""
    arr, _, _ = _shard_array(metadata, shard_rows, obj)
    return arr[start:stop]


def validate_shard(where: str, hooks: dict[str, int], dtype: str, shard_rows: int, acts: dict,
                   columns: dict) -> dict[str, np.ndarray]:
    """What ``write_shard`` was given, checked: {array name: numpy rows in the stored dtype},
    acts first, then the columns; or ValueError / TypeError saying what is wrong."""
    out = {}
    for name, x in columns.items():
        a = to_numpy(x, f"{where}: {name}")
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{where}: {name} must be a 1-D integer array, got shape {a.shape} dtype {a.dtype}")
        info = np.iinfo(COLUMNS[name])
        if a.size and (a.min() < info.min or a.max() > info.max):
            raise ValueError(f"{where}: {name} values [{a.min()}, {a.max()}] do not fit {info.dtype}")
        out[name] = a.astype(COLUMNS[name], copy=False)
    n = len(out["tokens"])
    if not 1 <= n <= shard_rows:
        raise ValueError(f"{where}: a shard holds 1 to {shard_rows} rows, got {n}")
    for name, a in out.items():
        if len(a) != n:
            raise ValueError(f"{where}: {name} has {len(a)} rows but tokens has {n}")
    want = STORAGE_DTYPES[dtype]
    acts_out = {}
    for hook, x in acts.items():
        what = f"{where}: acts[{hook!r}]"
        if isinstance(x, torch.Tensor) and x.dtype != TORCH_DTYPES[dtype]:
            raise ValueError(f"{what} is a torch {x.dtype} tensor; this buffer stores {dtype}: convert it first")
        a = to_numpy(x, what)
        if a.dtype != want:
            hint = "a torch.bfloat16 tensor or its bits as numpy uint16" if dtype == "bfloat16" else f"{dtype}"
            raise ValueError(f"{what} has dtype {a.dtype}; this buffer stores {dtype}: pass {hint}")
        if a.shape != (n, hooks[hook]):
            raise ValueError(f"{what} has shape {tuple(a.shape)}, expected ({n}, {hooks[hook]}) = (rows, d_in)")
        acts_out[f"acts/{hook}"] = a
    return {**{f"acts/{h}": acts_out[f"acts/{h}"] for h in hooks}, **out}
