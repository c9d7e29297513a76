"""The buffer's errors. Each one pickles with all its fields (``__reduce__``), so it crosses
a Ray boundary (a producer's or a trial's task) as itself, shard id and key included."""

from __future__ import annotations

from typing import Any


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

    def __reduce__(self):
        return type(self), (self.path, self.differences)


class CorruptShardError(ValueError):
    """A committed shard disagrees with its commit record, or cannot be decoded: its object
    is missing, truncated, of another size, has other bytes (flipped, or another shard's),
    its array's metadata (dtype, chunk/shard shape, codecs) changed, or the record itself
    was edited (e.g. its row count).

    ``shard_id``: the shard; ``array``: the array (``acts/<hook>``, ``tokens``, ...);
    ``key``: the damaged thing's path (file or URL): the shard object, the array's
    ``zarr.json``, or the group's ``zarr.json`` for a damaged commit record.
    """

    def __init__(self, message: str, shard_id: int, key: str, array: str | None = None):
        super().__init__(message)
        self.shard_id = shard_id
        self.key = key
        self.array = array

    def __reduce__(self):
        return type(self), (self.args[0], self.shard_id, self.key, self.array)


class ShardWriteError(OSError):
    """The store refused to write a shard (disk full, permission denied, read-only).
    The shard is not committed; committed shards are not touched. ``shard_id``, ``key``."""

    def __init__(self, message: str, shard_id: int, key: str):
        super().__init__(message)
        self.shard_id = shard_id
        self.key = key

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self):
        return type(self), (self.args[0], self.shard_id, self.key)


class ShardDroppedError(KeyError):
    """The shard was dropped by the coordinator (bounded window): its data is gone."""

    def __init__(self, message: str, shard_id: int):
        super().__init__(message)
        self.shard_id = shard_id

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self):
        return type(self), (self.args[0], self.shard_id)
