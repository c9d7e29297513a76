"""The activation buffer: one Zarr v3 group on disk (or any fsspec URL).

Layout (``R`` = capacity in rows, always a multiple of ``shard_rows``)::

    <path>/                     group; attributes below
      acts/<hook_name>          (R, d_in)  float32 | float16 | uint16 (bfloat16 bits)
      tokens                    (R,)       int32   token id of the row
      doc_index                 (R,)       int64   which document (sequence) the row came from
      position                  (R,)       int32   position of the token in that sequence

    attributes: format_version, fingerprint, hooks {name: d_in}, dtype, shard_rows,
                chunk_rows, codec, committed {str(shard_id): n_rows}, complete

Every array is Zarr-sharded: one shard = ``shard_rows`` rows (written whole, once, by
one producer), one chunk = ``chunk_rows`` rows (the unit of reading). Shard ``s``
holds rows ``[s * shard_rows, s * shard_rows + n)``; a shard exists for readers only
once the coordinator has committed it. Only the coordinator changes attributes or
array shapes (``ensure_capacity``, ``commit_shard``, ``mark_complete``); producers
only call ``write_shard``. Nothing here knows about Ray.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

FORMAT_VERSION = 1

DTYPES = ("float32", "float16", "bfloat16")
CODECS = ("zstd", "none")
_STORAGE_DTYPE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# column name -> stored dtype
_COLUMNS = {"tokens": np.int32, "doc_index": np.int64, "position": np.int32}
# attributes that must match on reopen, besides the fingerprint itself
_LAYOUT_KEYS = ("hooks", "dtype", "shard_rows", "chunk_rows")


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


def _is_local(path: str) -> bool:
    return "://" not in path


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


def _validate_layout(hooks: dict[str, int], shard_rows: int, chunk_rows: int, dtype: str, capacity_rows: int, codec: str) -> None:
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
    if not isinstance(capacity_rows, int) or capacity_rows < 0:
        raise ValueError(f"capacity_rows must be an int >= 0, got {capacity_rows!r}")


class ActivationBuffer:
    """Handle on one buffer directory. Cheap to create; every process opens its own.

    Attributes (fixed at creation): ``path``, ``fingerprint``, ``hooks`` ({name: d_in}),
    ``shard_rows``, ``chunk_rows``, ``dtype`` (logical: float32 | float16 | bfloat16),
    ``codec``. Commit state (``committed()``, ``is_complete()``) is re-read from disk on
    every call, since other processes change it.
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
        self._root: zarr.Group | None = None
        self._arrays: dict[str, zarr.Array] = {}

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
    ) -> "ActivationBuffer":
        """Create the buffer if absent, or reopen it if its fingerprint and layout match.

        A mismatch in the fingerprint or in hooks / dtype / shard_rows / chunk_rows raises
        ``FingerprintMismatch`` before anything is written; an existing buffer is never
        deleted. ``codec`` only applies at creation (reopening keeps the stored codec).
        ``capacity_rows`` is rounded up to whole shards; on reopen the buffer is grown to it
        if smaller (never shrunk). A non-empty directory or a Zarr node that is not a
        buffer is an error.
        """
        path = os.fspath(path)
        if not isinstance(fingerprint, dict):
            raise ValueError(f"fingerprint for buffer at {path!r} must be a dict, got {type(fingerprint).__name__}")
        fingerprint = _json_normalise(fingerprint, f"fingerprint for buffer at {path!r}")
        _validate_layout(hooks, shard_rows, chunk_rows, dtype, capacity_rows, codec)
        given = {"hooks": dict(hooks), "dtype": dtype, "shard_rows": shard_rows, "chunk_rows": chunk_rows}

        attrs = cls._read_attrs(path)  # None if nothing there
        if attrs is None:
            attrs = {
                "format_version": FORMAT_VERSION,
                "fingerprint": fingerprint,
                **given,
                "codec": codec,
                "committed": {},
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
        """Open an existing buffer (producers, trainers). FileNotFoundError if absent."""
        path = os.fspath(path)
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
        if self.codec == "zstd":
            compressors: Any = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", blocksize=1 << 20)
        else:
            compressors = None
        for hook, d_in in self.hooks.items():
            if hook not in acts:
                acts.create_array(
                    hook,
                    shape=(0, d_in),
                    dtype=_STORAGE_DTYPE[self.dtype],
                    chunks=(self.chunk_rows, d_in),
                    shards=(self.shard_rows, d_in),
                    compressors=compressors,
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
                    compressors=compressors,
                    fill_value=0,
                )

    def _array(self, name: str, min_rows: int = 0) -> zarr.Array:
        """The array ``name``, reopened from disk if our cached shape is too short
        (another process may have grown it). Raises if it is still too short."""
        arr = self._arrays.get(name)
        if arr is None or arr.shape[0] < min_rows:
            arr = self._group()[name]
            self._arrays[name] = arr
        if arr.shape[0] < min_rows:
            have = arr.shape[0] // self.shard_rows
            raise ValueError(
                f"buffer at {self.path!r}: array {name!r} has {arr.shape[0]} rows ({have} shards) but rows up to "
                f"{min_rows} are needed; the coordinator must call ensure_capacity({math.ceil(min_rows / self.shard_rows)}) first"
            )
        return arr

    def _array_rows(self) -> dict[str, int]:
        """Current row count of every array, fresh from disk."""
        root = self._group()
        return {name: root[name].shape[0] for name in self._array_names()}

    def capacity_rows(self) -> int:
        """Rows every array can hold now (a multiple of shard_rows), read from disk."""
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
            self._arrays[name] = arr

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
        tokens, doc_index, position: [n] integers. Each array is written in one go.
        Attributes are not touched: the coordinator commits the shard afterwards.
        """
        where = f"buffer at {self.path!r}, shard {shard_id!r}"
        if not isinstance(shard_id, (int, np.integer)) or isinstance(shard_id, bool) or shard_id < 0:
            raise ValueError(f"{where}: shard_id must be an int >= 0")
        shard_id = int(shard_id)
        if not isinstance(acts, dict) or set(acts) != set(self.hooks):
            got = sorted(acts) if isinstance(acts, dict) else type(acts).__name__
            raise ValueError(f"{where}: acts must have exactly the hooks {sorted(self.hooks)}, got {got}")
        if str(shard_id) in self._committed_raw():
            raise ValueError(f"{where}: shard is already committed; shards are written once (ask the coordinator for a new id)")

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
            self._array(name, lo + self.shard_rows)[lo : lo + n] = a

    # ------------------------------------------------------------------ commit state

    def _committed_raw(self) -> dict[str, int]:
        return dict(zarr.open_group(self.path, mode="r", use_consolidated=False).attrs["committed"])

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
        root = zarr.open_group(self.path, mode="r+", use_consolidated=False)
        committed = dict(root.attrs["committed"])
        old = committed.get(str(shard_id))
        if old is not None and old != n_rows:
            raise ValueError(f"{where}: already committed with {old} rows, cannot recommit with {n_rows}")
        committed[str(shard_id)] = n_rows
        root.update_attributes({"committed": committed})

    def committed(self) -> dict[int, int]:
        """{shard_id: n_rows} of committed shards, sorted by id, read from disk."""
        return {int(k): int(v) for k, v in sorted(self._committed_raw().items(), key=lambda kv: int(kv[0]))}

    def n_rows(self) -> int:
        """Committed rows in total."""
        return sum(self.committed().values())

    def mark_complete(self) -> None:
        """Coordinator only: no more shards will be committed."""
        zarr.open_group(self.path, mode="r+", use_consolidated=False).update_attributes({"complete": True})

    def set_production(self, info: dict[str, Any]) -> None:
        """Coordinator only: how the buffer is being produced (e.g. {"producers": 2}), kept so a resumed run can check it."""
        zarr.open_group(self.path, mode="r+", use_consolidated=False).update_attributes({"production": info})

    def production(self) -> dict[str, Any]:
        """What `set_production` recorded ({} if nothing yet), read from disk."""
        return dict(zarr.open_group(self.path, mode="r", use_consolidated=False).attrs.get("production", {}))

    def is_complete(self) -> bool:
        """Whether the coordinator marked the buffer complete, read from disk."""
        return bool(zarr.open_group(self.path, mode="r", use_consolidated=False).attrs.get("complete", False))

    # ------------------------------------------------------------------ reading

    def _row_range(self, shard_id: int, start: int, stop: int | None) -> tuple[int, int]:
        """Absolute [lo, hi) for rows [start, stop) of a committed shard."""
        committed = self._committed_raw()
        if str(shard_id) not in committed:
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
        return self._array(f"acts/{hook}", hi)[lo:hi]

    def read_rows(self, hook: str, shard_id: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of a committed shard as numpy [n, d_in] with the stored values:
        float32 or float16; bfloat16 buffers give float32 (exact: every bfloat16 is a float32).
        Use ``read_tensor`` for torch.bfloat16 itself."""
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
        return self._array(name, hi)[lo:hi]

    def read_tokens(self, shard_id: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Token ids [n] (int32) of rows [start, stop) of a committed shard."""
        return self.read_column("tokens", shard_id, start, stop)

    def __repr__(self) -> str:
        return f"ActivationBuffer({self.path!r}, hooks={self.hooks}, dtype={self.dtype}, shard_rows={self.shard_rows})"
