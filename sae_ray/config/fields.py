"""The pieces every config section is built from: the error type, and field types that refuse
what pydantic's lax mode would let through (booleans for numbers, NaN/inf, huge integers,
unknown devices, tracking URIs MLflow cannot use, Adam betas outside [0, 1), Ray resource
requests that never fit). No I/O.
"""

from __future__ import annotations

import re
import reprlib
import typing
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo, field_validator


class ConfigError(ValueError):
    """One or more problems in a config; `problems` holds one line per problem."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


def bounded_repr(value: Any, limit: int = 120) -> str:
    """repr(value), bounded in size and in the work it takes (a huge or deeply nested value shows its start)."""
    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother, r.maxlong = 3, 80, 80, 40
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = r.maxfrozenset = 8
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."



_INT64_MAX = 2**63 - 1


def _holds_numbers(annotation: Any) -> bool:
    """Whether a field's type is made of ints/floats (float, list[float], tuple[float, float] | None, ...), not bools."""
    if annotation in (int, float):
        return True
    if annotation is bool or typing.get_origin(annotation) is Literal:
        return False
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Annotated:
        args = args[:1]
    return bool(args) and bool not in args and any(_holds_numbers(a) for a in args)


def _check_plain_numbers(value: Any, depth: int = 0) -> None:
    """Refuse what pydantic's lax mode would turn into a number by accident: True/False (YAML's
    yes/no/on/off too) and integers too large for any counter (they overflow torch, numpy, Zarr)."""
    if isinstance(value, bool):
        raise ValueError(f"a boolean ({value}) where a number is expected")
    if isinstance(value, int) and abs(value) > _INT64_MAX:
        raise ValueError(f"integer too large: at most {_INT64_MAX:,} (2**63 - 1)")
    if isinstance(value, (list, tuple)) and depth < 2:
        for v in value:
            _check_plain_numbers(v, depth + 1)


def _device(value: str) -> str:
    from sae_ray.devices import DEVICES

    if value in DEVICES or re.fullmatch(r"cuda:[0-9]+", value):
        return value
    raise ValueError(f"unknown device; accepted: {', '.join(repr(d) for d in DEVICES)} or 'cuda:N' (N: a GPU index)")


Device = Annotated[str, AfterValidator(_device)]
"""A torch device a config may name: sae_ray.devices.DEVICES or 'cuda:N'."""

_DB_SCHEMES = ("postgresql", "mysql", "mssql")  # MLflow's SQLAlchemy stores (with or without +driver)
TRACKING_URIS = "sqlite:///<path>, http://<host>:<port>, https://..., postgresql://..., mysql://..., mssql://..., databricks"
"""What tracking.uri accepts, as error messages show it."""


def _tracking_uri(uri: str) -> str:
    text = uri.strip()
    if not text:
        raise ValueError("empty; leave tracking.uri out for the embedded default (sqlite:///<workdir>/mlflow.db)")
    if text in ("databricks", "databricks-uc"):
        return text
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", text)
    scheme = match.group(1).lower() if match else ""
    rest = text[len(scheme) + 1:] if match else text
    if scheme in ("", "file") or (len(scheme) == 1 and rest[:1] in ("\\", "/")):  # a path, file://, C:\...
        raise ValueError("a file store (a plain path or file://) is refused by MLflow 3 (its filesystem backend "
                         "is in maintenance mode); use sqlite:///<dir>/mlflow.db, or an http(s):// tracking server")
    if scheme == "sqlite":
        if not rest.startswith("///") or len(rest) == 3:
            raise ValueError("sqlite needs a database file: sqlite:///<relative path> or sqlite:////<absolute path>")
        return text
    if scheme in ("http", "https"):
        if not re.match(r"^//[^/?#\s]+", rest):
            raise ValueError(f"{scheme} needs a host: {scheme}://<host>:<port>")
        return text
    if scheme.split("+")[0] in _DB_SCHEMES or scheme in ("databricks", "databricks-uc"):
        return text
    raise ValueError(f"unknown scheme {scheme!r}; accepted: {TRACKING_URIS}")


TrackingURI = Annotated[str, AfterValidator(_tracking_uri)]


def adam_beta(value: float) -> float:
    if not 0 <= value < 1:
        raise ValueError("an Adam beta must be in [0, 1), e.g. (0.9, 0.999)")
    return value


def ray_gpus(value: float) -> float:
    if value > 1 and not float(value).is_integer():
        raise ValueError("Ray gives a share of one GPU (below 1) or whole GPUs (1, 2, ...): a request like 1.5 never fits")
    if 0 < value < 1e-4:
        raise ValueError("Ray counts resources in steps of 0.0001")
    return value


def ray_cpus(value: float) -> float:
    if 0 < value < 1e-4:
        raise ValueError("Ray counts resources in steps of 0.0001")
    return value


class Section(BaseModel):
    """A config section: unknown keys, NaN/inf, booleans for numbers and out-of-range integers are refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _holds_numbers(field.annotation):
            _check_plain_numbers(value)
        return value


