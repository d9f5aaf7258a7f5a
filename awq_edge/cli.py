"""The `awq-edge` command line: each stage's module registers its own subcommands."""

import argparse
import importlib
import sys

from awq_edge.errors import AwqEdgeError

# Each module defines register(subparsers), setting `func` on its parsers.
COMMAND_MODULES = (
    "awq_edge.commands",
    "awq_edge.devices",
    "awq_edge.engine_build",
    "awq_edge.export.command",
    "awq_edge.runtime.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="awq-edge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    # Our own bars show per-layer progress; transformers' per-tensor loading bars are noise.
    hf_logging.disable_progress_bar()
    try:
        result = args.func(args)
    except AwqEdgeError as e:
        print(f"awq-edge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"awq-edge {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
