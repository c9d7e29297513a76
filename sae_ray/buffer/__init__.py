"""The activation buffer: a sharded Zarr v3 group written by producers, read by trainers."""

from .reader import BufferReader
from .store import FORMAT_VERSION, ActivationBuffer, FingerprintMismatch

__all__ = ["ActivationBuffer", "BufferReader", "FingerprintMismatch", "FORMAT_VERSION"]
