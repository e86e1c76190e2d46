"""finetune.py: choose the operating point (min_area x threshold) of a trained detector.

Two modes:

- ``search`` (default when defect images exist): thresholds come from the
  defect-free validation images (the lowest threshold at which none of them is
  flagged, for each min_area); balanced accuracy on a labelled *finetune split*
  drawn stratified from the test set picks the best pair. That split is written
  to finetune.json and test.py leaves it out of its metrics.
- ``fpr`` (also the fallback with no defect images): the threshold is set from
  the validation images alone at a target false-positive rate.

Detectors without anomaly maps are thresholded on their image scores.

Autoencoder maps can be smoothed before thresholding. In ``search`` mode the
blur (``--map-sigmas``, Gaussian sigma in pixels of the model input) is chosen
first, by pixel AUROC on the finetune split (ties go to the smaller sigma), and
recorded in finetune.json as ``map_sigma``; test.py scores with it. Like the
operating point, it never sees an image that test.py evaluates.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from ..errors import InputError
from ..fileio import write_json
from .common import category_from_info, model_dir_from_arg, read_info, run_main, validation_samples

FINETUNE_FILE = "finetune.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="finetune.py", description=__doc__.split("\n")[0])
    p.add_argument("-p", "--path", required=True, help="DIR/model.keras or the model folder")
    p.add_argument("-m", "--method", default=None,
                   help="residual map for autoencoders: ssim | l2 (default: the one it was trained with)")
    p.add_argument("-t", "--dtype", default="float32", help="float32 | uint8 threshold grid (default float32)")
    p.add_argument("--mode", default="auto", help="search | fpr | auto (default: search if defects exist)")
    p.add_argument("--finetune-fraction", type=float, default=0.2,
                   help="share of each test defect type (and good) used for finetuning (default 0.2)")
    p.add_argument("--min-area", default="5:1000:5", help="min_area range start:stop:step (default 5:1000:5)")
    p.add_argument("--target-fpr", type=float, default=0.01, help="fpr mode: allowed false-positive rate")
    p.add_argument("--fpr-min-area", type=int, default=25, help="fpr mode: min_area to use (default 25)")
    p.add_argument("--map-sigmas", default="0,2,4,8",
                   help="autoencoders, search mode: candidate Gaussian blurs of the anomaly map, chosen by pixel "
                        "AUROC on the finetune split (default 0,2,4,8; one value fixes it; 'keep' keeps the model's)")
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("-q", "--quiet", action="store_true")
    return p


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


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from .. import reports, residuals, thresholds
    from ..data import Preprocessing, make_dataset, stratified_split

    if args.dtype not in ("float32", "uint8"):
        raise InputError(f"-t/--dtype: unknown '{args.dtype}'; choose float32 or uint8")
    if args.mode not in ("auto", "search", "fpr"):
        raise InputError(f"--mode: unknown '{args.mode}'; choose search, fpr or auto")
    if not 0 < args.finetune_fraction < 1:
        raise InputError(f"--finetune-fraction must be in (0, 1), got {args.finetune_fraction}")
    min_areas = parse_range(args.min_area, "--min-area")
    sigmas = parse_sigmas(args.map_sigmas)
    model_dir = model_dir_from_arg(args.path)
    det, info = load_for_scoring(model_dir, args.method)
    prep = Preprocessing.from_dict(info["preprocessing"])
    cat = category_from_info(info)
    val = validation_samples(cat, info)
    if not val:
        raise InputError(f"{model_dir}: no validation images recorded in info.json; retrain with --val-fraction > 0")
    has_defects = any(s.label == 1 for s in cat.test)
    mode = args.mode if args.mode != "auto" else ("search" if has_defects else "fpr")
    if mode == "search" and not has_defects:
        raise InputError("--mode search needs defect images in the test set; use --mode fpr")

    verbose = not args.quiet
    choose_sigma = mode == "search" and sigmas is not None and hasattr(det, "map_sigma")
    own_sigma = float(getattr(det, "map_sigma", 0.0) or 0.0)
    if choose_sigma:
        det.map_sigma = 0.0  # raw maps; each candidate blur is applied below
    val_res = det.score(make_dataset(val, prep, args.batch_size), progress=verbose)
    use_maps = det.has_maps and val_res.maps is not None
    ft = ft_res = None
    if mode == "search":
        ft, _rest = stratified_split(cat.test, args.finetune_fraction, (info.get("data") or {}).get("seed", 0))
        ft_res = det.score(make_dataset(ft, prep, args.batch_size), progress=verbose)
    sigma_table = {}
    if choose_sigma and use_maps:
        has_mask = np.array([s.mask_path is not None or s.label == 0 for s in ft])
        best, sigma_table = thresholds.choose_map_sigma(ft_res.maps, ft_res.masks, has_mask, sigmas)
        det.map_sigma = own_sigma if best is None else best  # no masks in the split: keep the model's blur
        val_res.maps, ft_res.maps = (np.asarray(residuals.gaussian_blur(m, det.map_sigma))
                                     for m in (val_res.maps, ft_res.maps))
    result = {
        "detector": det.name,
        "method": det.residual if hasattr(det, "residual") else det.name,
        "dtype": args.dtype,
        "mode": mode,
        "decision": "segmentation" if use_maps else "image_score",
        "n_validation": len(val),
    }
    if hasattr(det, "map_sigma"):
        result["map_sigma"] = float(det.map_sigma)
        if sigma_table:
            result["map_sigma_search"] = {f"{k:g}": float(v) for k, v in sigma_table.items()}
    value_range = None
    if use_maps and args.dtype == "uint8":
        # uint8 levels span the validation maps' range; thresholds stay in map units.
        value_range = (float(val_res.maps.min()), float(val_res.maps.max()))
        result["uint8_value_range"] = value_range
    if mode == "search":
        labels = np.array([s.label for s in ft])
        if use_maps:
            search = thresholds.search_min_area_threshold(
                val_res.maps, ft_res.maps, labels, min_areas=min_areas, dtype=args.dtype, value_range=value_range
            )
            best = int(np.flatnonzero(search.min_areas == search.min_area)[0])
            result.update(min_area=int(search.min_area), threshold=float(search.threshold), score=float(search.score),
                          tpr=float(search.tpr[best]), tnr=float(search.tnr[best]))
            reports.plot_finetune(search.min_areas, search.thresholds, search.balanced_accuracy, search.min_area,
                                  os.path.join(model_dir, "finetune.png"))
        else:
            t = thresholds.threshold_from_fpr(val_res.scores, 0.0)  # lowest threshold flagging no validation image
            pred = ft_res.scores >= t
            from ..metrics import threshold_metrics

            result.update(min_area=None, threshold=t, score=float(threshold_metrics(labels, pred)["balanced_accuracy"]))
        result["finetune_files"] = [s.path for s in ft]
        result["n_finetune"] = len(ft)
    else:
        if use_maps:
            t = thresholds.threshold_from_fpr_maps(val_res.maps, args.fpr_min_area, args.target_fpr,
                                                   dtype=args.dtype, value_range=value_range)
            result.update(min_area=int(args.fpr_min_area), threshold=float(t))
        else:
            t = thresholds.threshold_from_fpr(val_res.scores, args.target_fpr)
            result.update(min_area=None, threshold=float(t))
        result.update(score=None, target_fpr=args.target_fpr, finetune_files=[], n_finetune=0)
    if not np.isfinite(result["threshold"]):
        raise InputError("no threshold keeps every validation image defect-free (maps saturate); "
                         "try --mode fpr with a larger --target-fpr")
    write_json(os.path.join(model_dir, FINETUNE_FILE), result)
    if verbose:
        if sigma_table:
            print("map blur (pixel AUROC on the finetune split): "
                  + ", ".join(f"sigma {k:g}: {v:.4f}" for k, v in sigma_table.items())
                  + f" -> sigma {result['map_sigma']:g}")
        print(f"mode {mode}, decision on {result['decision']}: min_area={result['min_area']} "
              f"threshold={result['threshold']:.6g}" + (f" balanced accuracy={result['score']:.3f}"
                                                      if result.get("score") is not None else ""))
        if result["finetune_files"]:
            print(f"{len(result['finetune_files'])} finetune images (excluded from test.py):")
            for f in result["finetune_files"]:
                print(f"  {f}")
        print(f"wrote {os.path.join(model_dir, FINETUNE_FILE)}")


def cli(argv=None) -> int:
    return run_main(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
