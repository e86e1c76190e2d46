"""finetune.py: choose the operating point of a trained detector and save it (finetune.json).

The rules live in :mod:`mvtec_keras.thresholds` (``--rule``; see there):

- ``search``: min_area x map threshold; thresholds from the defect-free
  validation images (the lowest at which none is flagged, per min_area),
  balanced accuracy on a labelled *finetune split* drawn stratified from the
  test set picks the pair (relaxed to the split alone when every
  validation-safe pair flags all or none of it);
- ``balanced`` / ``f1``: the image-score threshold with the best balanced
  accuracy / F1 on the finetune split;
- ``fpr``: normal-only, a target false-positive rate on the validation images;
- ``chi2``: Gaussian methods (mahalanobis, padim), a bound from the fitted
  distribution at a target false-positive rate.

``auto`` (default): with defect images, ``search`` for detectors whose image
score summarises their map, ``balanced`` for the others (GANs, Mahalanobis,
SPADE: they decide on the image score, never on map regions); without defect
images, ``fpr``. ``--mode fpr`` uses no finetune split at all. The split is
written to finetune.json and test.py leaves it out of its metrics.

Autoencoders: in search mode the map blur (``--map-sigmas``, Gaussian sigma in
pixels of the model input, by pixel AUROC) and the image-score reduction
(``--score-reductions``, by image AUROC) are chosen first on the finetune
split (ties go to the first candidate) and recorded; test.py scores with them.
Like the operating point, they never see an image that test.py evaluates.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from ..errors import InputError
from ..fileio import write_json
from .common import add_verbose, category_from_info, model_dir_from_arg, read_info, run_main, validation_samples

FINETUNE_FILE = "finetune.json"

#: finetune file names printed (the rest are in finetune.json)
SHOWN_FILES = 10


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune.py", description=__doc__.split("\n")[0])
    p.add_argument("-p", "--path", required=True, help="DIR/model.keras or the model folder")
    p.add_argument("-m", "--method", default=None,
                   help="residual map for autoencoders: ssim | l2 (default: the one it was trained with)")
    p.add_argument("-t", "--dtype", default="float32", help="float32 | uint8 threshold grid (default float32)")
    p.add_argument("--mode", default="auto",
                   help="search | fpr | auto (default: search, i.e. use a labelled finetune split, if defects exist)")
    p.add_argument("--rule", default="auto",
                   help="auto | search | balanced | f1 | fpr | chi2 (default auto; see the module docs)")
    p.add_argument("--finetune-fraction", type=float, default=0.2,
                   help="share of each test defect type (and good) used for finetuning (default 0.2)")
    p.add_argument("--min-area", default="5:1000:5", help="min_area range start:stop:step (default 5:1000:5)")
    p.add_argument("--target-fpr", type=float, default=0.01, help="fpr and chi2 rules: allowed false-positive rate")
    p.add_argument("--fpr-min-area", type=int, default=25, help="fpr mode: min_area to use (default 25)")
    p.add_argument("--map-sigmas", default="0,2,4,8",
                   help="autoencoders, search mode: candidate Gaussian blurs of the anomaly map, chosen by pixel "
                        "AUROC on the finetune split (default 0,2,4,8; one value fixes it; 'keep' keeps the model's)")
    p.add_argument("--score-reductions", default="max,mean,topk",
                   help="autoencoders, search mode: candidate image-score reductions of the blurred map, chosen by "
                        "image AUROC on the finetune split (default max,mean,topk; 'keep' keeps the model's)")
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("-q", "--quiet", action="store_true")
    return add_verbose(p)


def parse_range(text: str, flag: str):
    try:
        start, stop, step = (int(v) for v in text.split(":"))
        values = np.arange(start, stop + 1, step)
    except ValueError:
        raise InputError(f"{flag} must look like start:stop:step, got '{text}'") from None
    if len(values) == 0 or start < 1:
        raise InputError(f"{flag}: empty or non-positive range '{text}'")
    return values


def parse_sigmas(text: str):
    """``--map-sigmas``: None for 'keep', else a sorted list of non-negative floats."""
    if text.strip() == "keep":
        return None
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise InputError(f"--map-sigmas must be comma-separated numbers or 'keep', got '{text}'") from None
    if not values or values[0] < 0:
        raise InputError(f"--map-sigmas: give non-negative numbers, got '{text}'")
    return values


def load_for_scoring(model_dir: str, method=None):
    """Detector + info of a run folder, with an optional residual-map override."""
    from ..detectors import load_detector

    info = read_info(model_dir)
    det = load_detector(model_dir)
    if method is not None:
        if not hasattr(det, "residual"):
            raise InputError(f"-m/--method applies to autoencoders only; {det.name} has its own score")
        if method not in ("ssim", "l2"):
            raise InputError(f"-m/--method: unknown residual map '{method}'; choose ssim or l2")
        det.residual = method
    return det, info


def parse_reductions(text: str):
    """``--score-reductions``: None for 'keep', else the names in the order given."""
    from ..detectors.autoencoder import SCORE_REDUCTIONS

    if text.strip() == "keep":
        return None
    values = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    bad = [v for v in values if v not in SCORE_REDUCTIONS]
    if not values or bad:
        raise InputError(f"--score-reductions: choose from {', '.join(SCORE_REDUCTIONS)} or 'keep', got '{text}'")
    return values


def check_args(args):
    from .. import thresholds
    from .common import check_range

    if args.dtype not in ("float32", "uint8"):
        raise InputError(f"-t/--dtype: unknown '{args.dtype}'; choose float32 or uint8")
    if args.mode not in ("auto", "search", "fpr"):
        raise InputError(f"--mode: unknown '{args.mode}'; choose search, fpr or auto")
    if args.rule not in thresholds.RULES:
        raise InputError(f"--rule: unknown '{args.rule}'; choose from {', '.join(thresholds.RULES)}")
    if args.mode == "fpr" and args.rule in ("search", "balanced", "f1"):
        raise InputError(f"--rule {args.rule} needs the labelled finetune split; --mode fpr uses none")
    check_range(args.finetune_fraction, "--finetune-fraction", 0, 1, low_open=True, high_open=True)
    check_range(args.target_fpr, "--target-fpr", 0, 1, high_open=True)
    check_range(args.fpr_min_area, "--fpr-min-area", 1)
    check_range(args.batch_size, "-b/--batch-size", 1)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from .. import reports, residuals, thresholds
    from ..data import Preprocessing, make_dataset, stratified_split

    check_args(args)
    min_areas = parse_range(args.min_area, "--min-area")
    sigmas = parse_sigmas(args.map_sigmas)
    reductions = parse_reductions(args.score_reductions)
    model_dir = model_dir_from_arg(args.path)
    det, info = load_for_scoring(model_dir, args.method)
    prep = Preprocessing.from_dict(info["preprocessing"])
    cat = category_from_info(info)
    val = validation_samples(cat, info)
    if not val:
        raise InputError(f"{model_dir}: no validation images recorded in info.json; retrain with --val-fraction > 0")
    has_defects = any(s.label == 1 for s in cat.test)
    if args.mode == "search" and not has_defects:
        raise InputError("--mode search needs defect images in the test set; use --mode fpr")
    labelled_rule = args.rule not in ("fpr", "chi2")
    mode = "search" if args.mode != "fpr" and has_defects and labelled_rule else "fpr"

    verbose = not args.quiet
    is_ae = hasattr(det, "scores_from_maps")
    # Autoencoders in search mode are scored once with raw maps; every blur / reduction candidate follows from them.
    choose = mode == "search" and is_ae and (sigmas is not None or reductions is not None)
    own_sigma = float(getattr(det, "map_sigma", 0.0) or 0.0)
    if choose:
        det.map_sigma = 0.0
    val_res = det.score(make_dataset(val, prep, args.batch_size), progress=verbose)
    map_decisions = bool(det.has_maps and det.score_is_map_summary and val_res.maps is not None)
    ft = ft_res = None
    if mode == "search":
        ft, _rest = stratified_split(cat.test, args.finetune_fraction, (info.get("data") or {}).get("seed", 0))
        ft_res = det.score(make_dataset(ft, prep, args.batch_size), progress=verbose)
    sigma_table, reduction_table = {}, {}
    if choose:
        labels = np.array([s.label for s in ft])
        det.map_sigma = own_sigma
        if sigmas is not None and ft_res.maps is not None:
            has_mask = np.array([s.mask_path is not None or s.label == 0 for s in ft])
            best, sigma_table = thresholds.choose_map_sigma(ft_res.maps, ft_res.masks, has_mask, sigmas)
            det.map_sigma = own_sigma if best is None else best  # no masks in the split: keep the model's blur
        if reductions is not None:
            best, reduction_table = thresholds.choose_score_reduction(
                {r: det.scores_from_maps(ft_res.maps, r) for r in reductions}, labels)
            if best is not None:
                det.score_reduction = best
        for res in (val_res, ft_res):
            res.scores = det.scores_from_maps(res.maps).astype(np.float32)
            res.maps = np.asarray(residuals.gaussian_blur(res.maps, det.map_sigma)) if det.map_sigma else res.maps
    value_range = None
    if map_decisions and args.dtype == "uint8":
        # uint8 levels span the validation (and finetune) maps' range; thresholds stay in map units.
        maps = [val_res.maps] + ([ft_res.maps] if ft_res is not None else [])
        value_range = (float(min(m.min() for m in maps)), float(max(m.max() for m in maps)))
    op, search = thresholds.choose_operating_point(
        args.rule,
        val_scores=val_res.scores,
        val_maps=val_res.maps if map_decisions else None,
        ft_scores=None if ft_res is None else ft_res.scores,
        ft_maps=None if ft_res is None or not map_decisions else ft_res.maps,
        ft_labels=None if ft is None else np.array([s.label for s in ft]),
        map_decisions=map_decisions,
        gaussian=det.gaussian_score_model() if args.rule == "chi2" else None,
        target_fpr=args.target_fpr,
        fpr_min_area=args.fpr_min_area,
        min_areas=min_areas,
        dtype=args.dtype,
        value_range=value_range,
    )
    if not np.isfinite(op["threshold"]):
        raise InputError("no threshold keeps every validation image defect-free (maps saturate); "
                         "try --mode fpr with a larger --target-fpr")
    result = {
        "detector": det.name,
        "method": det.residual if hasattr(det, "residual") else det.name,
        "dtype": args.dtype,
        "mode": mode,
        "n_validation": len(val),
        **op,
    }
    if hasattr(det, "map_sigma"):
        result["map_sigma"] = float(det.map_sigma)
        if sigma_table:
            result["map_sigma_search"] = {f"{k:g}": float(v) for k, v in sigma_table.items()}
    if hasattr(det, "score_reduction"):
        result["score_reduction"] = str(det.score_reduction)
        if reduction_table:
            result["score_reduction_search"] = reduction_table
    if value_range is not None:
        result["uint8_value_range"] = value_range
    result["finetune_files"] = [s.path for s in ft] if ft is not None else []
    result["n_finetune"] = len(result["finetune_files"])
    if search is not None:
        reports.plot_finetune(search.min_areas, search.thresholds, search.balanced_accuracy, search.min_area,
                              os.path.join(model_dir, "finetune.png"))
    write_json(os.path.join(model_dir, FINETUNE_FILE), result)
    if verbose:
        if sigma_table:
            print("map blur (pixel AUROC on the finetune split): "
                  + ", ".join(f"sigma {k:g}: {v:.4f}" for k, v in sigma_table.items())
                  + f" -> sigma {result['map_sigma']:g}")
        if reduction_table:
            print("image score (image AUROC on the finetune split): "
                  + ", ".join(f"{k}: {v:.4f}" for k, v in reduction_table.items())
                  + f" -> {result['score_reduction']}")
        print(f"mode {mode}, decision on {result['decision']}: min_area={result['min_area']} "
              f"threshold={result['threshold']:.6g}")
        print(thresholds.describe(op))
        if result["finetune_files"]:
            files = result["finetune_files"]
            print(f"{len(files)} finetune images (excluded from test.py; all listed in {FINETUNE_FILE}):")
            for f in files[:SHOWN_FILES]:
                print(f"  {f}")
            if len(files) > SHOWN_FILES:  # a CIFAR-10 split holds thousands
                print(f"  ... and {len(files) - SHOWN_FILES} more")
        print(f"wrote {os.path.join(model_dir, FINETUNE_FILE)}")


def cli(argv=None) -> int:
    return run_main(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
