"""Console tables and CSV files summarising a scored test set."""

from __future__ import annotations

import csv
import os

import numpy as np

from ..errors import InputError
from ..fileio import atomic_path

#: pixel AUROC in the table uses at most this many pixels per row (fixed-seed sample)
MAX_TABLE_PIXELS = 16_000_000

_COLUMNS = ("defect type", "n", "mean score", "image AUROC", "det. rate", "pixel AUROC")


def _auroc(y: np.ndarray, s: np.ndarray):
    # The project's metric, so the table agrees with test_result.json; None when one class is absent.
    from ..metrics import image_auroc

    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return None
    return float(image_auroc(y.astype(int), s))


def _pixel_auroc(masks, maps, rows: np.ndarray, max_pixels: int, seed: int = 0):
    y = masks[rows].reshape(-1) > 0
    s = maps[rows].reshape(-1)
    if y.size > max_pixels:  # sorting tens of millions of pixels is slow; a big sample is accurate
        idx = np.sort(np.random.default_rng(seed).choice(y.size, size=max_pixels, replace=False))
        y, s = y[idx], s[idx]
    return _auroc(y, s)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def per_defect_table(result, predictions=None, max_pixels: int = MAX_TABLE_PIXELS) -> str:
    """A plain-text table with one row per defect type and a total row.

    Columns: defect type, n, mean score, image AUROC of the type against the good
    images, det. rate (share of the row's images predicted defective: the false-alarm
    rate on the good row, the share of all defective images caught on the total row)
    and pixel AUROC over the type's and the good images (needs maps and masks).
    ``-`` marks a value that cannot be computed.
    """
    s = np.asarray(result.scores, dtype=np.float64).reshape(-1)
    n = s.size
    if n == 0:
        raise InputError("result: no scores to tabulate")
    types = None if result.defect_types is None else np.asarray([str(t) for t in result.defect_types])
    if result.labels is not None:
        y = np.asarray(result.labels).reshape(-1).astype(bool)
    elif types is not None:
        y = types != "good"
    else:
        raise InputError("result: needs labels or defect_types to group images")
    if types is None:
        types = np.where(y, "defective", "good")
    if y.size != n or types.size != n:
        raise InputError(f"result: {n} scores but {y.size} labels and {types.size} defect types")
    pred = None
    if predictions is not None:
        pred = np.asarray(predictions).reshape(-1).astype(bool)
        if pred.size != n:
            raise InputError(f"predictions: {pred.size} entries but {n} scores")
    maps = masks = None
    if result.maps is not None and result.masks is not None:
        maps = np.asarray(result.maps, dtype=np.float32)
        masks = np.asarray(result.masks)
        if maps.shape != masks.shape or maps.shape[0] != n:
            raise InputError(f"result: maps {maps.shape} and masks {masks.shape} do not match {n} images")

    good = ~y
    # Normal types first, then defect types, each alphabetical.
    names = sorted(set(types.tolist()), key=lambda t: (bool(y[types == t].any()), t))
    rows = []
    for t in names:
        sel = types == t
        defective = bool(y[sel].any())
        both = sel | good
        rows.append(
            (
                t,
                int(sel.sum()),
                float(s[sel].mean()),
                _auroc(y[both], s[both]) if defective else None,
                None if pred is None else float(pred[sel].mean()),
                _pixel_auroc(masks, maps, both, max_pixels) if (defective and maps is not None) else None,
            )
        )
    rows.append(
        (
            "total",
            n,
            float(s.mean()),
            _auroc(y, s),
            None if pred is None or not y.any() else float(pred[y].mean()),
            None if maps is None else _pixel_auroc(masks, maps, np.ones(n, bool), max_pixels),
        )
    )

    cells = [list(_COLUMNS)] + [
        [t, str(k), _fmt(m, ".4g"), _fmt(a, ".4f"), _fmt(d, ".3f"), _fmt(p, ".4f")] for t, k, m, a, d, p in rows
    ]
    widths = [max(len(r[j]) for r in cells) for j in range(len(_COLUMNS))]

    def line(r):
        # Name column left-aligned, numbers right-aligned.
        return "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))

    rule = "-" * len(line(cells[0]))
    out = [line(cells[0]), rule] + [line(r) for r in cells[1:-1]] + [rule, line(cells[-1])]
    return "\n".join(out)


def write_predictions_csv(path, paths, defect_types, scores, predictions, labels=None) -> str:
    """One row per image: file, defect_type, score, prediction, truth (blank if unknown).

    Scores are written with ``repr`` so they read back exactly. Returns the path.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = s.size
    pred = np.asarray(predictions).reshape(-1)
    cols = {"paths": paths, "defect_types": defect_types, "predictions": pred, "labels": labels}
    for name, v in cols.items():
        if v is not None and len(v) != n:
            raise InputError(f"{name}: {len(v)} entries but {n} scores")
    if paths is None:
        raise InputError("paths: one file name per score is required")

    def text(v):
        return v.decode() if isinstance(v, bytes) else str(v)

    path = os.path.abspath(os.fspath(path))
    with atomic_path(path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file", "defect_type", "score", "prediction", "truth"])
            for i in range(n):
                w.writerow(
                    [
                        text(paths[i]),
                        "" if defect_types is None else text(defect_types[i]),
                        repr(float(s[i])),
                        int(pred[i]),
                        "" if labels is None else int(labels[i]),
                    ]
                )
    return path
