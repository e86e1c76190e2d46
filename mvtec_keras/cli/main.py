"""``mvtec-keras`` / ``python -m mvtec_keras``: one entry point for every script.

Subcommands: ``train``, ``finetune``, ``test``, ``extract``, ``predict``, ``export`` (the same as the
top-level scripts), ``demo`` (build the embedded demo category and describe it),
``benchmark`` (methods x categories)
and ``run`` (the main job: PaDiM, then an autoencoder, each fitted, finetuned and tested; one report).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .common import add_verbose, run_main

COMMANDS = ("train", "finetune", "test", "extract", "predict", "export", "benchmark", "demo", "run")


def _demo(argv):
    p = argparse.ArgumentParser(prog="mvtec-keras demo", description="Build (or reuse) the embedded demo category.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = add_verbose(p).parse_args(argv)
    from ..data.demo import build_demo, describe_demo
    from .common import check_range

    check_range(args.seed, "--seed", 0, 2**32 - 1)

    root = build_demo(seed=args.seed, force=args.force)
    print(describe_demo(root))


def _run(argv):
    p = argparse.ArgumentParser(
        prog="mvtec-keras run",
        description="The main job: the recommended pretrained-feature detector (PaDiM on EfficientNet-Lite0), "
        "then the autoencoder pipeline, each fitted, given its operating point (finetune.py) and tested; "
        "ends in one report.html comparing them. Default data: the embedded demo category.",
    )
    p.add_argument("-d", "--data", help="MVTec-layout category (default: the demo category)")
    p.add_argument("-a", "--architecture", default="mvtecCAE", help="autoencoder (default mvtecCAE)")
    p.add_argument("-l", "--loss", default="ssim")
    # grayscale 128 px: the autoencoder setting the benchmark runner uses (docs/bench_autoencoders.md ranks it
    # best on bottle, and it trains about 10x faster than 256 px, so the main job ends in minutes)
    p.add_argument("-c", "--color", default="grayscale")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--precision", default="auto", help="float32 | mixed_bfloat16 | auto (default)")
    p.add_argument("--size", type=int, default=128, help="autoencoder image size (default 128)")
    p.add_argument("--out", default=os.path.join("runs", "main-job"))
    args = add_verbose(p).parse_args(argv)
    from ..benchmark import MethodSpec, builtin_methods, run_benchmark, summary_markdown
    from ..errors import InputError
    from .common import check_range

    check_range(args.epochs, "--epochs", 1)
    check_range(args.size, "--size", 8)

    if args.data and not os.path.isdir(args.data):
        raise InputError(f"-d/--data: folder not found: {args.data}")
    ae = MethodSpec(args.architecture, "autoencoder", args.architecture, loss=args.loss, color=args.color,
                    epochs=args.epochs, precision=args.precision, size=args.size)
    ours = any(os.path.exists(os.path.join(args.out, f)) for f in ("results.csv", "info.json"))
    if ours:
        import shutil

        shutil.rmtree(args.out)  # the main job always starts fresh in its own folder
    started = time.time()
    rows = run_benchmark(args.data, [builtin_methods()["padim"], ae], args.out, title="mvtec-keras main job")
    print(summary_markdown(rows))
    print(f"main job: {len(rows)} methods in {(time.time() - started) / 60:.1f} min")
    report = os.path.abspath(os.path.join(args.out, "report.html"))
    print(f"report: {report}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: mvtec-keras {{{','.join(COMMANDS)}}} [options]   (-h after a command for its options)",
              file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd in ("train", "finetune", "test", "extract", "predict", "export", "benchmark"):
        import importlib

        mod = importlib.import_module(f".{cmd}", __package__)
        return mod.cli(rest)
    return run_main(_demo if cmd == "demo" else _run, rest)


if __name__ == "__main__":
    sys.exit(main())
