"""Damage done to a buffer's shard object on disk, for the integrity tests."""

import os

KINDS = ["chunk_byte", "index_byte", "truncated", "empty", "deleted"]
"""What `damage` can do: flip a byte of the first chunk or of the shard index, cut the file in
half, empty it, delete it."""


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def damage(path, kind: str) -> None:
    """Damage the object file at `path` in one of the ways of KINDS."""
    size = os.path.getsize(path)
    if kind == "chunk_byte":
        flip_byte(path, 20 % size)
    elif kind == "index_byte":
        flip_byte(path, size - 10)
    elif kind == "truncated":
        os.truncate(path, size // 2)
    elif kind == "empty":
        os.truncate(path, 0)
    elif kind == "deleted":
        os.remove(path)
    else:
        raise ValueError(f"damage: unknown kind {kind!r}; accepted: {KINDS}")
