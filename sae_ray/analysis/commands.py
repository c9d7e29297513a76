"""The analysis commands of the `sae-ray` CLI: analyze, dashboard, steer, concepts, export neuronpedia.

Each checks what the user gave (the latent, the texts, the model kind) before any pass over the
buffer or the model, and the work is in `sae_ray.analysis.run` and its neighbours.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from sae_ray.config import ConfigError


def _load(args):
    from sae_ray.config import load_config

    return load_config(args.config, args.set).with_absolute_paths()


def _ref_sae(args, cfg, command: str):
    from sae_ray import tracking
    from sae_ray.eval.run import load_ref

    uri = args.tracking_uri or cfg.tracking_uri()
    return load_ref(tracking.client_for(uri), uri, args.ref, command)


def _check_latent(latent: int, d_sae: int) -> int:
    if not 0 <= latent < d_sae:
        raise ConfigError([f"--latent: {latent} is out of range; this SAE has latents 0..{d_sae - 1}"])
    return latent


def cmd_analyze(args) -> int:
    from sae_ray.analysis.run import analyze_ref

    cfg = _load(args)
    analyze_ref(cfg, args.ref, out=args.out, tracking_uri=args.tracking_uri, split=args.split, top_k=args.top_k,
                samples=args.samples, window=args.window, workers=args.workers)
    return 0


def cmd_dashboard(args) -> int:
    from sae_ray import tracking
    from sae_ray.analysis.dashboard import serve_dashboard, write_dashboard
    from sae_ray.analysis.run import find_analysis

    cfg = _load(args) if args.config else None
    analysis, version = find_analysis(cfg, args.ref, args.tracking_uri)
    try:
        latents = [analysis.check_latent(i) for i in args.latent] if args.latent else None
    except ValueError as e:
        raise ConfigError([f"--latent: {e}"], "sae-ray dashboard") from None
    links = {}
    if version is not None:
        links = {"registry": f"models:/{version.name}/{version.version}", "run": version.run_id or ""}
    elif analysis.meta.registry:
        links = {"registry": f"models:/{analysis.meta.registry}", "run": analysis.meta.run_id or ""}
    out = Path(args.out) if args.out else analysis.path.parent / f"{analysis.path.name}-dashboard"
    write_dashboard(analysis, out, latents=latents, links=links)
    print(f"dashboard: {out / 'index.html'}")
    if version is not None and version.run_id:
        uri = args.tracking_uri or cfg.tracking_uri()
        tracking.client_for(uri).log_artifacts(version.run_id, str(out), "dashboard")
        print(f"logged as artifacts dashboard/ of run {version.run_id}")
    if args.serve:
        server = serve_dashboard(out, host=args.host, port=args.port)
        host, port = server.server_address[:2]
        print(f"serving http://{host}:{port}/index.html  (Ctrl-C stops)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            server.shutdown()
            server.server_close()
    return 0


def cmd_steer(args) -> int:
    from sae_ray.activations.hooks import resolve_hook
    from sae_ray.activations.model import load_model
    from sae_ray.analysis.lens import generate, require_causal, steer
    from sae_ray.eval.run import hook_entry

    cfg = _load(args)
    sae, _, _ = _ref_sae(args, cfg, "sae-ray steer")
    latent = _check_latent(args.latent, sae.cfg.d_sae)
    if sae.cfg.is_transcoder and args.clamp is not None:
        raise ConfigError([f"--clamp {args.clamp}: {sae.cfg.hook_name} -> {sae.cfg.hook_name_out} is a transcoder, whose "
                           "latent is read at one hook and written at another; clamping is for SAEs: use --strength"],
                          "sae-ray steer")
    # a latent's decoder direction lives where the SAE writes: a transcoder's output hook
    h = hook_entry(cfg, sae.cfg.hook_name_out if sae.cfg.is_transcoder else sae.cfg.hook_name)
    model, tokenizer = load_model(cfg.model.name, cfg.model.revision, cfg.model.dtype, "cpu", cfg.model.trust_remote_code)
    try:
        require_causal(model, "sae-ray steer")
    except ValueError as e:
        raise ConfigError([f"model.name {cfg.model.name!r}: {e}"], "sae-ray steer") from None
    hook = resolve_hook(model, h.layer, h.site, h.module)
    plain = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.seed, args.temperature)
    how = dict(clamp=(sae, latent, args.clamp)) if args.clamp is not None else \
        dict(direction=sae.W_dec[latent].detach(), strength=args.strength)
    with steer(model, hook, **how):
        steered = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.seed, args.temperature)
    what = f"clamped to {args.clamp}" if args.clamp is not None else f"strength {args.strength}"
    print(f"prompt:   {args.prompt!r}\nplain:    {plain!r}\nsteered:  {steered!r}  (latent {latent}, {what}, at {hook.name})")
    return 0


def cmd_concepts(args) -> int:
    from sae_ray.activations.hooks import resolve_hook
    from sae_ray.activations.model import load_model
    from sae_ray.analysis.concepts import concept_acts, concept_table, rank_latents, read_concepts
    from sae_ray.analysis.report import write_concepts
    from sae_ray.analysis.run import open_buffer
    from sae_ray.buffer.split import held_out_rows
    from sae_ray.eval.run import hook_entry

    cfg = _load(args)
    try:
        concepts = read_concepts(args.texts)
    except ValueError as e:
        raise ConfigError([f"--texts: {e}"], "sae-ray concepts") from None
    sae, version, _ = _ref_sae(args, cfg, "sae-ray concepts")
    buffer = open_buffer(cfg, sae, sae.cfg.hook_name)
    h = hook_entry(cfg, sae.cfg.hook_name)
    background = sae.encode(held_out_rows(buffer, sae.cfg.hook_name, args.background_rows)).detach()
    model, tokenizer = load_model(cfg.model.name, cfg.model.revision, cfg.model.dtype, "cpu", cfg.model.trust_remote_code)
    hook = resolve_hook(model, h.layer, h.site, h.module)
    tables = {name: rank_latents(concept_acts(model, tokenizer, hook, sae, texts, cfg.data.context_size).detach(),
                                 background, args.top)
              for name, texts in concepts.items()}
    print(concept_table(tables))
    if args.analysis:
        write_concepts(args.analysis, tables)
        print(f"written to {Path(args.analysis) / 'concepts.json'}")
        if version is not None and version.run_id:  # beside the analysis in the SAE's run
            from sae_ray import tracking
            from sae_ray.analysis.run import ANALYSIS_ARTIFACT

            uri = args.tracking_uri or cfg.tracking_uri()
            tracking.client_for(uri).log_artifact(version.run_id, str(Path(args.analysis) / "concepts.json"), ANALYSIS_ARTIFACT)
    if args.output:
        Path(args.output).write_text(json.dumps({k: [vars(h) for h in v] for k, v in tables.items()}, indent=1))
    return 0


def cmd_export_neuronpedia(args) -> int:
    from sae_ray.analysis.run import find_analysis
    from sae_ray.formats.neuronpedia import export_neuronpedia

    cfg = _load(args)
    sae, _, _ = _ref_sae(args, cfg, "sae-ray export neuronpedia")
    analysis, _ = find_analysis(cfg, args.analysis or args.ref, args.tracking_uri)
    try:
        path = export_neuronpedia(sae, analysis, args.out, model_id=args.model_id, source_set=args.source_set)
    except ValueError as e:  # the SAE and the analysis do not match
        raise ConfigError([str(e)], "sae-ray export neuronpedia") from None
    print(f"Neuronpedia export: {path}  (how to import: {Path(args.out) / 'README.md'})")
    return 0


def add_analysis_commands(sub) -> None:
    """Add the analysis commands to the `sae-ray` subparsers."""
    def common(sp, config_required: bool = True):
        sp.add_argument("ref", help="models:/NAME/VERSION, NAME/VERSION, NAME@ALIAS, or a local SAE directory")
        sp.add_argument("--config", required=config_required, help="run config: its model, data and buffer")
        sp.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field (repeatable)")
        sp.add_argument("--tracking-uri", default=None, help="MLflow store of the registry (default: the config's)")
        return sp

    a = common(sub.add_parser("analyze", help="per-latent statistics and top / sampled contexts over the buffer (Ray)"))
    a.add_argument("--split", default="eval", help="rows to encode: eval (held-out documents, default) or all")
    a.add_argument("--top-k", type=int, default=20, help="top-activating contexts kept per latent")
    a.add_argument("--samples", type=int, default=40, help="contexts sampled per latent across its activations")
    a.add_argument("--window", type=int, default=8, help="tokens on each side of a context's centre")
    a.add_argument("--workers", type=int, default=1, help="Ray tasks at once (one shard each)")
    a.add_argument("--out", default=None, help="analysis directory (default <workdir>/analysis/<name>)")
    a.set_defaults(fn=cmd_analyze)

    d = sub.add_parser("dashboard", help="a static HTML feature dashboard of an analysis")
    d.add_argument("ref", help="an analysis directory, or a registered SAE whose run holds one")
    d.add_argument("--config", default=None, help="run config (for the registry of a registered SAE)")
    d.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field")
    d.add_argument("--tracking-uri", default=None, help="MLflow store of the registry")
    d.add_argument("--out", default=None, help="site directory (default: beside the analysis)")
    d.add_argument("--latent", type=int, action="append", default=[], help="a latent to give a page (repeatable; default the most frequent)")
    d.add_argument("--serve", action="store_true", help="serve the site locally after writing it")
    d.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1, this machine only)")
    d.add_argument("--port", type=int, default=8000, help="port to serve on")
    d.set_defaults(fn=cmd_dashboard)

    s = common(sub.add_parser("steer", help="generate with a latent's decoder direction added at its hook (causal LMs)"))
    s.add_argument("--latent", type=int, required=True, help="the latent whose direction is added")
    s.add_argument("--strength", type=float, default=8.0, help="multiple of W_dec[latent] added at every position")
    s.add_argument("--clamp", type=float, default=None, help="instead: set the latent's activation to this value through the SAE")
    s.add_argument("--prompt", required=True, help="the text to continue")
    s.add_argument("--max-new-tokens", type=int, default=30, help="tokens to generate")
    s.add_argument("--seed", type=int, default=0, help="sampling seed, the same for both generations")
    s.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    s.set_defaults(fn=cmd_steer)

    c = common(sub.add_parser("concepts", help="latents that fire selectively on concept texts"))
    c.add_argument("--texts", nargs="+", required=True, help="concept files (one example per line) or directories of *.txt")
    c.add_argument("--top", type=int, default=10, help="latents ranked per concept")
    c.add_argument("--background-rows", type=int, default=20000, help="held-out buffer rows used as the background")
    c.add_argument("--analysis", default=None, help="an analysis directory to add the tables to (concepts.json)")
    c.add_argument("--output", default=None, help="write the tables as JSON here")
    c.set_defaults(fn=cmd_concepts)

    export = sub.add_parser("export", help="export an SAE and its analysis").add_subparsers(dest="export_command", required=True)
    n = common(export.add_parser("neuronpedia", help="the layout Neuronpedia imports: SAELens weights, features, activations"))
    n.add_argument("--analysis", default=None, help="analysis directory (default: the registered SAE's run's analysis)")
    n.add_argument("--out", required=True, help="output directory")
    n.add_argument("--model-id", required=True, help="Neuronpedia's model id, e.g. smollm2-135m")
    n.add_argument("--source-set", default="sae-ray", help="the source set name (the SAE release)")
    n.set_defaults(fn=cmd_export_neuronpedia)
