"""The ``sparsec`` command line. Each sub-command lives with the code it drives and
contributes ``add_parser(subparsers)``; this module only gathers them."""
from __future__ import annotations

import argparse
import sys

from sparsec.ir.errors import SparsecError


def _add_plan(subparsers) -> None:
    parser = subparsers.add_parser("plan", help="print the plan summary of a saved artifact")
    parser.add_argument("artifact", help="directory written by CompiledModel.save()")

    def run(args) -> int:
        from sparsec.ir.plan import Plan
        from sparsec.runtime.artifact import read_plan_json

        print(Plan.from_json(read_plan_json(args.artifact)).summary())
        return 0

    parser.set_defaults(handler=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsec", description="sparsity compiler for PyTorch transformers")
    subparsers = parser.add_subparsers(dest="command", required=True)
    from sparsec.tools.bench import add_parser as add_bench
    from sparsec.tools.bisect_plan import add_parser as add_bisect
    from sparsec.tools.onnx_cli import add_parser as add_onnx
    from sparsec.tools.inspect_dump import add_parser as add_inspect

    _add_plan(subparsers)
    add_inspect(subparsers)
    add_bisect(subparsers)
    add_onnx(subparsers)
    add_bench(subparsers)
    return parser


# Ordinary user mistakes: a missing or unreadable path, a bad value, a typed sparsec error.
# They print one line; SPARSEC_DEBUG >= 1 shows the traceback instead.
_USER_ERRORS = (SparsecError, OSError, ValueError, ImportError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except _USER_ERRORS as error:
        if _debug():
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"sparsec {args.command}: error: {message} ({type(error).__name__}; "
              "SPARSEC_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


def _debug() -> bool:
    from sparsec.ir import config

    try:
        return config.debug_level() > 0
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
