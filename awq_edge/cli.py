"""The `awq-edge` command line: each stage's cli module registers its own subcommands."""

import argparse
import importlib
import os
import signal
import sys

from awq_edge.errors import AwqEdgeError

# Each module defines register(subparsers), setting `func` on its parsers.
COMMAND_MODULES = (
    "awq_edge.quantizer.cli",
    "awq_edge.export.cli",
    "awq_edge.engine.cli",
    "awq_edge.runtime.cli",
)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one `error: ... (fix: ...)` line like every other user error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (fix: see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="awq-edge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM as an exception, so that the writers' cleanup (except BaseException) runs as for Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    # Our own bars show per-layer progress; transformers' per-tensor loading bars are noise.
    hf_logging.disable_progress_bar()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        result = args.func(args)
        sys.stdout.flush()
    except AwqEdgeError as e:
        print(f"awq-edge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"awq-edge {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"awq-edge {args.command}: terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:
        # The reader (`| head`) left; flushing at exit would raise again, so point stdout at nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"awq-edge {args.command}: error: the output pipe was closed before the end "
              "(fix: read the whole output, or limit it with --max-new-tokens)", file=sys.stderr)
        return 141
    finally:
        signal.signal(signal.SIGTERM, previous)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
