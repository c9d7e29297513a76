"""Build a complete buffer from activations saved elsewhere: ``import_activations(src, dst)``.

Sources (by what ``src`` is):

- ``*.npy``: one array ``[n, d]`` (rows) or ``[n_seq, context, d]`` (sequences), read
  memory-mapped, so files larger than memory stream through. The hook name is ``hook``
  or the file's stem.
- ``*.safetensors``: one float tensor per hook point, each ``[n, d]`` or
  ``[n_seq, context, d]`` with the same leading shape; optionally an integer tensor
  ``token_ids`` / ``tokens`` / ``input_ids`` shaped like that leading shape. ``hook``
  picks one tensor.
- a directory written by Hugging Face ``datasets`` (``save_to_disk``), such as the
  activation cache of SAELens's ``CacheActivationsRunner``: one column per hook point
  (each row a ``[d]`` vector or an ``Array2D`` ``[context, d]`` sequence) and
  optionally ``token_ids`` (``[context]`` per row, or one id per row).

Rows keep the source's order (they are not shuffled within shards: the reader mixes
rows of several shards). Unknown token ids, documents and positions are -1; for
sequences, ``doc_index`` is the sequence's index and ``position`` the token's. The
fingerprint records the source (kind, absolute path, size and a sha256 of sampled
bytes), so importing the same source again reuses the buffer, and an interrupted
import continues with the shards not yet committed.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable

import numpy as np
import torch

from sae_ray.dtypes import TORCH_DTYPES

from .store import ActivationBuffer

TOKEN_COLUMNS = ("token_ids", "tokens", "input_ids")
_FLOATS = {"float16": "float16", "float32": "float32", "float64": "float32", "bfloat16": "bfloat16"}
_SAMPLE = 1 << 20  # bytes hashed at each end of a file


class _Source:
    """Rows of a source: ``hooks`` {name: d_in}, ``n_rows``, ``dtype`` (logical),
    ``context`` (tokens per sequence, or None for plain rows) and ``read(lo, hi)``."""

    def __init__(self, kind: str, path: str, hooks: dict[str, int], n_rows: int, dtype: str, context: int | None,
                 get_acts: Callable[[str, int, int], Any], get_tokens: Callable[[int, int], Any] | None):
        self.kind, self.path, self.hooks, self.n_rows, self.dtype, self.context = kind, path, hooks, n_rows, dtype, context
        self._get_acts, self._get_tokens = get_acts, get_tokens

    def read(self, lo: int, hi: int, dtype: str) -> tuple[dict[str, torch.Tensor], np.ndarray, np.ndarray, np.ndarray]:
        """Rows [lo, hi): ({hook: [n, d_in] torch in ``dtype``}, tokens [n], doc_index [n], position [n])."""
        ctx = self.context or 1
        first, last = lo // ctx, -(-hi // ctx)  # sequences (or rows) covering [lo, hi)
        cut = slice(lo - first * ctx, hi - first * ctx)
        acts = {}
        for hook, d_in in self.hooks.items():
            x = self._get_acts(hook, first, last)
            x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
            acts[hook] = x.reshape(-1, d_in)[cut].to(TORCH_DTYPES[dtype]).contiguous()
        rows = np.arange(lo, hi)
        if self._get_tokens is not None:
            t = self._get_tokens(first, last)
            t = t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
            tokens = t.reshape(-1)[cut].astype(np.int64)
        else:
            tokens = np.full(hi - lo, -1, np.int64)
        if self.context:
            doc, pos = rows // self.context, rows % self.context
        else:
            doc, pos = np.full(hi - lo, -1), np.full(hi - lo, -1)
        return acts, tokens, doc.astype(np.int64), pos.astype(np.int64)


def _logical_dtype(name: str, what: str) -> str:
    if name not in _FLOATS:
        raise ValueError(f"{what} has dtype {name}; accepted: {', '.join(_FLOATS)} (float64 is stored as float32)")
    return _FLOATS[name]


def _split_shape(shape: tuple[int, ...], what: str) -> tuple[int, int | None, int]:
    """(n_rows, context or None, d_in) from [n, d] or [n_seq, context, d]."""
    if len(shape) == 2:
        return shape[0], None, shape[1]
    if len(shape) == 3:
        return shape[0] * shape[1], shape[1], shape[2]
    raise ValueError(f"{what} has shape {list(shape)}; accepted: [rows, d_in] or [sequences, context, d_in]")


def _check_hook_name(name: str, src: str) -> str:
    if not name or "/" in name or name.startswith("__"):
        raise ValueError(f"{src}: hook name {name!r} is not usable (need a non-empty name without '/', not starting with '__'); pass hook=")
    return name


def _npy(src: str, hook: str | None) -> _Source:
    a = np.load(src, mmap_mode="r", allow_pickle=False)
    n, ctx, d = _split_shape(a.shape, f"{src}")
    name = _check_hook_name(hook or os.path.splitext(os.path.basename(src))[0], src)
    dtype = _logical_dtype(a.dtype.name, src)
    return _Source("npy", src, {name: d}, n, dtype, ctx, lambda h, i, j: np.array(a[i:j]), None)


def _safetensors(src: str, hook: str | None) -> _Source:
    from safetensors import safe_open

    f = safe_open(src, framework="pt")
    keys = list(f.keys())
    dtypes = {k: str(f.get_slice(k).get_dtype()) for k in keys}  # "F16", "BF16", "F32", "I64", ...
    names = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
    token_keys = [k for k in TOKEN_COLUMNS if k in keys and dtypes[k].startswith(("I", "U"))]
    float_keys = [k for k in keys if dtypes[k] in names]
    if hook is not None:
        if hook not in float_keys:
            raise ValueError(f"{src}: no float tensor {hook!r}; float tensors: {float_keys}")
        float_keys = [hook]
    if not float_keys:
        raise ValueError(f"{src}: no float tensor to import; tensors: {dtypes}")
    lead, hooks, kinds = None, {}, set()
    for k in float_keys:
        shape = tuple(f.get_slice(k).get_shape())
        n, ctx, d = _split_shape(shape, f"{src}: tensor {k!r}")
        if lead is not None and shape[:-1] != lead:
            raise ValueError(f"{src}: tensor {k!r} has leading shape {list(shape[:-1])} but {float_keys[0]!r} has {list(lead)}; "
                             "every hook point needs the same rows (import one with hook=)")
        lead = shape[:-1]
        hooks[_check_hook_name(k, src)] = d
        kinds.add(_logical_dtype(names[dtypes[k]], f"{src}: tensor {k!r}"))
    if len(kinds) > 1:
        raise ValueError(f"{src}: hook tensors have different dtypes {sorted(kinds)}; pass dtype= to convert them to one")
    get_tokens = None
    if token_keys:
        tk = token_keys[0]
        if tuple(f.get_slice(tk).get_shape()) != lead:
            raise ValueError(f"{src}: token tensor {tk!r} has shape {f.get_slice(tk).get_shape()}, expected {list(lead)}")
        get_tokens = lambda i, j: f.get_slice(tk)[i:j]  # noqa: E731
    n, ctx, _ = _split_shape(lead + (1,), src)
    return _Source("safetensors", src, hooks, n, kinds.pop(), ctx, lambda h, i, j: f.get_slice(h)[i:j], get_tokens)


def _leaf_dtype(feature: Any) -> str | None:
    """The scalar dtype inside a datasets feature (Value, List, Sequence, Array2D), or None."""
    while feature is not None and not hasattr(feature, "dtype"):
        feature = getattr(feature, "feature", None)
    return getattr(feature, "dtype", None)


def _hf_dataset(src: str, hook: str | None) -> _Source:
    import datasets

    ds = datasets.load_from_disk(src)
    if isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"{src} holds several splits {list(ds)}; pass the directory of one split, e.g. {os.path.join(src, list(ds)[0])}")
    if len(ds) == 0:
        raise ValueError(f"{src}: the dataset has no rows")
    npds = ds.with_format("numpy")
    first = npds[0]
    hooks, kinds, ctx_of = {}, set(), {}
    token_col = next((c for c in TOKEN_COLUMNS if c in ds.column_names), None)
    for col in ds.column_names:
        leaf = _leaf_dtype(ds.features[col])
        if col == token_col or leaf not in _FLOATS or (hook is not None and col != hook):
            continue
        shape = np.asarray(first[col]).shape
        if len(shape) not in (1, 2):
            raise ValueError(f"{src}: column {col!r} rows have shape {list(shape)}; accepted: [d_in] or [context, d_in]")
        hooks[_check_hook_name(col, src)] = shape[-1]
        ctx_of[col] = shape[0] if len(shape) == 2 else None
        kinds.add(_logical_dtype(leaf, f"{src}: column {col!r}"))
    if hook is not None and hook not in hooks:
        raise ValueError(f"{src}: no float column {hook!r}; columns: {ds.column_names}")
    if not hooks:
        raise ValueError(f"{src}: no float activation column; columns: {ds.column_names}")
    if len(set(ctx_of.values())) > 1:
        raise ValueError(f"{src}: columns have different sequence lengths {ctx_of}; import one with hook=")
    if len(kinds) > 1:
        raise ValueError(f"{src}: columns have different dtypes {sorted(kinds)}; pass dtype= to convert them to one")
    ctx = next(iter(ctx_of.values()))
    get_tokens = None
    if token_col is not None:
        tshape = np.asarray(first[token_col]).shape
        if tshape != ((ctx,) if ctx else ()):
            raise ValueError(f"{src}: column {token_col!r} rows have shape {list(tshape)}, expected {[ctx] if ctx else []}")
        tok = ds.select_columns([token_col]).with_format("numpy")
        get_tokens = lambda i, j: tok[i:j][token_col]  # noqa: E731
    # one formatted view per column, so a read decodes only that column; numpy formatting
    # gives float32 for float16 columns: exact, converted back on write
    cols = {h: ds.select_columns([h]).with_format("numpy") for h in hooks}
    return _Source("datasets", src, hooks, len(ds) * (ctx or 1), kinds.pop(), ctx,
                   lambda h, i, j: cols[h][i:j][h], get_tokens)


def _sample_hash(src: str) -> tuple[int, str]:
    """(total bytes, sha256 of each file's relative path, size and first/last MiB)."""
    files = [src] if os.path.isfile(src) else sorted(
        os.path.join(root, f) for root, _, names in os.walk(src) for f in names)
    h, total = hashlib.sha256(), 0
    for p in files:
        size = os.path.getsize(p)
        total += size
        h.update(f"{os.path.relpath(p, src)}\0{size}\0".encode())
        with open(p, "rb") as f:
            h.update(f.read(_SAMPLE))
            if size > 2 * _SAMPLE:
                f.seek(size - _SAMPLE)
                h.update(f.read(_SAMPLE))
    return total, h.hexdigest()


def open_source(src: str | os.PathLike, hook: str | None = None) -> _Source:
    """The rows of ``src`` (see the module docstring), without reading them yet."""
    src = os.fspath(src)
    if not os.path.exists(src):
        raise FileNotFoundError(f"no activations at {src!r}")
    if os.path.isdir(src):
        if not os.path.exists(os.path.join(src, "state.json")) and not os.path.exists(os.path.join(src, "dataset_dict.json")):
            raise ValueError(f"{src!r} is a directory but not a Hugging Face datasets save_to_disk directory (no state.json); "
                             "accepted sources: .npy, .safetensors, or a datasets directory")
        return _hf_dataset(src, hook)
    if src.endswith(".npy"):
        return _npy(src, hook)
    if src.endswith(".safetensors"):
        return _safetensors(src, hook)
    raise ValueError(f"{src!r}: unknown source kind; accepted: a .npy file, a .safetensors file, or a datasets directory")


def import_activations(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    hook: str | None = None,
    shard_rows: int = 65_536,
    chunk_rows: int = 4_096,
    dtype: str | None = None,
    codec: str = "zstd",
    codec_level: int = 1,
    fingerprint_extra: dict | None = None,
) -> ActivationBuffer:
    """Write every row of ``src`` into a new, complete buffer at ``dst`` (local or fsspec URL).

    ``hook``: the one hook point to import (a .npy: its name). ``dtype``: the stored dtype
    (float32 | float16 | bfloat16); None keeps the source's (float64 becomes float32).
    ``fingerprint_extra``: more fingerprint keys (e.g. model, dataset), recorded next to
    ``source``. Shards are written in source order; if ``dst`` already holds this import
    it is reused, completed first if it was interrupted.
    """
    source = open_source(src, hook)
    dtype = dtype or source.dtype
    size, digest = _sample_hash(source.path)
    fingerprint = {"source": {"kind": source.kind, "path": os.path.abspath(source.path), "bytes": size,
                              "sample_sha256": digest, "rows": source.n_rows}}
    for k, v in (fingerprint_extra or {}).items():
        if k == "source":
            raise ValueError("fingerprint_extra may not set 'source': the importer records the source itself")
        fingerprint[k] = v
    buf = ActivationBuffer.create_or_open(dst, fingerprint, source.hooks, shard_rows, chunk_rows, dtype,
                                          capacity_rows=source.n_rows, codec=codec, codec_level=codec_level)
    if buf.is_complete():
        return buf
    buf.set_production({"importer": {"source": os.path.abspath(source.path), "kind": source.kind},
                        "row_order": "source order (not shuffled within shards; the reader mixes shards)"})
    done = buf.committed()
    for shard_id in range(-(-source.n_rows // shard_rows)):
        if shard_id in done:
            continue
        lo, hi = shard_id * shard_rows, min((shard_id + 1) * shard_rows, source.n_rows)
        acts, tokens, doc, pos = source.read(lo, hi, dtype)
        objects = buf.write_shard(shard_id, acts, tokens, doc, pos)
        buf.commit_shard(shard_id, hi - lo, objects)
    buf.mark_complete()
    return buf
