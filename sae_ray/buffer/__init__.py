"""The activation buffer: a sharded Zarr v3 group written by producers, read by trainers.

Ray-free throughout: the store (store.py, with its bookkeeping in commits.py), the reader,
the coordinator's ledger (ledger.py), the producers' background writer (writer.py) and the
progress display (progress.py); ``sae_ray.actors`` wraps the ledger and the writer in actors.
"""

from .errors import CorruptShardError, FingerprintMismatch, ShardDroppedError, ShardWriteError
from .importer import import_activations
from .info import buffer_info, format_info, format_problems
from .layout import CODECS, COLUMNS, FORMAT_VERSION
from .reader import BufferReader
from .records import CommitState, Problem
from .store import ActivationBuffer

__all__ = [
    "ActivationBuffer",
    "BufferReader",
    "CODECS",
    "COLUMNS",
    "CommitState",
    "CorruptShardError",
    "FingerprintMismatch",
    "FORMAT_VERSION",
    "Problem",
    "ShardDroppedError",
    "ShardWriteError",
    "buffer_info",
    "format_info",
    "format_problems",
    "import_activations",
]
