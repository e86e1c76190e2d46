"""predict.py: score new, unlabelled images with a run folder or an exported .tflite / .onnx file.

Writes predictions.csv (file, score, decision, anomalous area, threshold,
error), an overlay PNG per image flagged anomalous and summary.json. The
decision is the run's operating point (finetune.json), decided by the same
code as test.py; a run without one gets an image-score threshold at
``--fpr`` on its validation normals, and says so. Exit code 2 when any image
could not be scored. The exported-file path imports no TensorFlow.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import EXIT_BAD_INPUT, InputError
from .common import add_verbose, run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="predict.py", description=__doc__.split("\n")[0])
    p.add_argument("-p", "--path", required=True, help="run folder (or DIR/model.keras), or an exported .tflite / .onnx")
    p.add_argument("images", nargs="+", metavar="IMAGES", help="image files, folders or globs")
    p.add_argument("--out", default="predictions", help="output folder (default ./predictions)")
    p.add_argument("--fpr", type=float, default=0.01,
                   help="runs without finetune.json: false-positive rate on the validation normals (default 0.01)")
    p.add_argument("--threads", type=int, default=2, help="exported models: interpreter threads (default 2)")
    p.add_argument("-q", "--quiet", action="store_true")
    return add_verbose(p)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ..runtime.images import list_images
    from ..runtime.predict import predict_images

    if not 0 <= args.fpr < 1:
        raise InputError(f"--fpr must be in [0, 1), got {args.fpr}")
    if args.threads < 1:
        raise InputError(f"--threads must be at least 1, got {args.threads}")
    files = list_images(args.images)
    if os.path.splitext(args.path)[1].lower() in (".tflite", ".onnx"):
        from ..runtime.scorers import ExportedScorer

        scorer = ExportedScorer(args.path, args.fpr, args.threads)
    else:
        from .common import model_dir_from_arg
        from ..runtime.scorers import KerasScorer

        scorer = KerasScorer(model_dir_from_arg(args.path), args.fpr)
    op = scorer.operating_point
    if scorer.fallback and not args.quiet:
        print(f"no finetune.json: image-score threshold {op['threshold']:.6g} at {args.fpr:g} false-positive rate "
              f"on {op.get('chosen_on', 'the validation normals')}")
    s = predict_images(scorer, files, args.out, progress=not args.quiet)
    print(f"{s['n_scored']} scored, {s['n_anomalous']} anomalous, {s['n_unreadable']} unreadable; "
          f"wrote {os.path.abspath(args.out)}")
    return EXIT_BAD_INPUT if s["n_unreadable"] else 0


def cli(argv=None) -> int:
    code = 0

    def call(a):
        nonlocal code
        code = main(a)

    rc = run_main(call, argv)
    return rc or code


if __name__ == "__main__":
    sys.exit(cli())
