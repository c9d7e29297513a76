"""What a name in a config points at: a local path, or something else (a hub id, a URL, a
`package:` / `builtin:` name). No I/O beyond `os.path.exists`."""

from __future__ import annotations

import os
from pathlib import Path


def looks_local(name: str) -> bool:
    """True when a model or dataset name means a local path (starts with `/`, `.` or `~`, or
    exists) rather than a hub id."""
    return name.startswith(("/", ".", "~")) or os.path.exists(name)


def has_scheme(name: str) -> bool:
    """True for a URL (`s3://...`) or a prefixed name (`package:...`, `builtin:...`, `sqlite:...`)."""
    return "://" in name or ":" in name.split("/")[0]


def absolute(name: str | None) -> str | None:
    """A local path made absolute against the current directory; anything else as it is."""
    if name is None or has_scheme(name) or not looks_local(name):
        return name
    return str(Path(name).expanduser().resolve())
