"""What the buffer records about its own bytes, and the checks against it. No Zarr, no I/O.

- A **commit record** per live shard, in the group attribute ``committed``::

      {"rows": n, "objects": {array: {"nbytes": size, "xxh3_128": hex}}, "xxh3_128": hex}

  ``objects`` has the size and a 128-bit hash (XXH3-128) of the whole shard object of every
  array, as written; every read checks both. The record's own hash covers the shard id,
  ``rows`` and ``objects``, so an edited row count (or a record copied to another shard) is
  caught too.

  Why XXH3 and not sha256: it runs at ~60 GB/s against ~1.7 GB/s (SHA-NI), so checking every
  object on every read costs ~0.1 ms per 7 MB shard instead of ~4 ms; against accidental
  damage 128 bits are as good, and against deliberate tampering no hash stored beside the
  data helps. Not a crc32c of the object: inner chunks and the index end in their own crc32c,
  which makes a crc32c of the whole object blind to their content (the CRC residue).
- An **array record** per array, in the group attribute ``arrays``, taken at creation:
  the array's Zarr metadata (``zarr.json``) without its row count (which grows with
  capacity): dtype, the rest of the shape, chunk and shard shape, codecs, fill value,
  attributes. Another dtype or codec in ``zarr.json`` later is caught before decoding.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import xxhash

HASH = "xxh3_128"
"""The name of the hash in commit records (the key beside "nbytes")."""


def digest(data: bytes | memoryview) -> str:
    """XXH3-128 of ``data`` as 32 hex digits."""
    return xxhash.xxh3_128_hexdigest(data)


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def object_entry(data: bytes | memoryview) -> dict[str, Any]:
    """{"nbytes", "xxh3_128"} of one shard object's bytes."""
    return {"nbytes": len(data), HASH: digest(data)}


def shard_record(shard_id: int, rows: int, objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The commit record of a shard: its rows, its objects' sizes and hashes, and a hash of all that."""
    body = {"rows": int(rows), "objects": {k: {"nbytes": int(v["nbytes"]), HASH: str(v[HASH])}
                                           for k, v in sorted(objects.items())}}
    return {**body, HASH: digest(_canonical({"shard": int(shard_id), **body}))}


def record_rows(record: Any) -> int:
    """The rows a stored commit record claims (0 if it is malformed: reading it then says why)."""
    try:
        return int(record["rows"])
    except (KeyError, TypeError, ValueError):
        return 0


def record_problem(shard_id: int, record: Any, arrays: list[str]) -> str | None:
    """Why a stored commit record cannot be trusted (malformed, or its hash disagrees with
    its content), or None if it is sound and covers exactly ``arrays``."""
    if not isinstance(record, dict) or not isinstance(record.get("objects"), dict) or HASH not in record:
        return f"its commit record is malformed ({str(record)[:120]!r})"
    try:
        expected = shard_record(shard_id, record["rows"], record["objects"])
    except (KeyError, TypeError, ValueError) as e:
        return f"its commit record is malformed ({type(e).__name__}: {e})"
    if expected[HASH] != record[HASH]:
        return (f"its commit record (rows {record['rows']}) does not match the record's own hash: the group's "
                "attributes were edited or damaged (row count, object sizes or hashes)")
    if sorted(record["objects"]) != sorted(arrays):
        return f"its commit record covers arrays {sorted(record['objects'])}, the buffer has {sorted(arrays)}"
    return None


def array_record(metadata: dict[str, Any]) -> dict[str, Any]:
    """The part of an array's Zarr metadata (its zarr.json as a dict) that never changes:
    everything but the row count (``shape[0]``), which grows with capacity."""
    out = {k: v for k, v in metadata.items() if k != "shape"}
    out["row_shape"] = list(metadata["shape"][1:])
    return json.loads(_canonical(out))


def metadata_differences(recorded: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """'field: found X, recorded Y' for each top-level field that differs."""
    keys = sorted(set(recorded) | set(found))
    return [f"{k}: {_short(found.get(k))} in zarr.json, {_short(recorded.get(k))} at creation"
            for k in keys if recorded.get(k) != found.get(k)]


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if value is not None else "<absent>"
    return text if len(text) <= 160 else text[:157] + "..."


class CommitState(NamedTuple):
    """One snapshot of the commit state, from one read of the group's attributes.

    committed / dropped: {shard_id: rows}, sorted by id; complete: no more commits will
    come; window_bytes: the bounded window (None: none); windowed: a window is set or a
    shard was dropped (readers then read each shard once)."""

    committed: dict[int, int]
    dropped: dict[int, int]
    complete: bool
    window_bytes: int | None
    windowed: bool

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> "CommitState":
        committed = {int(k): record_rows(v) for k, v in attrs["committed"].items()}
        dropped = {int(k): int(v) for k, v in attrs.get("dropped", {}).items()}
        window = attrs.get("window_bytes")
        return cls(dict(sorted(committed.items())), dict(sorted(dropped.items())), bool(attrs.get("complete", False)),
                   window, window is not None or bool(dropped))


class Problem(NamedTuple):
    """One thing ``ActivationBuffer.verify`` found wrong: shard (None: every shard, or the
    buffer as a whole); array (``acts/<hook>``, ``tokens``, ``doc_index``, ``position``, or
    "record" for the shard's commit record, "attributes" for the group's); what is wrong.
    ``str()`` is the line ``buffer info --verify`` prints."""

    shard: int | None
    array: str
    problem: str

    def __str__(self) -> str:
        return f"shard {'*' if self.shard is None else self.shard}  {self.array}  {self.problem}"
