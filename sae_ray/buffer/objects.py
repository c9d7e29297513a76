"""Shard objects in the store: fetch, put (whole or not at all), sizes, and the checked
decoding of one object against its commit record. ``ShardObjects`` is a mixin of
``ActivationBuffer`` (store.py), which supplies ``path``, ``shard_rows``, ``array_names``
and ``committed``."""

from __future__ import annotations

import re
from typing import Any, Iterable

import fsspec
import numpy as np

from .layout import DECODE_ERRORS, decode_object, is_local, join, object_key, write_atomically
from .records import HASH, digest


class ShardObjects:
    path: str
    shard_rows: int
    _fs_cache: tuple[Any, str] | None

    def _fs(self) -> tuple[Any, str]:
        """(fsspec filesystem, root path inside it) of the buffer; local paths too."""
        if self._fs_cache is None:
            self._fs_cache = fsspec.core.url_to_fs(self.path)
        return self._fs_cache

    def _get_object(self, name: str, shard_id: int) -> bytes | None:
        """The bytes of shard ``shard_id``'s object of array ``name``; None if there is none."""
        fs, root = self._fs()
        try:
            return fs.cat_file(f"{root}/{object_key(name, shard_id)}")
        except FileNotFoundError:
            return None

    def _put_object(self, key: str, data: bytes) -> None:
        """Store ``data`` as object ``key``, whole or not at all (a local temp file + rename; one PUT elsewhere)."""
        fs, root = self._fs()
        if is_local(self.path):
            write_atomically(f"{root}/{key}", data)
        else:
            fs.pipe_file(f"{root}/{key}", data)

    def _object_size(self, key: str) -> int | None:
        fs, root = self._fs()
        try:
            return int(fs.size(f"{root}/{key}"))
        except FileNotFoundError:
            return None

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
        return sum(self._object_size(object_key(name, shard_id)) or 0 for name in self.array_names())

    def nbytes_by_array(self, shards: Iterable[int] | None = None) -> dict[str, int]:
        """{array name: bytes in the store} over ``shards`` (default: the live committed ones)."""
        wanted = set(self.committed() if shards is None else shards)
        return {name: sum(n for s, n in self._sizes(name).items() if s in wanted) for name in self.array_names()}

    def live_nbytes(self) -> int:
        """Bytes the live committed shards take in the store (what a bounded window counts)."""
        return sum(self.nbytes_by_array().values())

    def _decode_checked(self, name: str, shard_id: int, entry: dict, meta: dict, start: int, stop: int
                        ) -> tuple[np.ndarray | None, str, str]:
        """Fetch the shard object once, check its size and hash against ``entry`` (its part of
        the commit record) and decode rows [start, stop) with ``meta`` (the array's checked
        zarr.json): (rows, "", path) or (None, what is wrong, the object's path)."""
        key = join(self.path, object_key(name, shard_id))
        data = self._get_object(name, shard_id)
        if data is None:
            return None, f"{key} is missing (its commit record has {entry['nbytes']} bytes)", key
        if len(data) != entry["nbytes"]:
            return None, f"{key} holds {len(data)} bytes, its commit record {entry['nbytes']}: truncated or replaced", key
        found = digest(data)
        if found != entry[HASH]:
            return None, (f"the bytes of {key} differ from its commit record ({HASH} {found[:12]}..., recorded "
                          f"{entry[HASH][:12]}...): damaged, or another shard's object"), key
        try:
            return decode_object(meta, self.shard_rows, data, start, stop), "", key
        except DECODE_ERRORS as e:
            return None, f"decoding {key} failed ({type(e).__name__}: {e})", key
