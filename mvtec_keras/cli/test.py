"""test.py: evaluate a trained or fitted detector on its category's test set.

The same for every detector family: image AUROC from the image scores, pixel
AUROC and AUPRO from the anomaly maps (images with a ground-truth mask, plus
good images), and TPR / TNR / balanced accuracy at the operating point chosen
by finetune.py (finetune.json). Images of the finetune split are left out.
A run without finetune.json gets its operating point from its validation
normals by the normal-only rule (see :func:`mvtec_keras.operating_point.operating_point_for_run`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from ..errors import InputError
from ..fileio import staged_dir, write_json
from .common import add_verbose, category_from_info, model_dir_from_arg, run_main
from ..operating_point import DEFAULT_TARGET_FPR, operating_point_for_run
from .finetune import load_for_scoring
from ..reports.html import write_run_report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="test.py", description=__doc__.split("\n")[0])
    p.add_argument("-p", "--path", required=True, help="DIR/model.keras or the model folder")
    p.add_argument("-s", "--save-segmentations", action="store_true", help="also write binary segmentations")
    p.add_argument("--max-overlays", type=int, default=40, help="anomaly-map overlays to draw (default 40; 0 = none)")
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("-q", "--quiet", action="store_true")
    return add_verbose(p)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from .. import metrics, reports, thresholds
    from ..data import Preprocessing, make_dataset
    from .common import check_range

    check_range(args.max_overlays, "--max-overlays", 0)
    check_range(args.batch_size, "-b/--batch-size", 1)
    model_dir = model_dir_from_arg(args.path)
    det, info = load_for_scoring(model_dir)
    verbose = not args.quiet
    ft = operating_point_for_run(model_dir, det, args.batch_size, progress=verbose)
    if "source" in ft and verbose:
        print(f"no finetune.json: operating point from the validation normals by the normal-only rule "
              f"(image score >= {ft['threshold']:.6g}, target FPR {DEFAULT_TARGET_FPR:g}); "
              "run finetune.py to choose one on labelled images")
    prep = Preprocessing.from_dict(info["preprocessing"])
    cat = category_from_info(info)
    excluded = set(ft.get("finetune_files", []))
    test = [s for s in cat.test if s.path not in excluded]
    if not test:
        raise InputError(f"empty split: no test images left for {cat.root} after removing the finetune split")
    t0 = time.perf_counter()
    res = det.score(make_dataset(test, prep, args.batch_size), keep_images=args.max_overlays > 0, progress=verbose)
    scoring_s = time.perf_counter() - t0
    labels = res.labels.astype(int)

    out = {"detector": det.name, "n_images": int(len(test)), "n_defective": int(labels.sum()),
           "n_excluded_finetune": len(excluded), "scoring_img_per_s": round(len(test) / max(scoring_s, 1e-9), 2)}
    out["image_auroc"] = metrics.image_auroc(labels, res.scores)
    out["image_ap"] = metrics.average_precision(labels, res.scores)
    out["f1_max"] = metrics.f1_max(labels, res.scores)[0]
    has_mask = np.array([s.mask_path is not None or s.label == 0 for s in test])
    if res.maps is not None and has_mask.any() and res.masks[has_mask].any():
        out["pixel_auroc"] = metrics.pixel_auroc(res.masks[has_mask], res.maps[has_mask])
        out["aupro"] = metrics.aupro(res.masks[has_mask], res.maps[has_mask])
        out["n_pixel_images"] = int(has_mask.sum())
    else:
        out["pixel_auroc"] = out["aupro"] = None

    pred, segs = thresholds.decide(ft, res.scores, res.maps)
    out.update(metrics.threshold_metrics(labels, pred))
    # The oracle: a yardstick for the chosen point, from these images' labels; never used to choose.
    out["oracle_balanced_accuracy"], out["oracle_threshold"] = metrics.best_balanced_accuracy(labels, res.scores)
    out["oracle_gap"] = out["oracle_balanced_accuracy"] - out["balanced_accuracy"]
    out["n_good"] = int((labels == 0).sum())
    if ft.get("target_fpr") is not None:
        out["target_fpr"] = float(ft["target_fpr"])  # beside out["fpr"], the rate seen on the good images
    out["min_area"], out["threshold"] = ft.get("min_area"), ft["threshold"]
    out["decision"], out["rule"] = ft.get("decision"), ft.get("rule")
    for key in ("map_sigma", "score_reduction"):
        if key in ft:
            out[key] = ft[key]
    out["finetune_mode"] = ft.get("mode")
    out["operating_point_source"] = ft.get("source", "finetune.json")

    with staged_dir(os.path.join(model_dir, "test")) as tmp:
        write_json(os.path.join(tmp, "test_result.json"), out)
        reports.write_predictions_csv(
            os.path.join(tmp, "predictions.csv"), res.paths, res.defect_types, res.scores,
            pred, labels,
        )
        reports.plot_roc(labels, res.scores, os.path.join(tmp, "roc_curve.png"))
        reports.plot_score_histogram(res.scores, labels, os.path.join(tmp, "score_histogram.png"),
                                     threshold=(ft["threshold"] if ft.get("decision") == "image_score" else None),
                                     defect_types=res.defect_types)
        if res.maps is not None and out.get("pixel_auroc") is not None:
            reports.plot_pixel_roc(res.masks[has_mask], res.maps[has_mask], os.path.join(tmp, "pixel_roc_curve.png"))
        if res.maps is not None and args.max_overlays > 0:
            order = _overlay_order(labels, args.max_overlays)
            reports.plot_overlays(res.images[order], res.maps[order], os.path.join(tmp, "overlays"),
                                  paths=[f"{res.defect_types[i]}/{os.path.basename(res.paths[i])}" for i in order],
                                  masks=res.masks[order], segmentations=None if segs is None else segs[order])
        if args.save_segmentations and segs is not None:
            reports.save_segmentations(segs, os.path.join(tmp, "segmentations"),
                                       [f"{t}/{os.path.basename(p)}" for t, p in zip(res.defect_types, res.paths)])
        table = reports.per_defect_table(res, pred)
        with open(os.path.join(tmp, "per_defect.txt"), "w") as f:
            f.write(table + "\n")
        write_run_report(tmp, out, res, ft, pred, segs, det=det, title=f"{det.name} on {cat.name}")
    if verbose:
        print(table)
        keys = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "tpr", "tnr", "balanced_accuracy")
        print("  ".join(f"{k}={out[k]:.4f}" for k in keys if out.get(k) is not None))
        for line in decision_lines(out):
            print(line)
        print(f"wrote {os.path.join(model_dir, 'test')}")


def decision_lines(out: dict) -> list:
    """The chosen point beside the oracle, and the normal-only rule's rate beside its target."""
    lines = []
    if np.isfinite(out.get("oracle_balanced_accuracy", np.nan)):
        lines.append(f"balanced accuracy at the chosen point {out['balanced_accuracy']:.4f}; the best any image-score "
                     f"threshold reaches on these images (oracle, reported only) {out['oracle_balanced_accuracy']:.4f}; "
                     f"gap {out['oracle_gap']:.4f}")
    if out.get("target_fpr") is not None and out.get("n_good"):
        lines.append(f"false-positive rate on the {out['n_good']} good test images {out['fpr']:.4f} "
                     f"(target {out['target_fpr']:g})")
    return lines


def _overlay_order(labels, n):
    """Up to n images, defective ones first, spread over the set."""
    idx = np.argsort(-labels, kind="stable")
    return np.sort(idx[:n])


def cli(argv=None) -> int:
    return run_main(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
