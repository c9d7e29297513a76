"""``sae-ray buffer info PATH [--verify]`` and ``sae-ray buffer import SRC DST``: no Ray needed.

``sae_ray/cli.py`` calls ``add_buffer_commands(sub)`` with its subparsers; each command
sets ``fn`` to a function of the parsed args that returns an exit code.
"""

from __future__ import annotations

import argparse
import json
import sys

from sae_ray.dtypes import ACTIVATION_DTYPES

from .layout import CODECS


def cmd_buffer_info(args: argparse.Namespace) -> int:
    """Exit code 0; with --verify, 1 if any problem was found (each printed on its own line);
    2 if there is no buffer there or it cannot be opened."""
    from .info import buffer_info, format_info, format_problems

    try:
        info = buffer_info(args.path, verify=args.verify)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_info(info))
        if args.verify:
            print(format_problems(info["problems"], info["shards_committed"], len(info["per_array"])))
    return 1 if info.get("problems") else 0


def cmd_buffer_import(args: argparse.Namespace) -> int:
    from .importer import import_activations
    from .info import buffer_info, format_info

    try:
        buf = import_activations(args.src, args.dst, hook=args.hook, shard_rows=args.shard_rows,
                                 chunk_rows=args.chunk_rows, dtype=args.dtype, codec=args.codec,
                                 codec_level=args.codec_level)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_info(buffer_info(buf.path)))
    return 0


def add_buffer_commands(subparsers) -> argparse.ArgumentParser:
    """Add ``buffer info`` and ``buffer import`` to an argparse subparsers object."""
    p = subparsers.add_parser("buffer", help="inspect or import an activation buffer (no Ray)")
    sub = p.add_subparsers(dest="buffer_command", required=True)

    info = sub.add_parser("info", help="rows, hooks, dtype, codec, bytes on disk and compression ratio of a buffer")
    info.add_argument("path", help="buffer directory or fsspec URL (s3://..., gs://...)")
    info.add_argument("--json", action="store_true", help="print the figures as JSON")
    info.add_argument("--verify", action="store_true",
                      help="read every committed shard of every array and check it against its commit record "
                           "(size, hash, dtype, shape, row count); one line per problem, exit code 1 if any")
    info.set_defaults(fn=cmd_buffer_info)

    imp = sub.add_parser("import", help="build a complete buffer from a .npy, a .safetensors or a datasets (SAELens cache) directory")
    imp.add_argument("src", help=".npy [rows, d_in] or [seqs, context, d_in]; .safetensors (one tensor per hook); "
                                 "or a Hugging Face datasets save_to_disk directory (SAELens activation cache)")
    imp.add_argument("dst", help="new buffer directory or fsspec URL")
    imp.add_argument("--hook", default=None, help="the hook point to import (for a .npy: its name; default: the file name)")
    imp.add_argument("--shard-rows", type=int, default=65_536, help="rows per shard (default 65536)")
    imp.add_argument("--chunk-rows", type=int, default=4_096, help="rows per chunk, dividing shard rows (default 4096)")
    imp.add_argument("--dtype", choices=ACTIVATION_DTYPES, default=None, help="stored dtype (default: the source's)")
    imp.add_argument("--codec", choices=CODECS, default="zstd", help="Blosc codec or none (default zstd)")
    imp.add_argument("--codec-level", type=int, default=1, help="Blosc level 0-9 (default 1)")
    imp.set_defaults(fn=cmd_buffer_import)
    return p
