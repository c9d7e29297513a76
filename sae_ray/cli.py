"""The `sae-ray` command."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def _load(args):
    """The config of the command line, with its paths made absolute here, once: every
    command then fingerprints and resolves the same config the same way."""
    from sae_ray.config import load_config

    return load_config(args.config, args.set).with_absolute_paths()


def cmd_validate(args) -> int:
    from sae_ray.preflight import preflight

    cfg = _load(args)
    plan = preflight(cfg, check_data=not args.static, check_buffer=not args.static)
    _print_warnings(cfg)
    print(f"{args.config}: OK — {len(plan.trials)} SAEs in {len(plan.stacks)} trials on hooks {plan.hooks} (hook: d_in)")
    for stack in plan.stacks:
        print(f"   {stack.name}")
    return 0


def _print_warnings(cfg) -> None:
    """What a valid config may still get wrong (an unfair metric for ASHA or Optuna, too few
    optimizer steps for an SAE to converge), on stderr."""
    from sae_ray.config.sections import search_warnings
    from sae_ray.presets import step_warnings

    for line in search_warnings(cfg) + step_warnings(cfg):
        print(f"warning: {line}", file=sys.stderr)


def cmd_init(args) -> int:
    """Print a starting config for a model, read from its config alone (sae_ray.presets)."""
    from sae_ray.presets import InitError, init_config

    def items(flag: str, text: str | None) -> list[str] | None:
        if text is None:
            return None
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not values:
            raise InitError(f"{flag}: value {text!r}: give at least one, separated by commas")
        return values

    layers = items("--layers", args.layers)
    try:
        layers = [int(v) for v in layers] if layers is not None else None
    except ValueError:
        raise InitError(f"--layers: value {args.layers!r}: expected block indices separated by commas, e.g. 6,12") from None
    print(init_config(args.model, layers=layers, sites=tuple(items("--sites", args.sites)),
                      budget_tokens=args.budget_tokens, gpus=args.gpus,
                      architectures=tuple(items("--architectures", args.architectures))), end="")
    return 0


def cmd_run(args) -> int:
    from sae_ray.preflight import preflight
    from sae_ray.sweep import run_sweep
    from sae_ray.tracking.report import format_table

    start = time.perf_counter()
    cfg = _load(args)
    plan = preflight(cfg, address=args.address)
    _print_warnings(cfg)
    result = run_sweep(cfg, address=args.address, plan=plan, fresh=args.fresh)
    print()
    print(format_table(result.rows))
    for s in result.producer_stats:
        print(f"producer {s['rank']}: {s['rows']:,} rows in {s['shards']} shards, {s['tokens_per_s']:,.0f} tokens/s")
    print(f"\nwall time {time.perf_counter() - start:.0f}s; buffer {cfg.buffer_path()}")
    print(f"MLflow: {cfg.tracking_uri()} (parent run {result.parent_run_id})")
    print(f"  open the UI:  mlflow ui --backend-store-uri {cfg.tracking_uri()} --host 127.0.0.1")
    print(f"  list SAEs:    sae-ray registry list --tracking-uri {cfg.tracking_uri()}")
    return 0


def cmd_cache(args) -> int:
    from sae_ray.sweep import run_cache

    cfg = _load(args)
    stats = run_cache(cfg, address=args.address)  # runs preflight before Ray starts
    for s in stats:
        print(f"producer {s['rank']}: {s['rows']:,} rows in {s['shards']} shards, {s['tokens_per_s']:,.0f} tokens/s")
    print(f"buffer {cfg.buffer_path()}  (sae-ray buffer info PATH)")
    return 0


def cmd_eval(args) -> int:
    from sae_ray.devices import pick_device
    from sae_ray.eval.run import eval_ref

    cfg = _load(args)
    eval_ref(cfg, args.ref, hook=args.hook, output=args.output, tracking_uri=args.tracking_uri,
             device=str(pick_device(cfg.model.device)))
    return 0


def _tracking_uri(args) -> str:
    from sae_ray import default_tracking_uri

    if args.tracking_uri:
        return args.tracking_uri
    if args.config:
        from sae_ray.config import load_config

        return load_config(args.config).tracking_uri()
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


KEY_TAGS = ["architecture", "d_sae", "k", "l1_coefficient", "l0", "fvu", "dead_fraction", "tokens_seen"]


def _registry_command(fn):
    """A registry command whose input the registry cannot take (a filter value, a sort key, a
    reference to no version) prints one line naming the flag, the value and what is accepted,
    with exit code 2, not a traceback (SAE_RAY_TRACEBACK=1 shows it)."""
    import functools

    @functools.wraps(fn)
    def run(args) -> int:
        from sae_ray.tracking.registry import QueryError

        try:
            return fn(args)
        except QueryError as e:
            if os.environ.get("SAE_RAY_TRACEBACK", "") not in ("", "0"):
                raise
            print(f"error: {e.cli_message()}", file=sys.stderr)
            return 2

    return run


def cmd_registry_list(args) -> int:
    from sae_ray import tracking

    client = tracking.client_for(_tracking_uri(args))
    models = client.search_registered_models()
    if not models:
        print("no registered SAEs")
    for m in models:
        aliases: dict[str, list[str]] = {}
        for a, v in sorted((m.aliases or {}).items()):
            aliases.setdefault(str(v), []).append(a)
        print(m.name)
        for v in sorted(client.search_model_versions(f"name = '{m.name}'"), key=lambda v: int(v.version)):
            tags = "  ".join(f"{k}={v.tags[k]}" for k in KEY_TAGS if k in v.tags)
            alias = "".join(f" @{a}" for a in aliases.get(str(v.version), []))
            print(f"  v{v.version}{alias}  {tags}")
    return 0


def cmd_registry_show(args) -> int:
    from sae_ray import tracking
    from sae_ray.tracking.registry import resolve

    client = tracking.client_for(_tracking_uri(args))
    mv = resolve(client, args.ref)
    print(f"{mv.name} version {mv.version}")
    print(f"  source: {mv.source}")
    print(f"  run:    {mv.run_id}")
    print(f"  uri:    models:/{mv.name}/{mv.version}")
    for k in sorted(mv.tags):
        print(f"  {k}: {mv.tags[k]}")
    return 0


def cmd_registry_find(args) -> int:
    import json

    from sae_ray.tracking.registry import QueryError, find_saes, find_table

    tags = {}
    for text in args.tag:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise QueryError("tags", text, "expected KEY=VALUE, e.g. --tag eval_split=held-out")
        tags[key.strip()] = value
    rows = find_saes(_tracking_uri(args), model=args.model, hook=args.hook, layer=args.layer,
                     architecture=args.architecture, d_sae=args.d_sae, min_l0=args.min_l0, max_l0=args.max_l0,
                     target_l0=args.target_l0, verdict=args.verdict, tags=tags, sort=args.sort, desc=args.desc,
                     limit=args.limit)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no registered SAE matches (all of them: sae-ray registry find)")
    else:
        print(find_table(rows, args.sort))
    return 0


def cmd_registry_compare(args) -> int:
    import json

    from sae_ray.tracking.registry import compare_saes, compare_table

    rows = compare_saes(args.refs, _tracking_uri(args))
    print(json.dumps(rows, indent=2) if args.json else compare_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sae-ray", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("config", help="YAML config file")
        sp.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field, e.g. --set train.lr=1e-4 (repeatable)")
        return sp

    r = with_config(sub.add_parser("run", help="produce the buffer and train the sweep"))
    r.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    r.add_argument("--fresh", action="store_true",
                   help="start a new sweep even if this config's last one did not finish (default: resume it); deletes nothing")
    r.set_defaults(fn=cmd_run)
    c = with_config(sub.add_parser("cache", help="produce the activation buffer only"))
    c.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    c.set_defaults(fn=cmd_cache)
    v = with_config(sub.add_parser("validate", help="check a config (and its model, hooks, data, buffer) without running"))
    v.add_argument("--static", action="store_true", help="skip the data and buffer checks")
    v.set_defaults(fn=cmd_validate)
    i = sub.add_parser("init", help="print a starting config for a model, from its config alone (no weights)",
                       description="Print a commented config for MODEL (a local directory, 'package:...', 'gguf:...' "
                                   "or a hub id in the local cache): hook points, widths, a target-L0 ladder, batch "
                                   "size and lr for the token budget, buffer and resources; every number says where it "
                                   "comes from. E.g. sae-ray init EleutherAI/pythia-70m --layers 2,4 > my-sweep.yaml")
    i.add_argument("model", metavar="MODEL", help="the model, as model.name takes it")
    i.add_argument("--layers", default=None, help="block indices, e.g. 6,12 (default: the middle block)")
    i.add_argument("--sites", default="resid_post", help="hook sites, e.g. resid_post,mlp_out (default resid_post)")
    i.add_argument("--budget-tokens", type=int, default=None, metavar="N",
                   help="training tokens per SAE (default: train.total_tokens's default)")
    i.add_argument("--gpus", type=int, default=0, metavar="G", help="GPUs the run has (default 0: CPU)")
    i.add_argument("--architectures", default="topk,batchtopk", help="SAE architectures (default topk,batchtopk)")
    i.set_defaults(fn=cmd_init)

    e = sub.add_parser("eval", help="LM-level evaluation of one SAE on the config's model and held-out documents",
                       description="Splice the SAE into the config's model at its hook on held-out documents: "
                                   "CE loss recovered, KL, delta LM loss (causal LMs) or embedding cosine "
                                   "(encoders), reconstruction and feature-density figures.")
    e.add_argument("--config", required=True, help="run config: the model, hooks, data and held-out split to evaluate on")
    e.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field (repeatable)")
    e.add_argument("ref", help="models:/NAME/VERSION, NAME/VERSION, NAME@ALIAS, or a local SAELens / sparsify directory "
                               "or Gemma Scope params.npz")
    e.add_argument("--hook", default=None, help="hook to splice at (default: the SAE's own hook_name)")
    e.add_argument("--output", default=None, help="SAEBench-style result JSON (default <workdir>/eval/<name>_core.json)")
    e.add_argument("--tracking-uri", default=None, help="MLflow store of the registry (default: the config's)")
    e.set_defaults(fn=cmd_eval)

    reg = sub.add_parser("registry", help="look up registered SAEs").add_subparsers(dest="registry_command", required=True)
    listing = reg.add_parser("list", help="registered models and their versions")
    show = reg.add_parser("show", help="one version: NAME, NAME@ALIAS or NAME/VERSION")
    show.add_argument("ref")
    find = reg.add_parser("find", help="registered SAEs by model, hook, width, L0, verdict or any tag, sorted",
                          description="Registered SAEs that match every filter given, e.g. "
                                      "sae-ray registry find --layer 3 --max-l0 64 --sort fvu --limit 5")
    for flag, hlp in [("--model", "model name or path, as in the run config"), ("--hook", "hook name, e.g. blocks.3.hook_resid_post"),
                      ("--layer", "block index of the hook"), ("--architecture", "e.g. topk, jumprelu"),
                      ("--d-sae", "number of latents"), ("--min-l0", "held-out L0 at least this"),
                      ("--max-l0", "held-out L0 at most this"), ("--target-l0", "the L0 the SAE was trained to reach"),
                      ("--verdict", "the quality monitor's verdict: ok, warn or stopped")]:
        find.add_argument(flag, default=None, help=hlp)
    find.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                      help="any field or version tag equal to VALUE (as numbers when both are); repeatable")
    find.add_argument("--sort", default=None, metavar="KEY", help="sort by a field or tag, e.g. fvu, l0, tokens_seen")
    find.add_argument("--desc", action="store_true", help="sort from the largest")
    find.add_argument("--limit", default=None, metavar="N", help="print at most N SAEs")
    find.add_argument("--json", action="store_true", help="print the rows as JSON")
    compare = reg.add_parser("compare", help="registered SAEs side by side: REF is NAME/VERSION, NAME@ALIAS or models:/NAME/VERSION")
    compare.add_argument("refs", nargs="+", metavar="REF")
    compare.add_argument("--json", action="store_true", help="print the rows as JSON")
    for sp, fn in [(listing, cmd_registry_list), (show, cmd_registry_show), (find, cmd_registry_find),
                   (compare, cmd_registry_compare)]:
        sp.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: from --config, $MLFLOW_TRACKING_URI, or runs/default)")
        sp.add_argument("--config", default=None, help="take the tracking URI from this run config")
        sp.set_defaults(fn=_registry_command(fn))
    from sae_ray.analysis.commands import add_analysis_commands
    from sae_ray.bench import add_bench_commands
    from sae_ray.buffer.commands import add_buffer_commands

    add_analysis_commands(sub)
    from sae_ray.tracking.server import add_tracking_server_command

    add_tracking_server_command(sub)

    add_buffer_commands(sub)
    add_bench_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. What is wrong with the user's input (a config's problems, a file that
    is missing, unreadable or not YAML) is printed as one message with exit code 2; anything
    else is a bug and keeps its traceback. SAE_RAY_TRACEBACK=1 shows the traceback anyway."""
    import yaml

    from sae_ray.config import ConfigError
    from sae_ray.sweep import SweepError, SweepStopped

    args = build_parser().parse_args(argv)
    show_traceback = os.environ.get("SAE_RAY_TRACEBACK", "") not in ("", "0")
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError) as e:
        if show_traceback:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (yaml.YAMLError, UnicodeDecodeError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        if show_traceback:
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"error: {type(e).__name__}{where}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except SweepError as e:  # trials failed: one line each, their tracebacks are in the Ray logs
        if show_traceback:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except SweepStopped as e:  # SIGTERM: its runs are closed as KILLED
        print(f"stopped: {e}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
