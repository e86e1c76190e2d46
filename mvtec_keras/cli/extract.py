"""extract.py: fit a pretrained-feature detector (Mahalanobis, SPADE, PaDiM, PatchCore) on normal images."""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..errors import InputError
from ..fileio import write_json
from .common import (add_data_args, add_verbose, apply_smoke_caps, check_data_args, check_range, data_info, output_dir,
                     parse_key_values, print_run_header, resolve_category, run_main)

FEATURE_METHODS = ("mahalanobis", "spade", "padim", "patchcore")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="extract.py", description=__doc__.split("\n")[0])
    add_data_args(p)
    p.add_argument("-m", "--method", default="padim", help=f"one of {', '.join(FEATURE_METHODS)} (default padim)")
    p.add_argument("-b", "--backbone", default="efficientnet-lite0",
                   help="efficientnet-b0 ... efficientnet-b7, efficientnet-lite0 ... lite2 (default lite0)")
    p.add_argument("-w", "--weights", default="imagenet",
                   help="imagenet | noisy-student:CKPT | PATH to a weights file | none (default imagenet)")
    p.add_argument("--size", type=int, default=None, help="resize to this size (default: the backbone's native size)")
    p.add_argument("--crop", type=int, default=None, help="centre crop after resizing (e.g. --size 256 --crop 224)")
    p.add_argument("-c", "--color", default="rgb", help="rgb | grayscale (grey images are repeated to 3 channels)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="detector option, e.g. --param k=50 --param n_features=100 (JSON values); repeatable")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", help="output folder (default runs/<category>/<method>-<backbone>-<time>)")
    p.add_argument("--strategy", default="none",
                   help="none | mirrored | multiworker | auto (default none): mirrored splits each batch of "
                        "feature extraction over the local GPUs and merges the replicas' statistics exactly; "
                        "multiworker splits it over the replicas of the TF_CONFIG cluster (start extract.py on "
                        "every worker; the chief writes --out); auto = mirrored when more than one GPU is "
                        "visible (see docs/distributed.md)")
    p.add_argument("-q", "--quiet", action="store_true")
    return add_verbose(p)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from ..data import Preprocessing, make_dataset, split_validation
    from ..detectors import detector_class
    from ..features.extractor import BACKBONES

    check_data_args(args)
    check_range(args.size, "--size", 8)
    check_range(args.crop, "--crop", 1, args.size)
    check_range(args.batch_size, "--batch-size", 1)
    method = args.method.lower()
    if method not in FEATURE_METHODS:
        raise InputError(f"-m/--method: unknown '{args.method}'; choose from {', '.join(FEATURE_METHODS)}")
    if args.backbone not in BACKBONES:
        raise InputError(f"-b/--backbone: unknown '{args.backbone}'; choose from {', '.join(BACKBONES)}")
    apply_smoke_caps(args, native_size=BACKBONES[args.backbone])
    from .. import distribute

    # auto never means a cluster here (tf_config=""): a cluster is asked for by name (multiworker).
    strategy, strategy_name = distribute.make_strategy(distribute.resolve(args.strategy, tf_config=""))
    weights = None if args.weights.lower() == "none" else args.weights
    if weights not in (None, "imagenet") and not weights.startswith("noisy-student") and not os.path.isfile(weights):
        raise InputError(f"-w/--weights: weights file not found: {weights}")
    prep = Preprocessing(size=args.size or BACKBONES[args.backbone], color_mode=args.color, crop=args.crop)
    cls = detector_class(method)
    try:
        detector = cls(backbone=args.backbone, weights=weights, input_size=prep.output_size,
                       **parse_key_values(args.param, "--param"))
    except TypeError as e:
        raise InputError(f"--param: {e}") from None
    cat = resolve_category(args.data, args.abnormal, args.masks, args.seed)
    train_s, val_s = split_validation(cat.train, args.val_fraction, args.seed)
    if not args.quiet:
        print_run_header(cat, f"fitting {method} on {len(train_s)} images ({args.backbone}, {prep.input_shape})",
                         strategy, strategy_name)
    train_ds = make_dataset(train_s, prep, args.batch_size)
    out = args.out or os.path.join("runs", cat.name, f"{method}-{args.backbone}-{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(os.path.join(out, "info.json")):
        raise InputError(f"--out: {out} already holds a model; choose another folder")
    from ..multiworker import is_chief

    if not is_chief(strategy):  # fits in step with the chief (same statistics), which writes the run
        with strategy.scope():
            detector.fit(train_ds, progress=False)
        if not args.quiet:
            print(f"fitted as a worker; the chief writes {out}")
        return
    with output_dir(out):
        t0 = time.time()
        with strategy.scope():  # the backbone is built here, mirrored over the replicas
            detector.fit(train_ds, progress=not args.quiet)
        wall = time.time() - t0
        detector.save(out)
        info = {
            "version": 1,
            "detector": detector.name,
            "architecture": args.backbone,
            "weights": args.weights,
            "data": data_info(cat, args, val_s),
            "preprocessing": prep.to_dict(),
            "fit": {"wall_seconds": round(wall, 2), "n_images": len(train_s), "strategy": strategy_name,
                    "replicas": distribute.replicas(strategy)},
        }
        write_json(os.path.join(out, "info.json"), info)
    if not args.quiet:
        print(f"fitted in {wall:.1f} s; saved to {out}")


def cli(argv=None) -> int:
    return run_main(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
