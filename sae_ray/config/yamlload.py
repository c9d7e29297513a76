"""Reading config YAML safely: bounded, strict about duplicates, one-line errors. No Ray, no torch.

PyYAML's `safe_load` is safe from code execution but not from the rest of what a config file
can hold: a duplicate key silently wins over the first, a deeply nested document overflows
the stack (RecursionError), an alias bomb ("billion laughs") is small on disk but expands to
billions of nodes for whatever walks it next, and a file that is not UTF-8 or a huge integer
raises plain Python errors. `ConfigLoader` refuses all of these while the document is being
composed, before anything expensive happens, and `YAMLLoadError` says what and where in one
line (no file name: the caller adds it).

It also reads exponent floats the way YAML 1.2 (and JSON) do: PyYAML implements YAML 1.1,
where `1e-4` is the *string* '1e-4' and only `1.0e-4` is a float.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_BYTES = 1 << 20
"""Largest config file read (1 MiB); real configs are a few KiB."""
MAX_DEPTH = 50
"""Deepest nesting accepted; real configs nest 3 or 4 levels."""
MAX_NODES = 100_000
"""Most nodes a document may expand to, every alias counted as the whole node it repeats."""

_MERGE = "tag:yaml.org,2002:merge"
_INT = "tag:yaml.org,2002:int"
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class YAMLLoadError(ValueError):
    """Text or a file that is not acceptable config YAML; the message is one line."""


def _line(mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "somewhere"


class ConfigLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses duplicate keys, nesting deeper than `MAX_DEPTH`, and
    documents that expand (aliases included) to more than `MAX_NODES` nodes; all checked
    while composing, so an alias bomb is refused before it is expanded."""

    def __init__(self, stream):
        super().__init__(stream)
        self._segments: list[str | None] = []  # the path of the node being composed
        self._sizes: dict[int, int] = {}  # id(node) -> nodes it expands to
        self._total = 0

    def _where(self) -> str:
        path = [s for s in self._segments if s is not None]
        if len(path) > 6:
            return ".".join(path[:3]) + " ... " + ".".join(path[-2:])
        return ".".join(path)

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            target = self.anchors.get(event.anchor)
            if target is not None:
                size = self._sizes.get(id(target))
                if size is None:
                    raise YAMLLoadError(f"{_line(event.start_mark)}: alias *{event.anchor} refers to a node that "
                                        "contains it (a recursive structure); a config cannot be recursive")
                self._count(size, event.start_mark, f"alias *{event.anchor}")
            return super().compose_node(parent, index)  # also reports an undefined alias
        event = self.peek_event()
        if isinstance(index, int):
            segment: str | None = str(index)
        elif isinstance(index, ScalarNode):
            segment = index.value
        elif isinstance(index, Node):
            segment = "?"
        else:  # the root, or a mapping key
            segment = None
        self._segments.append(segment)
        if len(self._segments) > MAX_DEPTH:
            raise YAMLLoadError(f"{_line(event.start_mark)}: nested deeper than {MAX_DEPTH} levels "
                                f"(at {self._where() or 'the top'}); a config nests a few levels")
        self._count(1, event.start_mark, "this node")
        node = super().compose_node(parent, index)
        if isinstance(node, ScalarNode) and node.tag == _INT and len(node.value) > 40:
            raise YAMLLoadError(f"{self._where() or _line(node.start_mark)}: value {node.value[:20]}...: an integer with "
                                f"{len(node.value):,} digits is far too large (at {_line(node.start_mark)})")
        self._segments.pop()
        if isinstance(node, SequenceNode):
            size = 1 + sum(self._sizes[id(child)] for child in node.value)
        elif isinstance(node, MappingNode):
            size = 1 + sum(self._sizes[id(k)] + self._sizes[id(v)] for k, v in node.value)
            self._check_duplicates(node, segment)
        else:
            size = 1
        self._sizes[id(node)] = size
        return node

    def _count(self, n: int, mark, what: str) -> None:
        self._total += n
        if self._total > MAX_NODES:
            raise YAMLLoadError(
                f"{_line(mark)}: {what} makes the document expand past {MAX_NODES:,} nodes "
                "(aliases count as everything they repeat: an alias bomb?); a config needs a few hundred")

    def _check_duplicates(self, node: MappingNode, segment: str | None) -> None:
        seen: dict[tuple[str, str], int] = {}
        self._segments.append(segment)
        where = self._where()
        self._segments.pop()
        for key, _ in node.value:
            if not isinstance(key, ScalarNode) or key.tag == _MERGE:
                continue
            ident = (key.tag, key.value)
            if ident in seen:
                path = f"{where}.{key.value}" if where else key.value
                raise YAMLLoadError(
                    f"{path}: duplicate key {key.value!r} at {_line(key.start_mark)} (first at line {seen[ident]}); "
                    "YAML would silently keep only one of them: give each key once")
            seen[ident] = key.start_mark.line + 1

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            raise YAMLLoadError(f"{_line(node.start_mark)}: integer with {len(node.value):,} digits is far too large") from None


ConfigLoader.add_constructor("tag:yaml.org,2002:int", ConfigLoader.construct_yaml_int)
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def describe_yaml_error(e: yaml.YAMLError) -> str:
    """A PyYAML error as one line: where, what, and a hint for the usual mistakes."""
    if isinstance(e, yaml.reader.ReaderError):
        code = ord(e.character) if isinstance(e.character, str) else e.character
        return f"at character {e.position}: the control character #x{code:04x} is not allowed in YAML"
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        text = f"{_line(mark)}: {e.problem or e.context or 'not valid YAML'}"
        if e.context and e.problem:
            text += f" ({e.context}" + (f" at line {e.context_mark.line + 1}" if e.context_mark else "") + ")"
        if "could not determine a constructor" in text:
            text += "; a config is plain YAML: tags such as !!python/... are refused"
        if "'\\t'" in text:
            text += "; YAML does not allow tabs for indentation: use spaces"
        return text
    return " ".join(str(e).split())


def load_yaml(text: str) -> Any:
    """Parse one YAML document (None for an empty one) with `ConfigLoader`; raise YAMLLoadError."""
    loader = None
    try:
        loader = ConfigLoader(text)  # the reader refuses control characters here
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise YAMLLoadError(describe_yaml_error(e)) from None
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml_file(path: str | Path) -> Any:
    """Read and parse a config file: at most MAX_BYTES of UTF-8 YAML; raise YAMLLoadError (or
    FileNotFoundError when there is no such file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    if path.is_dir():
        raise YAMLLoadError("is a directory, not a YAML file")
    if not path.is_file():
        raise YAMLLoadError("is not a regular file (a device or a pipe?); give a YAML file")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise YAMLLoadError(f"cannot be read: {e.strerror or e}") from None
    if len(data) > MAX_BYTES:
        raise YAMLLoadError(f"is larger than {MAX_BYTES / 2**20:g} MiB, the most a config may be; a config is a few KiB "
                            "(is this the right file?)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        hint = " (it starts with a UTF-16 byte order mark)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise YAMLLoadError(f"not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} (line {line}) "
                            f"cannot be decoded{hint}; save the file as UTF-8") from None
    return load_yaml(text.removeprefix("\ufeff"))
