"""The registry you can query: find registered SAEs by what they are and how good they are,
compare a few side by side, and keep the aliases and descriptions each sweep sets. No Ray.

One row per registered version, a plain dict (JSON as it is):

    name, version, uri ("models:/NAME/VERSION", what `sae_ray.load_sae` takes), model, hook,
    layer, architecture, d_sae, d_in, target_l0, l0, fvu, dead_fraction, verdict,
    aliases (a list), run_id, tags (every version tag as MLflow stores it: strings)

MLflow keeps numbers in tags as strings; here they are compared and sorted as numbers. Only
versions with an `architecture` tag are SAEs (what `tracking.register_sae` writes): other
models a shared tracking server holds are left out.

Aliases a sweep sets on each registered model it trained into (`refresh_model`), among the
versions whose verdict is "ok" only: `best-fvu`, the lowest FVU; `l0-N-best`, the lowest
FVU of those with target_l0 N. They move when a later sweep registers a better SAE.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from sae_ray import tracking

FIELDS = ("name", "version", "uri", "model", "hook", "layer", "architecture", "d_sae", "d_in", "target_l0",
          "l0", "fvu", "dead_fraction", "verdict", "aliases", "run_id", "tags")
"""The keys of a row."""
_NUMBERS = ("d_sae", "d_in", "target_l0", "l0", "fvu", "dead_fraction")
"""The row fields read from a version tag as a number."""
VERDICTS = ("ok", "warn", "stopped")
"""The quality monitor's verdicts (`sae_ray.train.monitor`)."""
BEST_FVU = "best-fvu"
FIND_COLUMNS = ["uri", "architecture", "d_sae", "target_l0", "l0", "fvu", "dead_fraction", "verdict", "aliases"]
"""The columns `sae-ray registry find` prints (and the sort key, when it is another)."""
COMPARE_FIRST = ["model", "hook", "layer", "architecture", "d_sae", "d_in", "expansion_factor", "target_l0", "k",
                 "l1_coefficient", "l0_coefficient", "l0", "fvu", "dead_fraction", "tokens_seen", "verdict",
                 "reasons", "aliases"]
"""The lines `sae-ray registry compare` starts with; every other tag follows, by name."""


class QueryError(ValueError):
    """A filter value, sort key or reference the registry cannot take: it names the parameter,
    the value and what would be accepted."""

    FLAGS = {"tags": "--tag", "ref": "REF"}
    """Parameters whose command-line spelling is not `--` + the name with '-' for '_'."""

    def __init__(self, param: str, value: Any, accepted: str):
        self.param, self.value, self.accepted = param, value, accepted
        super().__init__(f"{param}: value {value!r}: {accepted}")

    def cli_message(self) -> str:
        """The same message with the command-line flag, e.g. "--max-l0: value 'abc': expected a number"."""
        flag = self.FLAGS.get(self.param, "--" + self.param.replace("_", "-"))
        return f"{flag}: value {self.value!r}: {self.accepted}"


def as_number(value: Any) -> int | float | None:
    """A tag as a number: '64' -> 64, '0.12' -> 0.12; None for what is not a finite number."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def to_row(mv, registered=None) -> dict[str, Any]:
    """The row of ModelVersion `mv`; `registered`, its RegisteredModel, gives its aliases and the
    model's tags (model, hook), which fill in what the version's own tags lack."""
    tags = dict(mv.tags or {})
    model_tags = dict(registered.tags or {}) if registered is not None else {}
    hook = tags.get("hook") or model_tags.get("hook") or mv.name.split("__", 1)[-1]
    model = tags.get("model") or model_tags.get("model") or mv.name.removesuffix(f"__{hook}")
    aliases = [] if registered is None else sorted(a for a, v in (registered.aliases or {}).items()
                                                   if str(v) == str(mv.version))
    return {
        "name": mv.name, "version": int(mv.version), "uri": f"models:/{mv.name}/{mv.version}",
        "model": model, "hook": hook, "layer": _layer(tags.get("layer"), hook),
        "architecture": tags.get("architecture"), **{k: as_number(tags.get(k)) for k in _NUMBERS},
        "verdict": tags.get("verdict"), "aliases": aliases, "run_id": mv.run_id, "tags": tags,
    }


def value_of(row: dict[str, Any], key: str) -> Any:
    """A row's value for a field or, failing that, a tag (a number when the tag is one); None if it has neither."""
    if key in row and key != "tags":
        return row[key]
    raw = row["tags"].get(key)
    number = as_number(raw)
    return raw if number is None else number


def find_saes(tracking_uri: str | None = None, *, model: str | None = None, hook: str | None = None,
              layer: int | str | None = None, architecture: str | None = None, d_sae: int | str | None = None,
              min_l0: float | str | None = None, max_l0: float | str | None = None,
              target_l0: float | str | None = None, verdict: str | None = None, tags: dict[str, Any] | None = None,
              sort: str | None = None, desc: bool = False, limit: int | str | None = None) -> list[dict[str, Any]]:
    """The registered SAEs that match every filter given, as rows (see the module docstring),
    e.g. `find_saes(layer=3, max_l0=64, sort="fvu", limit=5)`: the five lowest-FVU SAEs of
    block 3 with a held-out L0 of at most 64.

    tracking_uri: default $MLFLOW_TRACKING_URI, else the default workdir's sqlite store.
    model: a model name or path as the run config had it (compared by its registry-name part);
    hook: the exact hook name; layer: the block index; architecture, verdict ("ok", "warn",
    "stopped"): exact; d_sae, target_l0: equal as numbers; min_l0, max_l0: inclusive bounds on
    L0 (an SAE without one does not match); tags: {key: value}, each equal (as numbers when both
    are), any field or tag. sort: a field or tag, ascending unless `desc`, rows without it last;
    default by name and version. limit: at most this many rows.
    Raises QueryError for a value none of these accept (also a sort key no matching SAE has).
    """
    layer, d_sae = _integer("layer", layer), _integer("d_sae", d_sae)
    target_l0, min_l0, max_l0 = _number("target_l0", target_l0), _number("min_l0", min_l0), _number("max_l0", max_l0)
    limit = _integer("limit", limit, minimum=1)
    if verdict is not None and verdict not in VERDICTS:
        raise QueryError("verdict", verdict, f"expected one of {', '.join(VERDICTS)}")
    tags = {str(k): v for k, v in (tags or {}).items()}
    for key in tags:
        if not key:
            raise QueryError("tags", key, "expected a tag name")

    checks = []
    prefix = None if model is None else tracking.model_key(str(model)) + "__"
    if prefix is not None:
        checks.append(lambda r: r["name"].startswith(prefix))
    equal = {"hook": hook, "layer": layer, "architecture": architecture, "d_sae": d_sae, "target_l0": target_l0,
             "verdict": verdict, **tags}
    for key, want in equal.items():
        if want is not None:
            checks.append(lambda r, key=key, want=want: _same(value_of(r, key), want))
    if min_l0 is not None:
        checks.append(lambda r: r["l0"] is not None and r["l0"] >= min_l0)
    if max_l0 is not None:
        checks.append(lambda r: r["l0"] is not None and r["l0"] <= max_l0)

    # MLflow narrows the search by name and by the tags compared as text (those of FIELDS that are
    # a version tag as they are, and the --tag ones that are no number); the checks decide
    strings = {k: v for k, v in equal.items() if v is not None and k not in FIELDS and as_number(v) is None}
    strings.update({k: v for k, v in {"architecture": architecture, "verdict": verdict}.items() if v is not None})
    client = tracking.client_for(_uri(tracking_uri))
    rows = [r for r in _rows(client, prefix, strings) if all(check(r) for check in checks)]
    return sort_rows(rows, sort, desc)[:limit]


def sort_rows(rows: list[dict[str, Any]], key: str | None = None, desc: bool = False) -> list[dict[str, Any]]:
    """Rows by `key` (a field or tag; numbers before words), rows without it last whichever the
    direction; ties, and no key, by name and version."""
    rows = sorted(rows, key=lambda r: (r["name"], r["version"]))
    if key is None:
        return rows
    known = {k for k in FIELDS if k not in ("tags", "aliases")} | {k for r in rows for k in r["tags"]}
    if rows and key not in known:
        raise QueryError("sort", key, f"expected a field or tag of the matching SAEs: {', '.join(sorted(known))}")
    have = [r for r in rows if value_of(r, key) is not None]
    have.sort(key=lambda r: _order(value_of(r, key)), reverse=desc)  # stable: ties keep name, version
    return have + [r for r in rows if value_of(r, key) is None]


def resolve(client, ref: str):
    """The ModelVersion `ref` names (NAME/VERSION, NAME@ALIAS, models:/NAME/VERSION, or NAME for
    its latest version); QueryError when the registry has no such version."""
    from mlflow.exceptions import MlflowException

    try:
        return tracking.resolve_version(client, ref)
    except (MlflowException, ValueError) as e:
        reason = " ".join(str(getattr(e, "message", e)).split())
        raise QueryError("ref", ref, f"not in the registry ({reason}); expected NAME/VERSION, NAME@ALIAS or "
                                     "models:/NAME/VERSION (see `sae-ray registry find`)") from None


def compare_saes(refs: list[str], tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """The rows of the versions `refs` name (see `resolve`), in that order."""
    client = tracking.client_for(_uri(tracking_uri))
    rows = []
    for ref in refs:
        mv = resolve(client, ref)
        rows.append(to_row(mv, tracking.retry(lambda: client.get_registered_model(mv.name))))  # noqa: B023 (called at once)
    return rows


def find_table(rows: list[dict[str, Any]], sort: str | None = None) -> str:
    """Rows as the plain-text table `sae-ray registry find` prints, one line per SAE."""
    from sae_ray.tracking.report import format_table

    columns = FIND_COLUMNS + ([sort] if sort and sort not in FIND_COLUMNS else [])
    return format_table([{c: _cell(value_of(r, c)) for c in columns} for r in rows], columns)


def compare_table(rows: list[dict[str, Any]]) -> str:
    """Rows side by side: one column per SAE, one line per field or tag that any of them has."""
    from sae_ray.tracking.report import format_table

    one_model = len({r["name"] for r in rows}) == 1
    labels: list[str] = []
    for r in rows:
        label = f"v{r['version']}" if one_model else f"{r['name']}/{r['version']}"
        labels.append(label if label not in labels else f"{label} ({len(labels) + 1})")
    keys = COMPARE_FIRST + sorted({k for r in rows for k in r["tags"]} - set(COMPARE_FIRST))
    lines = [{"": key, **{label: _cell(value_of(r, key)) for label, r in zip(labels, rows)}} for key in keys
             if any(_cell(value_of(r, key)) is not None for r in rows)]
    table = format_table(lines, ["", *labels])
    return f"{rows[0]['name']}\n{table}" if one_model else table


def best_aliases(rows: list[dict[str, Any]]) -> dict[str, int]:
    """{alias: version} for the rows of one registered model: `best-fvu`, the lowest FVU among
    the versions whose verdict is ok, and `l0-N-best`, the same among those with target_l0 N.
    Equal FVUs: the older version keeps it."""
    ok = [r for r in rows if r["verdict"] == "ok" and r["fvu"] is not None]
    best = lambda group: min(group, key=lambda r: (r["fvu"], r["version"]))["version"]  # noqa: E731
    out = {BEST_FVU: best(ok)} if ok else {}
    for target in sorted({r["target_l0"] for r in ok if r["target_l0"] is not None}):
        out[target_alias(target)] = best([r for r in ok if r["target_l0"] == target])
    return out


def target_alias(target_l0: float) -> str:
    """'l0-64-best' for target L0 64 (an alias holds only letters, digits, '_' and '-')."""
    text = str(int(target_l0)) if float(target_l0).is_integer() else str(target_l0).replace(".", "_")
    return f"l0-{text}-best"


def is_sweep_alias(alias: str) -> bool:
    """Whether `refresh_model` owns the alias (it moves or removes only those)."""
    return alias == BEST_FVU or re.fullmatch(r"l0-[\w]+-best", alias) is not None


def refresh_model(client, name: str, model: str | None = None) -> dict[str, int]:
    """After a sweep registered into `name`: point its sweep aliases (`best_aliases`) at its best
    versions (moving those a better version beats, removing one no ok version earns) and
    rewrite its description and model, hook and d_in tags. Returns {alias: version}.
    model: the model name as the run config had it (default: what the registry knows)."""
    registered = tracking.retry(lambda: client.get_registered_model(name))
    rows = [to_row(v, registered) for v in _all(client.search_model_versions, filter_string=f"name = '{name}'")
            if "architecture" in v.tags]
    wanted = best_aliases(rows)
    current = {alias: str(version) for alias, version in (registered.aliases or {}).items()}
    for alias, version in wanted.items():
        if current.get(alias) != str(version):
            tracking.retry(lambda: client.set_registered_model_alias(name, alias, str(version)))  # noqa: B023
    for alias in current:
        if is_sweep_alias(alias) and alias not in wanted:
            tracking.retry(lambda: client.delete_registered_model_alias(name, alias))  # noqa: B023
    hook = rows[0]["hook"] if rows else name.split("__", 1)[-1]
    model = model or (rows[0]["model"] if rows else name.split("__", 1)[0])
    d_in = next((r["d_in"] for r in rows if r["d_in"] is not None), None)
    description, model_tags = describe_model(model, hook, d_in, rows)
    if registered.description != description:
        tracking.retry(lambda: client.update_registered_model(name, description=description))
    for key, value in model_tags.items():
        if (registered.tags or {}).get(key) != value:
            tracking.retry(lambda: client.set_registered_model_tag(name, key, value))  # noqa: B023
    return wanted


def describe_model(model: str, hook: str, d_in: Any = None,
                   rows: list[dict[str, Any]] | None = None) -> tuple[str, dict[str, str]]:
    """(description, tags) of the registered model of (model, hook): what it holds, what its
    versions' tags and aliases mean and, given its rows, which SAEs are in it. The tags
    (model, hook, d_in) let `find_saes` tell a version's model and hook."""
    d_in = as_number(d_in)
    text = (f"Sparse autoencoders trained by sae-ray on the activations of {model} at hook {hook}"
            + ("" if d_in is None else f" (d_in {d_in})") + ". Each version is one trained SAE; its tags say what it "
            "is (architecture, d_sae, target_l0, k / l1_coefficient / l0_coefficient) and how good it is on held-out "
            f"rows (l0, fvu, dead_fraction, verdict). Aliases: {BEST_FVU} is the lowest-FVU version whose verdict is "
            "ok; l0-N-best the same among the versions with target_l0 N.")
    if rows:
        def values(key: str) -> str:
            found = {r[key] for r in rows if r[key] is not None}
            return ", ".join(str(v) for v in sorted(found, key=_order)) or "-"

        text += (f" {len(rows)} version{'s' * (len(rows) != 1)}: architectures {values('architecture')}; "
                 f"d_sae {values('d_sae')}; target L0 {values('target_l0')}.")
    text += f" Query them: sae-ray registry find --hook {hook}"
    tags = {"model": str(model), "hook": str(hook), **({} if d_in is None else {"d_in": str(d_in)})}
    return text, tags


def _rows(client, name_prefix: str | None, strings: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of every registered SAE whose name starts with `name_prefix` and whose tags equal
    `strings` as far as MLflow's filter can say (a superset: the caller checks again)."""
    plain = lambda s: not re.search(r"['`\\]", str(s))  # noqa: E731 (what can go inside the filter's quotes)
    names = f"name LIKE '{name_prefix}%'" if name_prefix and plain(name_prefix) else None  # '_' matches any one
    parts = [names] if names else []
    parts += [f"tags.`{k}` = '{v}'" for k, v in strings.items() if plain(k) and plain(v)]
    registered = {m.name: m for m in _all(client.search_registered_models, filter_string=names, max_results=1000)}
    versions = _all(client.search_model_versions, filter_string=" and ".join(parts) or None)
    return [to_row(v, registered.get(v.name)) for v in versions if "architecture" in (v.tags or {})]


def _all(search, **kwargs) -> list:
    """Every page of an MLflow search."""
    out, token = [], None
    while True:
        page = tracking.retry(lambda: search(page_token=token, **kwargs))  # noqa: B023 (called at once)
        out += list(page)
        token = page.token
        if not token:
            return out


def _uri(tracking_uri: str | None) -> str:
    """The tracking URI given, else $MLFLOW_TRACKING_URI, else the default workdir's (as `load_sae`)."""
    from sae_ray import DEFAULT_TRACKING_URI_ENV, default_tracking_uri

    return tracking_uri or os.environ.get(DEFAULT_TRACKING_URI_ENV) or default_tracking_uri()


def _number(param: str, value: Any) -> int | float | None:
    if value is None:
        return None
    number = as_number(value)
    if number is None:
        raise QueryError(param, value, "expected a number, e.g. 64 or 0.25")
    return number


def _integer(param: str, value: Any, minimum: int | None = None) -> int | None:
    number = None if value is None else as_number(value)
    if value is not None and (number is None or number != int(number) or (minimum is not None and number < minimum)):
        raise QueryError(param, value, "expected an integer" + ("" if minimum is None else f" >= {minimum}"))
    return None if number is None else int(number)


def _layer(tag: Any, hook: str | None) -> int | None:
    """The block index: the version's layer tag if it has one, else from a 'blocks.N.…' hook name."""
    number = as_number(tag)
    if number is not None:
        return int(number) if number >= 0 else None  # -1: a raw module path, no block
    match = re.match(r"blocks\.(\d+)\.", hook or "")
    return int(match[1]) if match else None


def _same(have: Any, want: Any) -> bool:
    """Equal as numbers when both are numbers, else as text."""
    if have is None:
        return False
    a, b = as_number(have), as_number(want)
    return a == b if a is not None and b is not None else str(have) == str(want)


def _order(value: Any) -> tuple:
    """Sort key: numbers (by value) before words (alphabetically)."""
    number = as_number(value)
    return (0, number, "") if number is not None else (1, 0, str(value))


def _cell(value: Any) -> Any:
    """What a table shows: aliases as '@a @b', None for nothing (an empty tag too)."""
    if isinstance(value, list):
        return " ".join(f"@{a}" for a in value) or None
    return None if value == "" else value
