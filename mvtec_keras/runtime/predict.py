"""Score unlabelled images, decide at the run's operating point, write CSV, overlays and a summary.

The decision is :func:`mvtec_keras.thresholds.decide` -- the code test.py
uses. One unreadable or wrong-mode file is recorded with its error and the
others are still scored.
"""

from __future__ import annotations

import csv
import os
import sys


from ..errors import InputError
from ..fileio import staged_dir, write_json

CSV_COLUMNS = ("file", "score", "decision", "anomalous_area_px", "threshold", "error")


def _progress(items, enabled):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="predicting", unit="img")


def _overlay_name(path, used):
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.splitext(os.path.basename(path))[0])
    name, k = f"{stem}.png", 1
    while name in used:
        k += 1
        name = f"{stem}_{k}.png"
    used.add(name)
    return name


def predict_images(scorer, files, out_dir: str, progress: bool = True) -> dict:
    """Score ``files`` with ``scorer`` (see :mod:`mvtec_keras.runtime.scorers`) into ``out_dir``."""
    from ..thresholds import decide

    if not files:
        raise InputError("IMAGES: no image files to predict")
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, "predictions.csv")):
        raise InputError(f"--out: {out_dir} exists and holds other files; choose an empty or new folder")
    op = scorer.operating_point
    rows, n_bad, n_anom, used = [], 0, 0, set()
    with staged_dir(out_dir) as tmp:
        for path in _progress(files, progress):
            try:
                x, shown = scorer.prepare(path)
                scores, maps = scorer.score(x)
            except InputError as e:
                n_bad += 1
                print(f"error: {e}", file=sys.stderr)
                rows.append({"file": path, "error": str(e)})
                continue
            pred, segs = decide(op, scores, maps)
            flagged = bool(pred[0])
            area = int(segs[0].sum()) if segs is not None else ""
            rows.append({"file": path, "score": repr(float(scores[0])), "decision": int(flagged),
                         "anomalous_area_px": area, "threshold": repr(float(op["threshold"])), "error": ""})
            if flagged:
                n_anom += 1
                from .overlay import overlay_png

                overlay_png(os.path.join(tmp, "overlays", _overlay_name(path, used)), shown,
                            None if maps is None else maps[0], None if segs is None else segs[0])
        with open(os.path.join(tmp, "predictions.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, restval="")
            w.writeheader()
            w.writerows(rows)
        summary = {
            "source": scorer.source,
            "n_images": len(files),
            "n_scored": len(files) - n_bad,
            "n_anomalous": n_anom,
            "n_unreadable": n_bad,
            "operating_point": {k: op.get(k) for k in ("decision", "threshold", "min_area", "map_sigma", "mode",
                                                       "target_fpr") if k in op},
            "threshold_from_validation_fpr": bool(scorer.fallback),
        }
        write_json(os.path.join(tmp, "summary.json"), summary)
    return summary
