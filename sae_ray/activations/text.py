"""Text in, packed token contexts out.

`load_documents` streams documents (strings) from local files or a hub
dataset; `pack_documents` tokenizes them, concatenates them with a separator
and cuts the stream into fixed-size contexts, marking which positions hold a
real token (`keep`) so that special tokens and padding never reach an SAE.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from sae_ray.paths import looks_local

# Local file extension -> `datasets` builder.
BUILDERS = {
    ".txt": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


def _local_files(path: str) -> tuple[str, list[str]]:
    """(builder, files) for a local file or a directory of files."""
    p = Path(os.path.expanduser(path))
    if not p.exists():
        raise FileNotFoundError(f"dataset path {path!r} does not exist (resolved to {p.absolute()})")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in BUILDERS)
    if not files:
        raise ValueError(f"dataset directory {path!r} holds no files with extensions {sorted(BUILDERS)}")
    builders = {BUILDERS.get(f.suffix) for f in files}
    if None in builders:
        raise ValueError(f"dataset file {path!r}: extension {p.suffix!r} not supported; expected one of {sorted(BUILDERS)}")
    if len(builders) > 1:
        raise ValueError(f"dataset directory {path!r} mixes file types {sorted(builders)}; keep one type per directory")
    return builders.pop(), [str(f) for f in files]


def load_documents(
    path: str,
    text_column: str = "text",
    split: str = "train",
    name: str | None = None,
    data_files=None,
    streaming: bool | None = None,
    trust_remote_code: bool = False,
) -> Iterator[str]:
    """Yield the non-empty documents of a dataset, one string each.

    path: a local file (`.txt` - one document per line -, `.json`, `.jsonl`,
    `.parquet`, `.csv`), a local directory of such files, or a hub dataset id
    (with `name`, `data_files`). streaming: None means off for local files and
    on for hub datasets. Missing paths and text columns are reported when this
    is called, not at the first document (for non-streaming datasets; a
    streamed one is checked at its first row).
    """
    if looks_local(path):
        if data_files is not None:
            raise ValueError(f"dataset {path!r}: data_files is for hub datasets; give the files as the path")
        builder, files = _local_files(path)
        ds = datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=bool(streaming))
    else:
        kwargs = {}
        if trust_remote_code and "trust_remote_code" in inspect.signature(datasets.load_dataset).parameters:
            kwargs["trust_remote_code"] = True
        streaming = True if streaming is None else streaming
        ds = datasets.load_dataset(path, name, data_files=data_files, split=split, streaming=streaming, **kwargs)

    columns = ds.column_names
    if columns is not None and text_column not in columns:
        raise ValueError(f"dataset {path!r} has no text column {text_column!r}; columns found: {list(columns)}")
    if columns is not None and len(columns) > 1:
        ds = ds.select_columns([text_column])  # don't decode columns we never read
    return _iter_texts(ds, path, text_column)


def _iter_texts(ds, path: str, text_column: str) -> Iterator[str]:
    for i, row in enumerate(ds):
        if i == 0 and text_column not in row:
            raise ValueError(f"dataset {path!r} has no text column {text_column!r}; columns found: {list(row)}")
        text = row[text_column]
        if text is None:
            continue
        if not isinstance(text, str):
            raise ValueError(f"dataset {path!r}: column {text_column!r} holds {type(text).__name__}, expected str")
        if text.strip():
            yield text


def peek_documents(path: str, n: int = 1, **kwargs) -> list[str]:
    """The first `n` documents of a dataset (same arguments as
    `load_documents`); raises ValueError if it yields none. Use it to fail
    fast, before starting any workers."""
    docs = []
    for doc in load_documents(path, **kwargs):
        docs.append(doc)
        if len(docs) >= n:
            break
    if not docs:
        raise ValueError(f"dataset {path!r} yielded no documents (column {kwargs.get('text_column', 'text')!r})")
    return docs


@dataclass
class PackedBatch:
    """A batch of B token contexts of length T."""

    input_ids: np.ndarray
    """[B, T] int64 token ids."""
    attention_mask: np.ndarray
    """[B, T] int64, 0 at padding."""
    doc_index: np.ndarray
    """[B, T] int64 global index of the source document (-1 at padding)."""
    position: np.ndarray
    """[B, T] int32 position of the token in its context."""
    keep: np.ndarray
    """[B, T] bool, False at special tokens and padding: the positions whose activations are used."""


def special_token_mask(tokenizer: PreTrainedTokenizerBase, input_ids: np.ndarray) -> np.ndarray:
    """Boolean mask of `input_ids`' shape, True where the id is one of
    `tokenizer.all_special_ids` (BOS, EOS, PAD, CLS, SEP, UNK, MASK, ...)."""
    return np.isin(np.asarray(input_ids), np.asarray(tokenizer.all_special_ids, dtype=np.int64))


def context_layout(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int], list[int]]:
    """(prefix, suffix, separator) token ids that `pack_documents` uses.

    prefix: [BOS] if the tokenizer has one, else [CLS], else nothing.
    suffix: [SEP] when the prefix is [CLS] (BERT-style `[CLS] ... [SEP]`), else nothing.
    separator between documents: [EOS], else [SEP], else nothing.
    """
    bos, cls = tokenizer.bos_token_id, tokenizer.cls_token_id
    eos, sep = tokenizer.eos_token_id, tokenizer.sep_token_id
    prefix = [bos] if bos is not None else [cls] if cls is not None else []
    suffix = [sep] if bos is None and cls is not None and sep is not None else []
    separator = [eos] if eos is not None else [sep] if sep is not None else []
    return prefix, suffix, separator


def pack_documents(
    tokenizer: PreTrainedTokenizerBase,
    docs: Iterable[str],
    context_size: int,
    batch_size: int,
    doc_offset: int = 0,
) -> Iterator[PackedBatch]:
    """Tokenize, concatenate and cut documents into contexts of `context_size`.

    Documents are tokenized without special tokens and joined with a
    separator (see `context_layout`). Each context is
    `prefix + window + suffix`, where the window holds the next
    `context_size - len(prefix) - len(suffix)` tokens of the stream, so every
    context starts (and, for BERT, ends) the way the model expects. A
    separator that would open a window is dropped (the prefix already marks a
    start). The final partial context is padded (attention 0, keep False).
    Yields batches of `batch_size` contexts; the last may be smaller.

    doc_index counts every document of `docs` from `doc_offset` (also those
    that tokenize to nothing); separators belong to the document before them,
    prefix/suffix to the first/last document of their window.
    """
    prefix, suffix, separator = context_layout(tokenizer)
    window = context_size - len(prefix) - len(suffix)
    if window < 1:
        raise ValueError(
            f"context_size {context_size} is too small: {len(prefix) + len(suffix)} positions go to "
            f"special tokens; expected at least {len(prefix) + len(suffix) + 1}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be at least 1")
    pad = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)

    rows: list[tuple[list[int], list[int]]] = []  # (token ids, doc ids) per context
    tokens: list[int] = []  # the stream not yet cut into windows
    owners: list[int] = []

    def make_row(toks: list[int], docs_: list[int]) -> tuple[list[int], list[int]]:
        return prefix + toks + suffix, docs_[:1] * len(prefix) + docs_ + docs_[-1:] * len(suffix)

    def cut(final: bool) -> None:
        nonlocal tokens, owners
        start = 0
        while True:
            # a separator right after the prefix adds nothing: skip it
            while start < len(tokens) and separator and tokens[start] == separator[0]:
                start += 1
            if len(tokens) - start >= window or (final and start < len(tokens)):
                end = min(start + window, len(tokens))
                rows.append(make_row(tokens[start:end], owners[start:end]))
                start = end
            else:
                break
        tokens, owners = tokens[start:], owners[start:]

    def emit(n: int) -> PackedBatch:
        batch, rows[:] = rows[:n], rows[n:]
        ids = np.full((len(batch), context_size), pad, dtype=np.int64)
        doc = np.full((len(batch), context_size), -1, dtype=np.int64)
        mask = np.zeros((len(batch), context_size), dtype=np.int64)
        for i, (t, d) in enumerate(batch):
            ids[i, : len(t)] = t
            doc[i, : len(d)] = d
            mask[i, : len(t)] = 1
        position = np.broadcast_to(np.arange(context_size, dtype=np.int32), ids.shape).copy()
        keep = (mask == 1) & ~special_token_mask(tokenizer, ids)
        return PackedBatch(input_ids=ids, attention_mask=mask, doc_index=doc, position=position, keep=keep)

    index = doc_offset
    previous: int | None = None  # index of the last document that had tokens
    for chunk in _chunks(docs, 64):
        encoded = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            if ids:
                if previous is not None:
                    tokens += separator
                    owners += [previous] * len(separator)
                tokens += ids
                owners += [index] * len(ids)
                previous = index
            index += 1
        cut(final=False)
        while len(rows) >= batch_size:
            yield emit(batch_size)
    cut(final=True)
    while rows:
        yield emit(min(batch_size, len(rows)))


def _chunks(items: Iterable[str], n: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
