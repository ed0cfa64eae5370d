"""Command line: ``python -m cylstm <command> [options]``.

Commands:
  bench   verify cylstm against its NumPy reference, then time both (see cylstm/_bench.py)

Each command is a subparser with its own ``--help``. To add one, write
``_add_<name>(subparsers)`` that registers the subparser with ``set_defaults(run=...)``
(a function of the parsed args returning the exit status) and call it in ``_parser``.
"""

import argparse
import sys


def _add_bench(subparsers):
    from . import _bench

    p = subparsers.add_parser(
        "bench",
        help="verify, then time cylstm against the NumPy reference",
        description=_bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _bench.add_arguments(p, default_json="")     # tables only, unless --json PATH or -
    p.set_defaults(run=_bench.run)


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m cylstm",
        description="cylstm: a fast, exact LSTM engine for CPUs.",
        epilog="Run 'python -m cylstm <command> --help' for a command's options.",
    )
    sub = p.add_subparsers(title="commands", dest="command", metavar="<command>")
    _add_bench(sub)
    return p


def main(argv=None):
    p = _parser()
    args = p.parse_args(argv)
    if getattr(args, "run", None) is None:
        p.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
