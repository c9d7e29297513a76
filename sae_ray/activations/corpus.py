"""Built-in offline text: Python's own documentation, for the quickstart and for machines without the hub.

`data.path: builtin:python-docs` is written once to `<workdir>/data/python-docs.jsonl`
(one document per line, column "text") and then loaded through `datasets` like any
local file. It is written by a fresh interpreter that imports nothing but the standard library
(`python -I -S corpus.py OUT`): the docstrings it collects depend on what the calling process
has imported (Ray, for one, replaces `inspect.isgenerator`), and one document more or less
reshuffles the whole corpus, so a driver that had imported Ray and one that had not would hold
out different documents for the same config.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import subprocess
import sys
import warnings
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("python-docs",)


SECTION_CHARS = 2000
"""Longest document of the builtin corpus: longer texts are cut at blank lines into sections of
about this many characters, so the held-out split (by document) holds many documents."""
SHUFFLE_SEED = 0
"""The builtin corpus is written in one fixed random order, so every shard of a buffer made from
it mixes all its kinds of text (language reference, module docs, function docs)."""


def sections(text: str, min_chars: int, max_chars: int = SECTION_CHARS) -> list[str]:
    """`text` cut at blank lines into consecutive pieces of at most about `max_chars` (a paragraph
    longer than that stays whole); a last piece under `min_chars` joins the one before."""
    pieces: list[str] = []
    for para in text.split("\n\n"):
        if pieces and len(pieces[-1]) + len(para) + 2 <= max_chars:
            pieces[-1] += "\n\n" + para
        else:
            pieces.append(para)
    if len(pieces) > 1 and len(pieces[-1]) < min_chars:
        last = pieces.pop()
        pieces[-1] += "\n\n" + last
    return [p for p in pieces if len(p) >= min_chars]


def python_docs(min_chars: int = 200) -> list[str]:
    """Python's help topics (pydoc_data) and the docstrings of standard-library modules, classes and
    functions, cut into sections (`sections`) and shuffled with SHUFFLE_SEED."""
    import random

    from pydoc_data.topics import topics

    docs = [text for _, text in sorted(topics.items())]
    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names and not m.name.startswith("_"))
    skip = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "ensurepip", "venv", "lib2to3"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            if name in skip:
                continue
            try:
                module = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - some stdlib modules need optional system libraries
                continue
            for obj in [module, *(v for _, v in sorted(vars(module).items()) if inspect.isclass(v) or inspect.isfunction(v))]:
                if getattr(obj, "__module__", name) not in (name, None) and obj is not module:
                    continue  # re-exported from elsewhere
                doc = inspect.getdoc(obj)
                if doc and len(doc) >= min_chars:
                    docs.append(doc)
    docs = [part for doc in dict.fromkeys(docs) for part in sections(doc, min_chars)]  # dedupe, then cut
    random.Random(SHUFFLE_SEED).shuffle(docs)
    return docs


def resolve_dataset_path(path: str, workdir: str | Path) -> str:
    """Materialise a `builtin:` dataset under workdir and return its file path; other paths pass through."""
    if not path.startswith(BUILTIN_PREFIX):
        return path
    name = path.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTINS:
        raise ValueError(f"data.path: value {path!r}: unknown builtin dataset; accepted: {[BUILTIN_PREFIX + b for b in BUILTINS]}")
    out = Path(workdir) / "data" / f"{name}.jsonl"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        subprocess.run([sys.executable, "-I", "-S", __file__, str(tmp)], check=True)
        tmp.replace(out)  # atomic: a concurrent reader never sees half a file
    return str(out)


def write_python_docs(path: str | Path) -> None:
    """Write `python_docs()` to path as JSON lines ({"text": ...})."""
    with Path(path).open("w") as f:
        for doc in python_docs():
            f.write(json.dumps({"text": doc}) + "\n")


if __name__ == "__main__":  # the fresh interpreter of `resolve_dataset_path`
    write_python_docs(sys.argv[1])
