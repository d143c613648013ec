"""Command line: ``python -m sparseticket <command>`` (also installed as ``sparseticket``).

Commands: ``info`` (backends that are live), ``imp`` (a lottery-ticket run; ``imp --help``).
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sparseticket", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="show which kernels/backends are live")
    from .lottery import cli
    imp = cli.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import main as info_main
        return info_main()
    if args.command == "imp":
        from .lottery.hparams import from_args
        try:  # hyperparameters that do not go together: a usage error, not a traceback
            from_args(args)
        except ValueError as e:
            imp.error(str(e).removeprefix("sparseticket: "))
        return cli.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
