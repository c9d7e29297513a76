"""The activation buffer: one Zarr v3 group on disk (or any fsspec URL).

Layout (``R`` = capacity in rows, always a multiple of ``shard_rows``)::

    <path>/                     group; attributes below
      acts/<hook_name>          (R, d_in)  float32 | float16 | uint16 (bfloat16 bits)
      tokens                    (R,)       int32   token id of the row
      doc_index                 (R,)       int64   which document (sequence) the row came from
      position                  (R,)       int32   position of the token in that sequence

      readers/<reader_id>.json  not Zarr: which shards a reader has passed (``write_reader_progress``)

    attributes: format_version, fingerprint, hooks {name: d_in}, dtype, shard_rows,
                chunk_rows, codec, codec_level, checksums, committed {str(shard_id): n_rows}
                (live shards only), dropped {str(shard_id): n_rows}, complete, window_bytes,
                production

Every array is Zarr-sharded: one shard = ``shard_rows`` rows (written whole, once, by
one producer), one chunk = ``chunk_rows`` rows (the unit of reading). Shard ``s``
holds rows ``[s * shard_rows, s * shard_rows + n)``; a shard exists for readers only
once the coordinator has committed it. Only the coordinator changes attributes or
array shapes (``ensure_capacity``, ``commit_shard``, ``mark_complete``); producers
only call ``write_shard``. Nothing here knows about Ray.

Integrity: inside each shard object every chunk is compressed (Blosc zstd or lz4, byte
shuffle, 1 MiB blocks, or nothing) and then carries a crc32c; the shard's index carries
one too. Empty chunks are written like any other, so a committed shard always has one
object per array. Reading a shard whose bytes were flipped, truncated or deleted raises
``CorruptShardError`` naming the shard and the object's path.

Bounded window: the coordinator may ``drop_shard`` a committed shard once every reader
has passed it (``reader_progress``); its objects are deleted, it leaves ``committed()``
and shows in ``dropped()``. A buffer with a window (``set_window``) or any dropped shard
is read once (single epoch) by ``BufferReader``.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from typing import Any, Iterable

import fsspec
import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

FORMAT_VERSION = 1

DTYPES = ("float32", "float16", "bfloat16")
CODECS = ("zstd", "lz4", "none")
_STORAGE_DTYPE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# column name -> stored dtype
_COLUMNS = {"tokens": np.int32, "doc_index": np.int64, "position": np.int32}
# attributes that must match on reopen, besides the fingerprint itself
_LAYOUT_KEYS = ("hooks", "dtype", "shard_rows", "chunk_rows")
_READER_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")
# errors zarr raises while decoding damaged bytes (checksum mismatch, short index, Blosc failure)
_DECODE_ERRORS = (ValueError, RuntimeError, IndexError, TypeError)


class FingerprintMismatch(ValueError):
    """An existing buffer was built for something else. Raised before anything is written.

    ``differences`` maps each differing key to ``(stored, given)``; a key absent on one
    side shows as ``"<absent>"``.
    """

    def __init__(self, path: str, differences: dict[str, tuple[Any, Any]]):
        self.path = path
        self.differences = differences
        lines = "; ".join(f"{k}: stored {s!r}, given {g!r}" for k, (s, g) in differences.items())
        super().__init__(
            f"buffer at {path!r} exists with a different fingerprint/layout ({lines}). "
            "Nothing was changed: use a new path, or the same settings to reuse it."
        )


class CorruptShardError(ValueError):
    """A committed shard's stored bytes fail their checksum, are truncated or are missing.

    ``shard_id``: the shard; ``key``: the object's path (file or URL) that is damaged.
    """

    def __init__(self, message: str, shard_id: int, key: str):
        super().__init__(message)
        self.shard_id = shard_id
        self.key = key


class ShardWriteError(OSError):
    """The store refused to write a shard (disk full, permission denied, read-only).
    The shard is not committed; committed shards are not touched. ``shard_id``, ``key``."""

    def __init__(self, message: str, shard_id: int, key: str):
        super().__init__(message)
        self.shard_id = shard_id
        self.key = key


class ShardDroppedError(KeyError):
    """The shard was dropped by the coordinator (bounded window): its data is gone."""

    def __init__(self, message: str, shard_id: int):
        super().__init__(message)
        self.shard_id = shard_id

    def __str__(self) -> str:
        return str(self.args[0])


def _json_normalise(value: Any, what: str) -> Any:
    """Round-trip through JSON so tuples become lists etc., as they will be on disk."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be plain JSON (str, int, float, bool, None, lists, dicts): {e}") from e


def _diff(stored: dict, given: dict) -> dict[str, tuple[Any, Any]]:
    absent = "<absent>"
    keys = sorted(set(stored) | set(given))
    return {k: (stored.get(k, absent), given.get(k, absent)) for k in keys if stored.get(k, absent) != given.get(k, absent)}


def _normalise_path(path: str | os.PathLike) -> str:
    """A local path as given (``file://`` stripped), or an fsspec URL (``s3://...``) as is."""
    path = os.fspath(path)
    if not isinstance(path, str):
        raise ValueError(f"buffer path must be a str or os.PathLike, got {type(path).__name__}")
    return path[len("file://"):] if path.startswith("file://") else path


def _is_local(path: str) -> bool:
    return "://" not in path


def _join(path: str, key: str) -> str:
    """Human-readable location of ``key`` inside the buffer at ``path``."""
    return os.path.join(path, *key.split("/")) if _is_local(path) else f"{path.rstrip('/')}/{key}"


def check_reader_id(reader_id: Any, path: str) -> str:
    """A reader id names a file: 1-200 letters, digits, '_', '.', '-', not starting with '.' or '-'."""
    if not isinstance(reader_id, str) or not _READER_ID.match(reader_id):
        raise ValueError(f"buffer at {path!r}: reader_id {reader_id!r} must be 1-200 characters of letters, digits, "
                         "'_', '.', '-' (not starting with '.' or '-')")
    return reader_id


def _to_numpy(x: Any, what: str) -> np.ndarray:
    """numpy array or (any-device) torch tensor -> numpy; bfloat16 tensors become uint16 bits."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(np.uint16)
        return x.numpy()
    if isinstance(x, np.ndarray):
        return x
    raise TypeError(f"{what} must be a numpy array or torch tensor, got {type(x).__name__}")


def _compressors(codec: str, level: int) -> list:
    """Bytes-to-bytes codecs of every inner chunk: compression (or none), then a crc32c."""
    if codec == "none":
        return [Crc32cCodec()]
    return [BloscCodec(cname=codec, clevel=level, shuffle="shuffle", blocksize=1 << 20), Crc32cCodec()]


def _validate_layout(hooks: dict[str, int], shard_rows: int, chunk_rows: int, dtype: str, capacity_rows: int,
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
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; accepted: {', '.join(DTYPES)}")
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r} is not supported; accepted: {', '.join(CODECS)}")
    if not isinstance(codec_level, int) or isinstance(codec_level, bool) or not 0 <= codec_level <= 9:
        raise ValueError(f"codec_level must be an int from 0 to 9 (Blosc levels), got {codec_level!r}")
    if not isinstance(capacity_rows, int) or capacity_rows < 0:
        raise ValueError(f"capacity_rows must be an int >= 0, got {capacity_rows!r}")


class ActivationBuffer:
    """Handle on one buffer (local directory or fsspec URL). Cheap to create; every process opens its own.

    Attributes (fixed at creation): ``path``, ``fingerprint``, ``hooks`` ({name: d_in}),
    ``shard_rows``, ``chunk_rows``, ``dtype`` (logical: float32 | float16 | bfloat16),
    ``codec`` (zstd | lz4 | none), ``codec_level``. Commit state (``committed()``,
    ``dropped()``, ``is_complete()``) is re-read from the store on every call, since
    other processes change it.
    """

    def __init__(self, path: str, attrs: dict[str, Any]):
        """Use ``create_or_open`` or ``open``."""
        self.path = path
        self.fingerprint: dict = attrs["fingerprint"]
        self.hooks: dict[str, int] = {k: int(v) for k, v in attrs["hooks"].items()}
        self.shard_rows: int = int(attrs["shard_rows"])
        self.chunk_rows: int = int(attrs["chunk_rows"])
        self.dtype: str = attrs["dtype"]
        self.codec: str = attrs.get("codec", "zstd")
        self.codec_level: int = int(attrs.get("codec_level", 1))
        # buffers written before checksums existed have none, and may lack objects of all-zero shards
        self.checksums: bool = bool(attrs.get("checksums", False))
        self._root: zarr.Group | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._fs_cache: tuple[Any, str] | None = None

    # ------------------------------------------------------------------ opening

    @classmethod
    def create_or_open(
        cls,
        path: str | os.PathLike,
        fingerprint: dict,
        hooks: dict[str, int],
        shard_rows: int,
        chunk_rows: int,
        dtype: str = "float32",
        capacity_rows: int = 0,
        codec: str = "zstd",
        codec_level: int = 1,
    ) -> "ActivationBuffer":
        """Create the buffer if absent, or reopen it if its fingerprint and layout match.

        ``path``: a local directory or any fsspec URL (``s3://bucket/buf``, ``gs://...``,
        ``memory://...``; s3fs / gcsfs must be installed for those, credentials come from
        their usual environment). A mismatch in the fingerprint or in hooks / dtype /
        shard_rows / chunk_rows raises ``FingerprintMismatch`` before anything is written;
        an existing buffer is never deleted. ``codec`` (zstd | lz4 | none, Blosc with byte
        shuffle and 1 MiB blocks) and ``codec_level`` (0-9) only apply at creation:
        reopening keeps the stored ones. ``capacity_rows`` is rounded up to whole shards;
        on reopen the buffer is grown to it if smaller (never shrunk). A non-empty
        directory or a Zarr node that is not a buffer is an error.
        """
        path = _normalise_path(path)
        if not isinstance(fingerprint, dict):
            raise ValueError(f"fingerprint for buffer at {path!r} must be a dict, got {type(fingerprint).__name__}")
        fingerprint = _json_normalise(fingerprint, f"fingerprint for buffer at {path!r}")
        _validate_layout(hooks, shard_rows, chunk_rows, dtype, capacity_rows, codec, codec_level)
        given = {"hooks": dict(hooks), "dtype": dtype, "shard_rows": shard_rows, "chunk_rows": chunk_rows}

        attrs = cls._read_attrs(path)  # None if nothing there
        if attrs is None:
            attrs = {
                "format_version": FORMAT_VERSION,
                "fingerprint": fingerprint,
                **given,
                "codec": codec,
                "codec_level": codec_level,
                "checksums": True,
                "committed": {},
                "dropped": {},
                "complete": False,
            }
            zarr.create_group(path, attributes=attrs, zarr_format=3)
        else:
            differences = _diff(attrs["fingerprint"], fingerprint)
            differences.update(_diff({k: attrs.get(k) for k in _LAYOUT_KEYS}, given))
            if differences:
                raise FingerprintMismatch(path, differences)

        buf = cls(path, attrs)
        buf._create_missing_arrays()  # also finishes a creation that was interrupted
        rows = buf._array_rows().values()
        buf.ensure_capacity(max(math.ceil(capacity_rows / shard_rows), max(rows) // shard_rows))
        return buf

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ActivationBuffer":
        """Open an existing buffer (producers, trainers; local path or fsspec URL). FileNotFoundError if absent."""
        path = _normalise_path(path)
        attrs = cls._read_attrs(path)
        if attrs is None:
            raise FileNotFoundError(f"no activation buffer at {path!r}: create it first with ActivationBuffer.create_or_open")
        buf = cls(path, attrs)
        missing = [n for n in buf._array_names() if n not in buf._group()]
        if missing:
            raise ValueError(f"buffer at {path!r} is missing arrays {missing}; reopen it with create_or_open to finish creating it")
        return buf

    @staticmethod
    def _read_attrs(path: str) -> dict[str, Any] | None:
        """Attributes of the buffer at ``path``; None if nothing is there. Writes nothing."""
        try:
            group = zarr.open_group(path, mode="r", use_consolidated=False)
        except FileNotFoundError:
            if _is_local(path) and os.path.exists(path):
                if not os.path.isdir(path) or os.listdir(path):
                    raise ValueError(
                        f"{path!r} exists and is not an activation buffer (no Zarr group there); "
                        "use an empty or new directory"
                    ) from None
            return None
        except zarr.errors.ContainsArrayError:
            raise ValueError(f"{path!r} is a Zarr array, not an activation buffer group; use another path") from None
        attrs = dict(group.attrs)
        if "format_version" not in attrs or "fingerprint" not in attrs:
            raise ValueError(f"{path!r} is a Zarr group but not an activation buffer (no format_version/fingerprint attributes); use another path")
        if attrs["format_version"] != FORMAT_VERSION:
            raise ValueError(f"buffer at {path!r} has format_version {attrs['format_version']!r}; this code reads {FORMAT_VERSION}")
        return attrs

    def _attrs(self) -> dict[str, Any]:
        """The group's attributes, fresh from the store."""
        return dict(zarr.open_group(self.path, mode="r", use_consolidated=False).attrs)

    def _update_attrs(self, values: dict[str, Any]) -> None:
        """Coordinator only: replace these top-level attributes."""
        zarr.open_group(self.path, mode="r+", use_consolidated=False).update_attributes(values)

    # ------------------------------------------------------------------ arrays

    def _array_names(self) -> list[str]:
        return [f"acts/{h}" for h in self.hooks] + list(_COLUMNS)

    def _group(self) -> zarr.Group:
        if self._root is None:
            self._root = zarr.open_group(self.path, mode="r+", use_consolidated=False)
        return self._root

    def _create_missing_arrays(self) -> None:
        root = self._group()
        acts = root["acts"] if "acts" in root else root.create_group("acts")
        for hook, d_in in self.hooks.items():
            if hook not in acts:
                acts.create_array(
                    hook,
                    shape=(0, d_in),
                    dtype=_STORAGE_DTYPE[self.dtype],
                    chunks=(self.chunk_rows, d_in),
                    shards=(self.shard_rows, d_in),
                    compressors=_compressors(self.codec, self.codec_level),
                    fill_value=0,
                    attributes={"logical_dtype": self.dtype},
                )
        for name, np_dtype in _COLUMNS.items():
            if name not in root:
                root.create_array(
                    name,
                    shape=(0,),
                    dtype=np_dtype,
                    chunks=(self.chunk_rows,),
                    shards=(self.shard_rows,),
                    compressors=_compressors(self.codec, self.codec_level),
                    fill_value=0,
                )

    def _array(self, name: str, min_rows: int = 0) -> zarr.Array:
        """The array ``name``, reopened from the store if our cached shape is too short
        (another process may have grown it). Raises if it is still too short."""
        arr = self._arrays.get(name)
        if arr is None or arr.shape[0] < min_rows:
            # every chunk is written, even all-fill ones: a committed shard always has its objects
            arr = self._group()[name].with_config({"write_empty_chunks": True})
            self._arrays[name] = arr
        if arr.shape[0] < min_rows:
            have = arr.shape[0] // self.shard_rows
            raise ValueError(
                f"buffer at {self.path!r}: array {name!r} has {arr.shape[0]} rows ({have} shards) but rows up to "
                f"{min_rows} are needed; the coordinator must call ensure_capacity({math.ceil(min_rows / self.shard_rows)}) first"
            )
        return arr

    def _array_rows(self) -> dict[str, int]:
        """Current row count of every array, fresh from the store."""
        root = self._group()
        return {name: root[name].shape[0] for name in self._array_names()}

    def capacity_rows(self) -> int:
        """Rows every array can hold now (a multiple of shard_rows), read from the store."""
        return min(self._array_rows().values())

    def ensure_capacity(self, n_shards: int) -> None:
        """Coordinator only: grow every array to at least ``n_shards * shard_rows`` rows."""
        if not isinstance(n_shards, int) or n_shards < 0:
            raise ValueError(f"n_shards must be an int >= 0, got {n_shards!r}")
        rows = n_shards * self.shard_rows
        root = self._group()
        for name in self._array_names():
            arr = root[name]
            if arr.shape[0] < rows:
                arr.resize((rows, *arr.shape[1:]))
            self._arrays[name] = arr.with_config({"write_empty_chunks": True})

    # ------------------------------------------------------------------ objects in the store

    def _fs(self) -> tuple[Any, str]:
        """(fsspec filesystem, root path inside it) of the buffer; local paths too."""
        if self._fs_cache is None:
            self._fs_cache = fsspec.core.url_to_fs(self.path)
        return self._fs_cache

    def _key(self, name: str, shard_id: int) -> str:
        """Store key of the object holding shard ``shard_id`` of array ``name``, e.g. ``acts/h/c/3/0``."""
        ndim = 2 if name.startswith("acts/") else 1
        return f"{name}/c/{shard_id}" + "/0" * (ndim - 1)

    def _min_object_bytes(self) -> int:
        """An intact shard object holds at least its index: 16 bytes per chunk + a 4-byte crc32c."""
        return 16 * (self.shard_rows // self.chunk_rows) + 4

    def _object_size(self, key: str) -> int | None:
        fs, root = self._fs()
        try:
            return int(fs.size(f"{root}/{key}"))
        except FileNotFoundError:
            return None

    def _check_object(self, name: str, shard_id: int) -> None:
        """After a read: the shard's object must exist and hold at least its index, since zarr
        reads a missing or empty object as fill values without complaint."""
        if not self.checksums:
            return
        key = self._key(name, shard_id)
        size = self._object_size(key)
        if size is not None and size >= self._min_object_bytes():
            return
        attrs = self._attrs()
        if str(shard_id) in attrs.get("dropped", {}):
            raise ShardDroppedError(f"buffer at {self.path!r}: shard {shard_id} was dropped (bounded window); its rows are gone", shard_id)
        where = _join(self.path, key)
        what = "is missing" if size is None else f"holds {size} bytes, less than its index ({self._min_object_bytes()} bytes): truncated"
        raise CorruptShardError(
            f"buffer at {self.path!r}: shard {shard_id} of array {name!r} is corrupt: {where} {what}. "
            "Re-produce the buffer, or read with on_corrupt='skip' to skip this shard", shard_id, where)

    def _read(self, name: str, shard_id: int, lo: int, hi: int) -> np.ndarray:
        """Stored rows [lo, hi) (absolute) of array ``name``, all inside shard ``shard_id``, checked."""
        arr = self._array(name, hi)
        try:
            out = arr[lo:hi]
        except _DECODE_ERRORS as e:
            where = _join(self.path, self._key(name, shard_id))
            raise CorruptShardError(
                f"buffer at {self.path!r}: shard {shard_id} of array {name!r} is corrupt: reading {where} failed "
                f"({type(e).__name__}: {e}). Re-produce the buffer, or read with on_corrupt='skip' to skip this shard",
                shard_id, where) from e
        self._check_object(name, shard_id)
        return out

    def _sizes(self, name: str) -> dict[int, int]:
        """{shard_id: bytes} of every shard object of array ``name`` in the store (one listing)."""
        fs, root = self._fs()
        prefix = f"{root}/{name}/c"
        fs.invalidate_cache(prefix)
        try:
            found = fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}
        sizes = {}
        tail = "/0" if name.startswith("acts/") else ""
        pattern = re.compile(rf"^{re.escape(prefix.strip('/'))}/(\d+){re.escape(tail)}$")
        for p, info in found.items():
            m = pattern.match(p.strip("/"))
            if m:
                sizes[int(m.group(1))] = int(info["size"])
        return sizes

    def shard_nbytes(self, shard_id: int) -> int:
        """Bytes the shard's objects take in the store, all arrays together (0 once dropped)."""
        return sum(self._object_size(self._key(name, shard_id)) or 0 for name in self._array_names())

    def nbytes_by_array(self, shards: Iterable[int] | None = None) -> dict[str, int]:
        """{array name: bytes in the store} over ``shards`` (default: the live committed ones)."""
        wanted = set(self.committed() if shards is None else shards)
        return {name: sum(n for s, n in self._sizes(name).items() if s in wanted) for name in self._array_names()}

    def live_nbytes(self) -> int:
        """Bytes the live committed shards take in the store (what a bounded window counts)."""
        return sum(self.nbytes_by_array().values())

    # ------------------------------------------------------------------ writing

    def write_shard(
        self,
        shard_id: int,
        acts: dict[str, np.ndarray | torch.Tensor],
        tokens: np.ndarray | torch.Tensor,
        doc_index: np.ndarray | torch.Tensor,
        position: np.ndarray | torch.Tensor,
    ) -> None:
        """Producer: write ``n <= shard_rows`` rows at ``[shard_id * shard_rows, +n)``.

        acts: {hook: [n, d_in]} for exactly the buffer's hooks, in the buffer's dtype
        (numpy or torch; for bfloat16 a torch.bfloat16 tensor or its bits as numpy uint16).
        tokens, doc_index, position: [n] integers. Each array is written in one go, into
        the shard's own object only. Attributes are not touched: the coordinator commits
        the shard afterwards. If the store refuses the write (disk full, permission
        denied, read-only) ``ShardWriteError`` names the shard and the object; nothing
        committed is changed and the same shard may be written again later.
        """
        where = f"buffer at {self.path!r}, shard {shard_id!r}"
        if not isinstance(shard_id, (int, np.integer)) or isinstance(shard_id, bool) or shard_id < 0:
            raise ValueError(f"{where}: shard_id must be an int >= 0")
        shard_id = int(shard_id)
        if not isinstance(acts, dict) or set(acts) != set(self.hooks):
            got = sorted(acts) if isinstance(acts, dict) else type(acts).__name__
            raise ValueError(f"{where}: acts must have exactly the hooks {sorted(self.hooks)}, got {got}")
        attrs = self._attrs()
        if str(shard_id) in attrs["committed"]:
            raise ValueError(f"{where}: shard is already committed; shards are written once (ask the coordinator for a new id)")
        if str(shard_id) in attrs.get("dropped", {}):
            raise ValueError(f"{where}: shard was committed and then dropped; shard ids are never reused (ask the coordinator for a new id)")

        columns = {}
        for name, x in (("tokens", tokens), ("doc_index", doc_index), ("position", position)):
            a = _to_numpy(x, f"{where}: {name}")
            if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"{where}: {name} must be a 1-D integer array, got shape {a.shape} dtype {a.dtype}")
            info = np.iinfo(_COLUMNS[name])
            if a.size and (a.min() < info.min or a.max() > info.max):
                raise ValueError(f"{where}: {name} values [{a.min()}, {a.max()}] do not fit {info.dtype}")
            columns[name] = a.astype(_COLUMNS[name], copy=False)
        n = len(columns["tokens"])
        if not 1 <= n <= self.shard_rows:
            raise ValueError(f"{where}: a shard holds 1 to {self.shard_rows} rows, got {n}")
        for name, a in columns.items():
            if len(a) != n:
                raise ValueError(f"{where}: {name} has {len(a)} rows but tokens has {n}")

        arrays = {}
        want = _STORAGE_DTYPE[self.dtype]
        for hook, x in acts.items():
            what = f"{where}: acts[{hook!r}]"
            if isinstance(x, torch.Tensor) and x.dtype != TORCH_DTYPE[self.dtype]:
                raise ValueError(f"{what} is a torch {x.dtype} tensor; this buffer stores {self.dtype}: convert it first")
            a = _to_numpy(x, what)
            if a.dtype != want:
                hint = "a torch.bfloat16 tensor or its bits as numpy uint16" if self.dtype == "bfloat16" else f"{self.dtype}"
                raise ValueError(f"{what} has dtype {a.dtype}; this buffer stores {self.dtype}: pass {hint}")
            if a.shape != (n, self.hooks[hook]):
                raise ValueError(f"{what} has shape {tuple(a.shape)}, expected ({n}, {self.hooks[hook]}) = (rows, d_in)")
            arrays[f"acts/{hook}"] = a
        arrays.update(columns)

        lo = shard_id * self.shard_rows
        for name, a in arrays.items():
            arr = self._array(name, lo + self.shard_rows)
            try:
                arr[lo : lo + n] = a
            except Exception as e:  # noqa: BLE001 - any refusal of the store; the original is chained
                key = _join(self.path, self._key(name, shard_id))
                raise ShardWriteError(
                    f"{where}: the store refused to write array {name!r} to {key} ({type(e).__name__}: {e}). "
                    "The shard is not committed and committed shards are untouched; free space or fix "
                    "permissions, then write this shard again", shard_id, key) from e

    # ------------------------------------------------------------------ commit state

    def _committed_raw(self) -> dict[str, int]:
        return dict(self._attrs()["committed"])

    def commit_shard(self, shard_id: int, n_rows: int) -> None:
        """Coordinator only: record that shard ``shard_id`` holds ``n_rows`` written rows.
        Committing the same shard again with the same n_rows is a no-op."""
        where = f"buffer at {self.path!r}, shard {shard_id!r}"
        if not isinstance(shard_id, int) or shard_id < 0:
            raise ValueError(f"{where}: shard_id must be an int >= 0")
        if not isinstance(n_rows, int) or not 1 <= n_rows <= self.shard_rows:
            raise ValueError(f"{where}: n_rows must be an int in [1, {self.shard_rows}], got {n_rows!r}")
        if (shard_id + 1) * self.shard_rows > self.capacity_rows():
            raise ValueError(f"{where}: shard lies beyond the capacity ({self.capacity_rows()} rows)")
        attrs = self._attrs()
        if str(shard_id) in attrs.get("dropped", {}):
            raise ValueError(f"{where}: shard was dropped; shard ids are never reused")
        committed = dict(attrs["committed"])
        old = committed.get(str(shard_id))
        if old is not None and old != n_rows:
            raise ValueError(f"{where}: already committed with {old} rows, cannot recommit with {n_rows}")
        committed[str(shard_id)] = n_rows
        self._update_attrs({"committed": committed})

    def committed(self) -> dict[int, int]:
        """{shard_id: n_rows} of committed shards that are live (not dropped), sorted by id, read from the store."""
        return {int(k): int(v) for k, v in sorted(self._committed_raw().items(), key=lambda kv: int(kv[0]))}

    def dropped(self) -> dict[int, int]:
        """{shard_id: n_rows} of shards committed and later dropped (bounded window), sorted by id."""
        raw = self._attrs().get("dropped", {})
        return {int(k): int(v) for k, v in sorted(raw.items(), key=lambda kv: int(kv[0]))}

    def n_rows(self) -> int:
        """Rows in live committed shards."""
        return sum(self.committed().values())

    def mark_complete(self) -> None:
        """Coordinator only: no more shards will be committed."""
        self._update_attrs({"complete": True})

    def set_production(self, info: dict[str, Any]) -> None:
        """Coordinator only: how the buffer is being produced (e.g. {"producers": 2}), kept so a resumed run can check it."""
        self._update_attrs({"production": _json_normalise(info, f"production info for buffer at {self.path!r}")})

    def production(self) -> dict[str, Any]:
        """What `set_production` recorded ({} if nothing yet), read from the store."""
        return dict(self._attrs().get("production", {}))

    def is_complete(self) -> bool:
        """Whether the coordinator marked the buffer complete, read from the store."""
        return bool(self._attrs().get("complete", False))

    # ------------------------------------------------------------------ bounded window

    def set_window(self, max_bytes: int | None) -> None:
        """Coordinator only: record that at most ``max_bytes`` of live shards are kept (None: no window).
        Readers of a windowed buffer read every shard once (one epoch) and then stop."""
        if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0):
            raise ValueError(f"buffer at {self.path!r}: window max_bytes must be a positive int or None, got {max_bytes!r}")
        self._update_attrs({"window_bytes": max_bytes})

    def window_bytes(self) -> int | None:
        """What ``set_window`` recorded (None: no window), read from the store."""
        return self._attrs().get("window_bytes")

    def is_windowed(self) -> bool:
        """A window is set or a shard has been dropped: readers see each shard once."""
        attrs = self._attrs()
        return attrs.get("window_bytes") is not None or bool(attrs.get("dropped"))

    def drop_shard(self, shard_id: int) -> None:
        """Coordinator only: forget a committed shard and delete its objects in every array.

        It leaves ``committed()`` (and ``n_rows()``), shows in ``dropped()``, and is never
        returned by a reader again; its id is never reused. The attributes change first,
        so a crash in between only leaves orphan objects, which dropping again deletes.
        """
        where = f"buffer at {self.path!r}, shard {shard_id!r}"
        if not isinstance(shard_id, int) or isinstance(shard_id, bool) or shard_id < 0:
            raise ValueError(f"{where}: shard_id must be an int >= 0")
        attrs = self._attrs()
        committed, dropped = dict(attrs["committed"]), dict(attrs.get("dropped", {}))
        if str(shard_id) in committed:
            dropped[str(shard_id)] = committed.pop(str(shard_id))
            self._update_attrs({"committed": committed, "dropped": dropped})
        elif str(shard_id) not in dropped:
            raise KeyError(f"{where}: only committed shards can be dropped (committed: {sorted(map(int, committed))})")
        fs, root = self._fs()
        for name in self._array_names():
            path = f"{root}/{self._key(name, shard_id)}"
            try:
                fs.rm(path)
            except FileNotFoundError:
                pass
            if name.startswith("acts/") and _is_local(self.path):  # the now empty c/<shard_id>/ directory
                try:
                    os.rmdir(os.path.dirname(path))
                except OSError:
                    pass

    # ------------------------------------------------------------------ reader progress

    def _progress_dir(self) -> str:
        fs, root = self._fs()
        return f"{root}/readers"

    def write_reader_progress(self, reader_id: str, passed: Iterable[int], epoch: int = 0) -> None:
        """Reader: record the shards it has passed (fully consumed) in ``epoch``, in
        ``<buffer>/readers/<reader_id>.json`` (atomically replaced on local paths; one PUT
        on object stores). Never touches the group's attributes."""
        check_reader_id(reader_id, self.path)
        data = json.dumps({"reader_id": reader_id, "epoch": int(epoch), "passed": sorted(int(s) for s in passed),
                           "updated": time.time()}).encode()
        fs, _ = self._fs()
        target = f"{self._progress_dir()}/{reader_id}.json"
        if _is_local(self.path):
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
        else:
            fs.pipe_file(target, data)

    def reader_progress(self) -> dict[str, set[int]]:
        """{reader_id: shards it has passed in its current epoch}, from ``<buffer>/readers/*.json``."""
        fs, _ = self._fs()
        folder = self._progress_dir()
        fs.invalidate_cache(folder)
        try:
            names = [p for p in fs.ls(folder, detail=False) if p.endswith(".json")]
        except FileNotFoundError:
            return {}
        out = {}
        for p in sorted(names):
            try:
                record = json.loads(fs.cat_file(p))
                out[str(record["reader_id"])] = {int(s) for s in record["passed"]}
            except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
                import warnings

                warnings.warn(f"buffer at {self.path!r}: ignoring unreadable reader progress file {p} ({type(e).__name__}: {e})",
                              RuntimeWarning, stacklevel=2)
        return out

    # ------------------------------------------------------------------ reading

    def _row_range(self, shard_id: int, start: int, stop: int | None) -> tuple[int, int]:
        """Absolute [lo, hi) for rows [start, stop) of a committed shard."""
        attrs = self._attrs()
        committed = attrs["committed"]
        if str(shard_id) not in committed:
            if str(shard_id) in attrs.get("dropped", {}):
                raise ShardDroppedError(f"buffer at {self.path!r}: shard {shard_id} was dropped (bounded window); its rows are gone", shard_id)
            raise KeyError(f"buffer at {self.path!r}: shard {shard_id!r} is not committed (committed: {sorted(map(int, committed))})")
        n = int(committed[str(shard_id)])
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise IndexError(f"buffer at {self.path!r}, shard {shard_id}: rows [{start}, {stop}) out of range; the shard has {n} rows")
        base = shard_id * self.shard_rows
        return base + start, base + stop

    def _read_stored(self, hook: str, shard_id: int, start: int, stop: int | None) -> np.ndarray:
        if hook not in self.hooks:
            raise KeyError(f"buffer at {self.path!r} has no hook {hook!r}; hooks: {sorted(self.hooks)}")
        lo, hi = self._row_range(shard_id, start, stop)
        return self._read(f"acts/{hook}", shard_id, lo, hi)

    def read_rows(self, hook: str, shard_id: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of a committed shard as numpy [n, d_in] with the stored values:
        float32 or float16; bfloat16 buffers give float32 (exact: every bfloat16 is a float32).
        Use ``read_tensor`` for torch.bfloat16 itself. Damaged bytes: ``CorruptShardError``."""
        a = self._read_stored(hook, shard_id, start, stop)
        if self.dtype == "bfloat16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a

    def read_tensor(self, hook: str, shard_id: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Like ``read_rows`` but a CPU torch tensor [n, d_in] in the logical dtype
        (float32 | float16 | bfloat16, bit-exact)."""
        a = self._read_stored(hook, shard_id, start, stop)
        if self.dtype == "bfloat16":
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)

    def read_column(self, name: str, shard_id: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of ``tokens`` (int32), ``doc_index`` (int64) or ``position`` (int32)."""
        if name not in _COLUMNS:
            raise KeyError(f"buffer at {self.path!r}: no column {name!r}; columns: {list(_COLUMNS)}")
        lo, hi = self._row_range(shard_id, start, stop)
        return self._read(name, shard_id, lo, hi)

    def read_tokens(self, shard_id: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Token ids [n] (int32) of rows [start, stop) of a committed shard."""
        return self.read_column("tokens", shard_id, start, stop)

    def __repr__(self) -> str:
        return f"ActivationBuffer({self.path!r}, hooks={self.hooks}, dtype={self.dtype}, shard_rows={self.shard_rows})"
