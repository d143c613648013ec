"""Command line: ``python -m sparseticket <command>`` (also installed as ``sparseticket``).

Commands: ``info`` (backends that are live). The IMP runner adds ``imp``.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sparseticket", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="show which kernels/backends are live")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import main as info_main
        return info_main()
    return 2


if __name__ == "__main__":
    sys.exit(main())
