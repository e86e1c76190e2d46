"""``mvtec-keras`` / ``python -m mvtec_keras``: one entry point for every script.

Subcommands: ``train``, ``finetune``, ``test``, ``extract`` (the same as the
top-level scripts), ``demo`` (build the embedded demo category and describe it)
and ``run`` (the main job: train -> finetune -> test).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .common import run_main

COMMANDS = ("train", "finetune", "test", "extract", "demo", "run")


def _demo(argv):
    p = argparse.ArgumentParser(prog="mvtec-keras demo", description="Build (or reuse) the embedded demo category.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = p.parse_args(argv)
    from ..data.demo import build_demo, describe_demo
    from .common import check_range

    check_range(args.seed, "--seed", 0, 2**32 - 1)

    root = build_demo(seed=args.seed, force=args.force)
    print(describe_demo(root))


def _run(argv):
    p = argparse.ArgumentParser(
        prog="mvtec-keras run",
        description="The main job: train an autoencoder, pick its operating point, test it. "
        "Default data: the embedded demo category.",
    )
    p.add_argument("-d", "--data", help="MVTec-layout category (default: the demo category)")
    p.add_argument("-a", "--architecture", default="mvtecCAE")
    p.add_argument("-l", "--loss", default="ssim")
    p.add_argument("-c", "--color", default="grayscale")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--precision", default="auto", help="float32 | mixed_bfloat16 | auto (default)")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--out", default=os.path.join("runs", "main-job"))
    args = p.parse_args(argv)
    from . import finetune, test, train
    from .common import check_range

    check_range(args.epochs, "--epochs", 1)
    check_range(args.size, "--size", 8)

    train_args = ["-a", args.architecture, "-l", args.loss, "-c", args.color, "--epochs", str(args.epochs),
                  "--precision", args.precision, "--out", args.out]
    if args.data:
        train_args += ["-d", args.data]
    if args.size:
        train_args += ["--size", str(args.size)]
    if os.path.exists(os.path.join(args.out, "info.json")):
        import shutil

        shutil.rmtree(args.out)  # the main job always starts fresh in its own folder
    train.main(train_args)
    finetune.main(["-p", args.out])
    test.main(["-p", args.out])
    with open(os.path.join(args.out, "test", "test_result.json")) as f:
        print(json.dumps(json.load(f), indent=2))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: mvtec-keras {{{','.join(COMMANDS)}}} [options]   (-h after a command for its options)",
              file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd in ("train", "finetune", "test", "extract"):
        import importlib

        mod = importlib.import_module(f".{cmd}", __package__)
        return run_main(mod.main, rest)
    return run_main(_demo if cmd == "demo" else _run, rest)


if __name__ == "__main__":
    sys.exit(main())
