"""The activation buffer: a sharded Zarr v3 group written by producers, read by trainers."""

from .importer import import_activations
from .info import buffer_info, format_info
from .reader import BufferReader
from .store import (
    CODECS,
    FORMAT_VERSION,
    ActivationBuffer,
    CorruptShardError,
    FingerprintMismatch,
    ShardDroppedError,
    ShardWriteError,
)

__all__ = [
    "ActivationBuffer",
    "BufferReader",
    "CODECS",
    "CorruptShardError",
    "FingerprintMismatch",
    "FORMAT_VERSION",
    "ShardDroppedError",
    "ShardWriteError",
    "buffer_info",
    "format_info",
    "import_activations",
]
