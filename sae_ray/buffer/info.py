"""What a buffer holds and how much room it takes: ``buffer_info(path)``, ``format_info(info)``."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from sae_ray.dtypes import STORAGE_DTYPES

from .layout import COLUMNS
from .records import Problem
from .store import ActivationBuffer


def buffer_info(path: str | os.PathLike, verify: bool = False) -> dict[str, Any]:
    """Figures of the buffer at ``path`` (local or fsspec URL), read without changing anything.

    Keys: path, fingerprint, hooks {name: d_in}, dtype (logical), codec, codec_level,
    shard_rows, chunk_rows, rows and shards_committed (live), rows_dropped and
    shards_dropped, complete, window_bytes, production, bytes_on_disk (live shards, all
    arrays, with shard indexes and checksums), bytes_uncompressed (the same rows as plain
    arrays), compression_ratio (uncompressed / on disk; 0.0 when empty), and per_array
    {name: {bytes_on_disk, bytes_uncompressed, compression_ratio}}. ``verify``: also
    ``problems``, one line per thing ``ActivationBuffer.verify`` found wrong ([]: sound).
    """
    buf = ActivationBuffer.open(path)
    state = buf.commit_state()
    committed, dropped = state.committed, state.dropped
    rows = sum(committed.values())
    on_disk = buf.nbytes_by_array(committed)
    row_bytes = {f"acts/{h}": d * np.dtype(STORAGE_DTYPES[buf.dtype]).itemsize for h, d in buf.hooks.items()}
    row_bytes.update({name: np.dtype(dt).itemsize for name, dt in COLUMNS.items()})
    per_array = {}
    for name, disk in on_disk.items():
        raw = rows * row_bytes[name]
        per_array[name] = {"bytes_on_disk": disk, "bytes_uncompressed": raw, "compression_ratio": _ratio(raw, disk)}
    total_disk = sum(on_disk.values())
    total_raw = sum(a["bytes_uncompressed"] for a in per_array.values())
    info = {
        "path": buf.path,
        "fingerprint": buf.fingerprint,
        "hooks": dict(buf.hooks),
        "dtype": buf.dtype,
        "codec": buf.codec,
        "codec_level": buf.codec_level,
        "shard_rows": buf.shard_rows,
        "chunk_rows": buf.chunk_rows,
        "rows": rows,
        "shards_committed": len(committed),
        "rows_dropped": sum(dropped.values()),
        "shards_dropped": len(dropped),
        "complete": state.complete,
        "window_bytes": state.window_bytes,
        "production": buf.production(),
        "bytes_on_disk": total_disk,
        "bytes_uncompressed": total_raw,
        "compression_ratio": _ratio(total_raw, total_disk),
        "per_array": per_array,
    }
    if verify:
        info["problems"] = [str(p) for p in buf.verify()]
    return info


def format_problems(problems: list[Problem | str], shards: int, arrays: int) -> str:
    """The outcome of a verification as lines: OK, or one line per problem (shard, array, what is wrong)."""
    if not problems:
        return f"verify      OK: {shards} committed shards x {arrays} arrays match their commit records"
    return "\n".join([f"verify      {len(problems)} problem(s):", *(f"  {p}" for p in problems)])


def _ratio(raw: int, disk: int) -> float:
    return raw / disk if disk else 0.0


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def format_info(info: dict[str, Any]) -> str:
    """``buffer_info``'s figures as a few lines for the console."""
    codec = "none" if info["codec"] == "none" else f"blosc {info['codec']} level {info['codec_level']}"
    lines = [
        f"buffer      {info['path']}",
        f"status      {'complete' if info['complete'] else 'not complete (still being produced, or interrupted)'}",
        f"rows        {info['rows']:,} in {info['shards_committed']} shards of up to {info['shard_rows']:,} "
        f"(chunks of {info['chunk_rows']:,})",
    ]
    if info["shards_dropped"] or info["window_bytes"] is not None:
        window = "none" if info["window_bytes"] is None else _size(info["window_bytes"])
        lines.append(f"dropped     {info['rows_dropped']:,} rows in {info['shards_dropped']} shards (window {window})")
    lines += [
        f"dtype       {info['dtype']}",
        f"codec       {codec}, crc32c per chunk; size and xxh3_128 of every shard object in its commit record",
        f"on disk     {_size(info['bytes_on_disk'])} ({_size(info['bytes_uncompressed'])} uncompressed, "
        f"ratio {info['compression_ratio']:.2f}x)",
        "hooks",
    ]
    for hook, d_in in info["hooks"].items():
        a = info["per_array"][f"acts/{hook}"]
        lines.append(f"  {hook}  d_in={d_in}  {_size(a['bytes_on_disk'])} on disk, ratio {a['compression_ratio']:.2f}x")
    lines.append("fingerprint")
    for k, v in info["fingerprint"].items():
        lines.append(f"  {k}: {v}")
    if info["production"]:
        lines.append("production")
        for k, v in info["production"].items():
            lines.append(f"  {k}: {v}")
    return "\n".join(lines)
