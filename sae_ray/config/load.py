"""Loading a config: YAML from a file (`yamlload`), `--set` overrides, validation with every
problem reported at once as ``field.path: value ...: what is accepted``.
"""

from __future__ import annotations

import copy
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, TypeAdapter, ValidationError

from sae_ray.config.fields import ConfigError, bounded_repr
from sae_ray.config.sections import RunConfig, rule_problems


def _close(word: Any, choices: Any) -> str:
    import difflib

    match = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _schema_of(annotation: Any) -> Any:
    """`annotation` without `| None` and Annotated[...] wrappers."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _schema_kind(annotation: Any) -> str | None:
    """"model", "list", "dict", "value", or None (unknown or Any: not checked)."""
    a = _schema_of(annotation)
    if a is None or a is Any:
        return None
    if isinstance(a, type) and issubclass(a, BaseModel):
        return "model"
    origin = typing.get_origin(a)
    if origin in (list, tuple):
        return "list"
    if origin is dict:
        return "dict"
    return "value"


def _schema_child(annotation: Any, part: str) -> Any:
    a = _schema_of(annotation)
    kind = _schema_kind(a)
    if kind == "model":
        field = a.model_fields.get(part)
        return field.annotation if field is not None else None
    args = typing.get_args(a)
    if kind == "list" and typing.get_origin(a) is list:
        return args[0]
    if kind == "list" and part.isdigit() and int(part) < len(args):  # a tuple
        return args[int(part)]
    if kind == "dict":
        return args[1]
    return None


def _schema_name(annotation: Any) -> str:
    a = _schema_of(annotation)
    if typing.get_origin(a) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(a))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(a, str(a))


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str = "config") -> dict[str, Any]:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested dict; `hooks.0.layer=3` indexes lists.

    Raises ConfigError naming the `--set` item when its value is not YAML or its path leads
    nowhere: an index past a list's end, a name where a list needs an index, a path through a
    value (`train.lr.x`), or into a list the config does not have yet.
    """
    from sae_ray.config.yamlload import YAMLLoadError, load_yaml

    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError([f"--set {item!r}: expected FIELD.PATH=VALUE, e.g. train.lr=1e-4"], source)
        key, value = item.split("=", 1)
        parts = [p.strip() for p in key.strip().split(".")]
        if not all(parts):
            raise ConfigError([f"--set {item!r}: {key.strip()!r} is not a field path (an empty name); e.g. train.lr=1e-4"], source)
        try:
            parsed = load_yaml(value)
        except YAMLLoadError as e:
            raise ConfigError([f"--set {item!r}: the value {value!r} is not valid YAML: {e}"], source) from None
        if not isinstance(raw, dict):
            raise ConfigError([f"--set {item!r}: the config is not a mapping of sections (it is a {type(raw).__name__})"], source)

        def refuse(why: str) -> ConfigError:
            return ConfigError([f"--set {item!r}: {why}"], source)

        node: Any = raw
        schema: Any = RunConfig
        for depth, part in enumerate(parts):
            where = ".".join(parts[:depth])
            here = ".".join(parts[: depth + 1])
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not re.fullmatch(r"[0-9]+", part) or int(part) >= len(node):
                    has = f"indices 0..{len(node) - 1}" if node else "no items"
                    raise refuse(f"{where} is a list of {len(node)} item(s) ({has}); {part!r} is not one of its indices")
                index: Any = int(part)
            elif isinstance(node, dict):
                index = part
            else:
                raise refuse(f"{where} is a value ({bounded_repr(node)}), not a section or a list; it has no {part!r}")
            schema = _schema_child(schema, part)
            if last:
                node[index] = parsed
                break
            kind = _schema_kind(schema)
            present = node[index] if isinstance(node, list) else node.get(index)
            if kind == "value":
                shown = bounded_repr(present) if present is not None else _schema_name(schema)
                raise refuse(f"{here} is a value ({shown}), not a section or a list; it has no {parts[depth + 1]!r}")
            if present is None:
                if kind == "list":
                    raise refuse(f"{here} is not in the config, so it has no item {parts[depth + 1]!r}; "
                                 f"set the whole list instead, e.g. --set '{here}=[...]'")
                node[index] = present = {}
            node = present
    return raw


def _fields_at(path: list[str]) -> list[str]:
    """The field names of the section at `path` (list indices skipped), [] if it is not a section."""

    def model_in(annotation: Any) -> type[BaseModel] | None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
        return next((m for m in map(model_in, typing.get_args(annotation)) if m is not None), None)

    model: type[BaseModel] | None = RunConfig
    for part in path:
        if part.isdigit():
            continue
        field = model.model_fields.get(part) if model is not None else None
        model = model_in(field.annotation) if field is not None else None
        if model is None:
            return []
    return sorted(model.model_fields) if model is not None else []


def _format_pydantic(err: ValidationError, prefix: str = "") -> list[str]:
    out = []
    for e in err.errors():
        parts = [str(p) for p in (prefix, *e["loc"]) if p != ""]
        loc = ".".join(parts)
        shown = "<missing>" if e["type"] == "missing" else bounded_repr(e.get("input"))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            accepted = _fields_at(parts[:-1])
            msg = "unknown field" + (_close(parts[-1], accepted) + f"; accepted: {accepted}" if accepted else "")
        if e["type"] == "too_short" and loc == "hooks":
            msg += "; give at least one hook point, e.g. hooks: [{layer: 3, site: resid_post}]"
        out.append(f"{loc}: value {shown}: {msg}")
    return out


def validate_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a raw dict; raise ConfigError listing every problem found."""
    fields = RunConfig.model_fields
    if not isinstance(raw, dict):
        raise ConfigError([f"top level: value {bounded_repr(raw)}: expected a mapping of sections ({', '.join(fields)}); "
                           "at least model, data and hooks"], source)
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for key in raw:
        if key not in fields:
            problems.append(f"{key}: unknown section{_close(key, fields)}; accepted: {sorted(fields)}")
    # Validate each section on its own so that one bad section doesn't hide the rules of another.
    for key, field in fields.items():
        if key not in raw:
            continue
        try:  # with the field's own constraints (e.g. hooks' min_length), not only its type
            annotation = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
            sections[key] = TypeAdapter(annotation).validate_python(raw[key])
        except ValidationError as e:
            problems.extend(_format_pydantic(e, key))
    try:
        cfg = RunConfig.model_validate({k: v for k, v in raw.items() if k in fields})
    except ValidationError as e:
        cfg = None
        for p in _format_pydantic(e):
            if p.split(":")[0].split(".")[0] not in sections and p not in problems:
                problems.append(p)  # missing sections
        if not problems:  # never let a refused config through with nothing said
            problems = _format_pydantic(e)
    problems.extend(rule_problems(sections))
    if problems:
        raise ConfigError(problems, source)
    assert cfg is not None
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (`sae_ray.yamlload`: at most 1 MiB of UTF-8, no duplicate keys, bounded
    nesting and aliases), apply `--set` overrides, validate. Raises FileNotFoundError when there
    is no such file and ConfigError for everything else wrong with it."""
    from sae_ray.config.yamlload import YAMLLoadError, read_yaml_file

    path = Path(path)
    try:
        raw = read_yaml_file(path)
    except YAMLLoadError as e:
        raise ConfigError([str(e)], str(path)) from None
    if raw is None:
        raise ConfigError(["the file is empty (or only comments); a config is a mapping with at least "
                           "the sections model, data and hooks"], str(path))
    return validate_config(apply_overrides(raw, overrides or [], str(path)), str(path))
