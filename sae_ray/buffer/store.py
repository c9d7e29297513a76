"""The activation buffer: one Zarr v3 group on disk (or any fsspec URL).

Layout (``R`` = capacity in rows, always a multiple of ``shard_rows``)::

    <path>/                     group; attributes below
      acts/<hook_name>          (R, d_in)  float32 | float16 | uint16 (bfloat16 bits)
      tokens                    (R,)       int32   token id of the row
      doc_index                 (R,)       int64   which document (sequence) the row came from
      position                  (R,)       int32   position of the token in that sequence

      readers/<reader_id>.json  not Zarr: which shards a reader has passed (``write_reader_progress``)

    attributes: format_version, fingerprint, hooks {name: d_in}, dtype, shard_rows,
                chunk_rows, codec, codec_level, arrays {name: array record},
                committed {str(shard_id): commit record} (live shards only),
                dropped {str(shard_id): n_rows}, complete, window_bytes, production

Every array is Zarr-sharded: one shard = ``shard_rows`` rows (written whole, once, by
one producer), one chunk = ``chunk_rows`` rows. Shard ``s`` holds rows
``[s * shard_rows, s * shard_rows + n)`` in one object per array; a shard exists for
readers only once the coordinator has committed it. Only the coordinator changes
attributes or array shapes (``ensure_capacity``, ``commit_shard``, ``mark_complete``);
producers only call ``write_shard``. Nothing here knows about Ray. The bookkeeping
(commits, drops, window, reader progress) is the ``CommitLog`` mixin (commits.py).

Integrity: the commit record is the authority (records.py). It holds the shard's rows and,
per array, the size and a 128-bit hash (XXH3) of the shard object as written; the array
records hold each array's metadata (dtype, chunk and shard shape, codecs) from creation.
Every read fetches the whole shard object once, checks its size and hash against the record
and the array's zarr.json against its record, and decodes it in memory; inside the object
each chunk carries a crc32c too. Any disagreement (a flipped, truncated, missing or swapped
object, another dtype in zarr.json, an edited record) raises ``CorruptShardError`` naming
the shard and the array; ``verify()`` checks everything and lists each problem.

Bounded window: the coordinator may ``drop_shard`` a committed shard once every reader
has passed it (``reader_progress``); its objects are deleted, it leaves ``committed()``
and shows in ``dropped()``. A buffer with a window (``set_window``) or any dropped shard
is read once (single epoch) by ``BufferReader``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import torch
import zarr

from sae_ray.dtypes import STORAGE_DTYPES, bits_to_bfloat16, bits_to_float32

from .commits import CommitLog
from .errors import CorruptShardError, FingerprintMismatch, ShardWriteError
from .layout import (
    COLUMNS, FORMAT_VERSION, LAYOUT_KEYS, compressors, diff, encode_object, is_local, join, json_normalise,
    normalise_path, object_key, validate_layout, validate_shard,
)
from .objects import ShardObjects
from .records import Problem, array_record, metadata_differences, object_entry, record_problem

_REPRODUCE = "Re-produce the buffer, or read with on_corrupt='skip' to skip this shard"


class ActivationBuffer(ShardObjects, CommitLog):
    """Handle on one buffer (local directory or fsspec URL). Cheap to create; every process opens its own.

    Attributes (fixed at creation): ``path``, ``fingerprint``, ``hooks`` ({name: d_in}),
    ``shard_rows``, ``chunk_rows``, ``dtype`` (logical: float32 | float16 | bfloat16),
    ``codec`` (zstd | lz4 | none), ``codec_level``. Commit state (``commit_state()``,
    ``committed()``, ``dropped()``, ``is_complete()``) is re-read from the store on every
    call, since other processes change it.
    """

    def __init__(self, path: str, attrs: dict[str, Any]):
        """Use ``create_or_open`` or ``open``."""
        self.path = path
        self.fingerprint: dict = attrs["fingerprint"]
        self.hooks: dict[str, int] = {k: int(v) for k, v in attrs["hooks"].items()}
        self.shard_rows: int = int(attrs["shard_rows"])
        self.chunk_rows: int = int(attrs["chunk_rows"])
        self.dtype: str = attrs["dtype"]
        self.codec: str = attrs["codec"]
        self.codec_level: int = int(attrs["codec_level"])
        self._root: zarr.Group | None = None
        self._fs_cache: tuple[Any, str] | None = None

    # ------------------------------------------------------------------ opening

    @classmethod
    def create_or_open(cls, path: str | os.PathLike, fingerprint: dict, hooks: dict[str, int], shard_rows: int,
                       chunk_rows: int, dtype: str = "float32", capacity_rows: int = 0, codec: str = "zstd",
                       codec_level: int = 1) -> "ActivationBuffer":
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
        path = normalise_path(path)
        if not isinstance(fingerprint, dict):
            raise ValueError(f"fingerprint for buffer at {path!r} must be a dict, got {type(fingerprint).__name__}")
        fingerprint = json_normalise(fingerprint, f"fingerprint for buffer at {path!r}")
        validate_layout(hooks, shard_rows, chunk_rows, dtype, capacity_rows, codec, codec_level)
        given = {"hooks": dict(hooks), "dtype": dtype, "shard_rows": shard_rows, "chunk_rows": chunk_rows}

        attrs = cls._read_attrs(path)  # None if nothing there
        if attrs is None:
            attrs = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, **given, "codec": codec,
                     "codec_level": codec_level, "arrays": {}, "committed": {}, "dropped": {}, "complete": False}
            zarr.create_group(path, attributes=attrs, zarr_format=3)
        else:
            differences = diff(attrs["fingerprint"], fingerprint)
            differences.update(diff({k: attrs.get(k) for k in LAYOUT_KEYS}, given))
            if differences:
                raise FingerprintMismatch(path, differences)

        buf = cls(path, attrs)
        buf._create_missing_arrays(attrs)  # also finishes a creation that was interrupted
        rows = buf._array_rows().values()
        buf.ensure_capacity(max(math.ceil(capacity_rows / shard_rows), max(rows) // shard_rows))
        return buf

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ActivationBuffer":
        """Open an existing buffer (producers, trainers; local path or fsspec URL). FileNotFoundError if absent."""
        path = normalise_path(path)
        attrs = cls._read_attrs(path)
        if attrs is None:
            raise FileNotFoundError(f"no activation buffer at {path!r}: create it first with ActivationBuffer.create_or_open")
        buf = cls(path, attrs)
        missing = [n for n in buf.array_names() if n not in buf._group() or n not in attrs["arrays"]]
        if missing:
            raise ValueError(f"buffer at {path!r} is missing arrays {missing}; reopen it with create_or_open to finish creating it")
        return buf

    @staticmethod
    def _read_attrs(path: str) -> dict[str, Any] | None:
        """Attributes of the buffer at ``path``; None if nothing is there. Writes nothing."""
        try:
            group = zarr.open_group(path, mode="r", use_consolidated=False)
        except FileNotFoundError:
            if is_local(path) and os.path.exists(path):
                if not os.path.isdir(path) or os.listdir(path):
                    raise ValueError(f"{path!r} exists and is not an activation buffer (no Zarr group there); "
                                     "use an empty or new directory") from None
            return None
        except zarr.errors.ContainsArrayError:
            raise ValueError(f"{path!r} is a Zarr array, not an activation buffer group; use another path") from None
        attrs = dict(group.attrs)
        if "format_version" not in attrs or "fingerprint" not in attrs:
            raise ValueError(f"{path!r} is a Zarr group but not an activation buffer (no format_version/fingerprint attributes); use another path")
        if attrs["format_version"] != FORMAT_VERSION:
            raise ValueError(
                f"buffer at {path!r} has format_version {attrs['format_version']!r}; this code reads only {FORMAT_VERSION} "
                "(every shard committed with the sizes and checksums of its objects). Re-produce the buffer: "
                "delete that directory or use a new path")
        return attrs

    # ------------------------------------------------------------------ arrays

    def array_names(self) -> list[str]:
        """Every array: ``acts/<hook>`` per hook, then the columns ``tokens``, ``doc_index``, ``position``."""
        return [f"acts/{h}" for h in self.hooks] + list(COLUMNS)

    def _group(self) -> zarr.Group:
        if self._root is None:
            self._root = zarr.open_group(self.path, mode="r+", use_consolidated=False)
        return self._root

    def _create_missing_arrays(self, attrs: dict[str, Any]) -> None:
        root = self._group()
        acts = root["acts"] if "acts" in root else root.create_group("acts")
        common = {"compressors": compressors(self.codec, self.codec_level), "fill_value": 0}
        for hook, d_in in self.hooks.items():
            if hook not in acts:
                acts.create_array(hook, shape=(0, d_in), dtype=STORAGE_DTYPES[self.dtype], chunks=(self.chunk_rows, d_in),
                                  shards=(self.shard_rows, d_in), attributes={"logical_dtype": self.dtype}, **common)
        for name, np_dtype in COLUMNS.items():
            if name not in root:
                root.create_array(name, shape=(0,), dtype=np_dtype, chunks=(self.chunk_rows,), shards=(self.shard_rows,),
                                  **common)
        records = dict(attrs.get("arrays", {}))
        missing = [n for n in self.array_names() if n not in records]
        if missing:
            records.update({n: array_record(self._read_metadata(n)) for n in missing})
            self._update_attrs({"arrays": records})

    def _array_rows(self) -> dict[str, int]:
        """Current row count of every array, fresh from the store."""
        root = self._group()
        return {name: root[name].shape[0] for name in self.array_names()}

    def capacity_rows(self) -> int:
        """Rows every array can hold now (a multiple of shard_rows), read from the store."""
        return min(self._array_rows().values())

    def ensure_capacity(self, n_shards: int) -> None:
        """Coordinator only: grow every array to at least ``n_shards * shard_rows`` rows."""
        if not isinstance(n_shards, int) or n_shards < 0:
            raise ValueError(f"n_shards must be an int >= 0, got {n_shards!r}")
        rows = n_shards * self.shard_rows
        root = self._group()
        for name in self.array_names():
            arr = root[name]
            if arr.shape[0] < rows:
                arr.resize((rows, *arr.shape[1:]))

    def _read_metadata(self, name: str) -> dict[str, Any]:
        """The array's zarr.json, fresh from the store."""
        fs, root = self._fs()
        return json.loads(fs.cat_file(f"{root}/{name}/zarr.json"))

    def _checked_metadata(self, name: str, attrs: dict[str, Any]) -> tuple[dict[str, Any] | None, str, str]:
        """(the array's zarr.json, "", its path) if it agrees with the array record in ``attrs``;
        else (None, what is wrong, its path)."""
        where = join(self.path, f"{name}/zarr.json")
        recorded = attrs.get("arrays", {}).get(name)
        if recorded is None:
            return None, f"the buffer has no record of array {name!r} (attribute 'arrays')", join(self.path, "zarr.json")
        try:
            meta = self._read_metadata(name)
            found = array_record(meta)
        except FileNotFoundError:
            return None, f"{where} is missing", where
        except (ValueError, KeyError, TypeError, IndexError) as e:
            return None, f"{where} is unreadable ({type(e).__name__}: {e})", where
        differences = metadata_differences(recorded, found)
        if differences:
            return None, f"{where} differs from the array's record at creation: {'; '.join(differences)}", where
        return meta, "", where

    # ------------------------------------------------------------------ writing

    def write_shard(self, shard_id: int, acts: dict[str, np.ndarray | torch.Tensor], tokens: np.ndarray | torch.Tensor,
                    doc_index: np.ndarray | torch.Tensor, position: np.ndarray | torch.Tensor) -> dict[str, dict[str, Any]]:
        """Producer: write ``n <= shard_rows`` rows at ``[shard_id * shard_rows, +n)``; returns
        {array: {"nbytes", "xxh3_128"}} of the objects written, for ``commit_shard``.

        acts: {hook: [n, d_in]} for exactly the buffer's hooks, in the buffer's dtype
        (numpy or torch; for bfloat16 a torch.bfloat16 tensor or its bits as numpy uint16).
        tokens, doc_index, position: [n] integers. Each array's shard object is encoded in
        memory and stored whole, in one go. Attributes are not touched: the coordinator
        commits the shard afterwards. If the store refuses the write (disk full,
        permission denied, read-only) ``ShardWriteError`` names the shard and the object;
        nothing committed is changed and the same shard may be written again later.
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
        arrays = validate_shard(where, self.hooks, self.dtype, self.shard_rows, acts,
                                {"tokens": tokens, "doc_index": doc_index, "position": position})

        written = {}
        for name, a in arrays.items():
            meta, problem, _ = self._checked_metadata(name, attrs)
            if meta is None:
                raise ValueError(f"{where}: cannot write array {name!r}: {problem}")
            if meta["shape"][0] < (shard_id + 1) * self.shard_rows:
                rows = meta["shape"][0]
                raise ValueError(f"buffer at {self.path!r}: array {name!r} has {rows} rows ({rows // self.shard_rows} shards) "
                                 f"but rows up to {(shard_id + 1) * self.shard_rows} are needed; the coordinator must call "
                                 f"ensure_capacity({shard_id + 1}) first")
            data = encode_object(meta, self.shard_rows, a)
            key = object_key(name, shard_id)
            try:
                self._put_object(key, data)
            except Exception as e:  # noqa: BLE001 - any refusal of the store; the original is chained
                raise ShardWriteError(
                    f"{where}: the store refused to write array {name!r} to {join(self.path, key)} ({type(e).__name__}: {e}). "
                    "The shard is not committed and committed shards are untouched; free space or fix "
                    "permissions, then write this shard again", shard_id, join(self.path, key)) from e
            written[name] = object_entry(data)
        return written

    # ------------------------------------------------------------------ reading

    def _corrupt(self, shard_id: int, name: str, problem: str, key: str) -> CorruptShardError:
        return CorruptShardError(f"buffer at {self.path!r}: shard {shard_id} of array {name!r} is corrupt: {problem}. "
                                 f"{_REPRODUCE}", shard_id, key, name)

    def _read(self, name: str, shard_id: int, start: int, stop: int | None) -> np.ndarray:
        """Stored rows [start, stop) of a committed shard of array ``name``, checked against its records."""
        attrs = self._attrs()
        record = self._record(shard_id, attrs)
        problem = record_problem(shard_id, record, self.array_names())
        if problem:
            raise self._corrupt(shard_id, name, problem, join(self.path, "zarr.json"))
        n = int(record["rows"])
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise IndexError(f"buffer at {self.path!r}, shard {shard_id}: rows [{start}, {stop}) out of range; the shard has {n} rows")
        meta, problem, key = self._checked_metadata(name, attrs)
        if meta is not None:
            rows, problem, key = self._decode_checked(name, shard_id, record["objects"][name], meta, start, stop)
            if rows is not None:
                return rows
        self._record(shard_id)  # dropped meanwhile (bounded window)? then ShardDroppedError, not damage
        raise self._corrupt(shard_id, name, problem, key)

    def read_rows(self, hook: str, shard_id: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of a committed shard as numpy [n, d_in] with the stored values:
        float32 or float16; bfloat16 buffers give float32 (exact: every bfloat16 is a float32).
        Use ``read_tensor`` for torch.bfloat16 itself. Damage: ``CorruptShardError``."""
        a = self._read(self._acts(hook), shard_id, start, stop)
        return bits_to_float32(a) if self.dtype == "bfloat16" else a

    def read_tensor(self, hook: str, shard_id: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Like ``read_rows`` but a CPU torch tensor [n, d_in] in the logical dtype
        (float32 | float16 | bfloat16, bit-exact)."""
        a = self._read(self._acts(hook), shard_id, start, stop)
        return bits_to_bfloat16(a) if self.dtype == "bfloat16" else torch.from_numpy(a)

    def _acts(self, hook: str) -> str:
        if hook not in self.hooks:
            raise KeyError(f"buffer at {self.path!r} has no hook {hook!r}; hooks: {sorted(self.hooks)}")
        return f"acts/{hook}"

    def read_column(self, name: str, shard_id: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of ``tokens`` (int32), ``doc_index`` (int64) or ``position`` (int32)."""
        if name not in COLUMNS:
            raise KeyError(f"buffer at {self.path!r}: no column {name!r}; columns: {list(COLUMNS)}")
        return self._read(name, shard_id, start, stop)

    def read_tokens(self, shard_id: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Token ids [n] (int32) of rows [start, stop) of a committed shard."""
        return self.read_column("tokens", shard_id, start, stop)

    # ------------------------------------------------------------------ verifying

    def verify(self) -> list[Problem]:
        """Check every committed shard of every array (acts/<hook>, tokens, doc_index,
        position) against its records as a reader would (fetch, size, hash, decode), and
        every array's metadata. Returns one ``Problem`` per thing wrong; [] if all is sound.
        Reads only."""
        attrs = self._attrs()
        problems = []
        if "checksums" in attrs:
            problems.append(Problem(None, "attributes", f"attribute 'checksums' is {attrs['checksums']!r}: format "
                                    f"{FORMAT_VERSION} always checksums and records every shard, so it is never read; "
                                    "something edited the attributes"))
        metadata = {}
        for name in self.array_names():
            meta, problem, _ = self._checked_metadata(name, attrs)
            if meta is None:
                problems.append(Problem(None, name, problem))
            metadata[name] = meta
        for key, record in sorted(attrs["committed"].items(), key=lambda kv: int(kv[0])):
            shard_id = int(key)
            problem = record_problem(shard_id, record, self.array_names())
            if problem:
                problems.append(Problem(shard_id, "record", problem))
                continue
            for name, meta in metadata.items():
                if meta is not None:
                    rows, problem, _ = self._decode_checked(name, shard_id, record["objects"][name], meta, 0, record["rows"])
                    if rows is None:
                        problems.append(Problem(shard_id, name, problem))
        return problems

    def __repr__(self) -> str:
        return f"ActivationBuffer({self.path!r}, hooks={self.hooks}, dtype={self.dtype}, shard_rows={self.shard_rows})"

