"""``mvtec-keras benchmark``: every chosen method on every category (fit, operating point, test)."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import InputError
from .common import add_verbose, run_main


def build_parser() -> argparse.ArgumentParser:
    from ..benchmark import DEFAULT_METHODS

    p = argparse.ArgumentParser(prog="mvtec-keras benchmark", description=__doc__.split("\n")[0].strip("`"))
    p.add_argument("--root", help="folder of MVTec-layout categories, or one category (default: the demo category)")
    p.add_argument("--categories", default="all", help="all (default) or a comma-separated list of names")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    p.add_argument("--epochs", type=int, default=30, help="autoencoders: maximum epochs (default 30)")
    p.add_argument("--out", default=os.path.join("runs", "benchmark"), help="output folder (default runs/benchmark)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return add_verbose(p)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from ..benchmark import parse_methods, run_benchmark, summary_markdown

    if args.epochs < 1:
        raise InputError(f"--epochs must be >= 1, got {args.epochs}")
    rows = run_benchmark(args.root, parse_methods(args.methods, args.epochs), args.out, args.categories,
                         progress=not args.quiet)
    print(summary_markdown(rows))
    print(f"wrote {os.path.join(args.out, 'results.csv')}, summary.md and {os.path.join(args.out, 'report.html')}")


def cli(argv=None) -> int:
    return run_main(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
