"""Evaluation metrics: image level (one score per image) and pixel level (maps vs masks).

Convention everywhere: higher score = more anomalous, label 1 = defective, and
a sample is predicted defective when ``score >= threshold``.  Threshold-free
metrics are computed from one exact sweep over every distinct score (a single
sort), so they agree with scikit-learn while staying fast on millions of pixels.
Undefined values (a class is absent) come back as NaN, never as an exception.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .errors import InputError

__all__ = [
    "image_auroc",
    "average_precision",
    "f1_max",
    "best_balanced_accuracy",
    "pixel_auroc",
    "aupro",
    "threshold_metrics",
    "image_metrics",
    "pixel_metrics",
]

_trapezoid = getattr(np, "trapezoid", None) or np.trapz

# 8-connectivity for defect regions, as in the evaluation code released with the
# MVTec AD paper: pixels touching by a corner belong to the same defect.
_REGION_STRUCTURE = np.ones((3, 3), dtype=bool)


# -- input checks ------------------------------------------------------------
def _binary(values, name: str) -> np.ndarray:
    y = np.asarray(values)
    if y.dtype == bool:
        return y
    if not np.issubdtype(y.dtype, np.number):
        raise InputError(f"{name}: expected 0/1 values, got dtype {y.dtype}")
    if y.size and not ((y == 0) | (y == 1)).all():
        raise InputError(f"{name}: expected binary 0/1 values (1 = defective)")
    return y.astype(bool)


def _finite(values, name: str) -> np.ndarray:
    s = np.asarray(values)
    if not np.issubdtype(s.dtype, np.number):
        raise InputError(f"{name}: expected numbers, got dtype {s.dtype}")
    s = s.astype(np.float32 if s.dtype == np.float32 else np.float64, copy=False)
    if not np.isfinite(s).all():
        raise InputError(f"{name}: contains NaN or infinite values")
    return s


def _image_inputs(labels, scores):
    y = _binary(labels, "labels").reshape(-1)
    s = _finite(scores, "scores").reshape(-1)
    if y.shape != s.shape:
        raise InputError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    return y, s


def _squeeze_channel(a):
    a = np.asarray(a)
    return a[..., 0] if a.ndim == 4 and a.shape[-1] == 1 else a


def _pixel_inputs(masks, maps):
    m = _binary(_squeeze_channel(masks), "masks")
    s = _finite(_squeeze_channel(maps), "maps")
    if m.ndim != 3:
        raise InputError(f"masks: expected shape [N, H, W], got {m.shape}")
    if m.shape != s.shape:
        raise InputError(f"masks {m.shape} and maps {s.shape} differ in shape")
    return m, s


# -- the exact threshold sweep -----------------------------------------------
def _sweep(scores: np.ndarray):
    """Descending sort order and the last index of each run of equal scores.

    Cumulative sums of any per-sample weight, read at ``ends``, give the weight
    at or above each distinct threshold ``scores[order][ends]``.
    """
    order = np.argsort(-scores)  # order inside a run of ties is irrelevant
    s = scores[order]
    ends = np.append(np.flatnonzero(s[1:] != s[:-1]), s.size - 1)
    return order, ends, s[ends]


def _binary_curve(y: np.ndarray, order, ends):
    tps = np.cumsum(y[order], dtype=np.int64)[ends]
    fps = ends + 1 - tps
    return tps, fps


def _auroc_from_curve(tps, fps):
    P, N = tps[-1], fps[-1]
    if P == 0 or N == 0:
        return float("nan")
    return float(_trapezoid(np.r_[0.0, tps / P], np.r_[0.0, fps / N]))


def _ap_from_curve(tps, fps):
    # Step-wise sum of precision over recall increments (scikit-learn's definition).
    P = tps[-1]
    if P == 0:
        return float("nan")
    precision = tps / (tps + fps)
    recall_gain = np.diff(np.r_[0, tps]) / P
    return float(np.sum(recall_gain * precision))


def _f1_from_curve(tps, fps, thresholds):
    P = tps[-1]
    if P == 0:
        return float("nan"), float("nan")
    f1 = 2.0 * tps / (tps + fps + P)
    k = int(np.argmax(f1))  # ties: the highest threshold
    return float(f1[k]), float(thresholds[k])


def _partial_area(x, y, limit):
    """Area under the polyline through (0, 0) and (x, y) for x in [0, limit]; x non-decreasing."""
    x = np.r_[0.0, x]
    y = np.r_[0.0, y]
    k = int(np.searchsorted(x, limit, side="right"))  # points with x <= limit
    if k < x.size:
        # Interpolate the curve exactly at the limit (x[k] > limit >= x[k-1]).
        y_lim = y[k - 1] + (y[k] - y[k - 1]) * (limit - x[k - 1]) / (x[k] - x[k - 1])
        x = np.r_[x[:k], limit]
        y = np.r_[y[:k], y_lim]
    return float(_trapezoid(y, x))


# -- image level -------------------------------------------------------------
def image_auroc(labels, scores) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    y, s = _image_inputs(labels, scores)
    order, ends, _ = _sweep(s)
    return _auroc_from_curve(*_binary_curve(y, order, ends))


def average_precision(labels, scores) -> float:
    """Average precision (step-wise area under precision-recall); NaN with no positives."""
    y, s = _image_inputs(labels, scores)
    order, ends, _ = _sweep(s)
    return _ap_from_curve(*_binary_curve(y, order, ends))


def f1_max(labels, scores):
    """Best F1 over all thresholds -> ``(f1, threshold)``; predict defective when ``score >= threshold``."""
    y, s = _image_inputs(labels, scores)
    order, ends, thr = _sweep(s)
    return _f1_from_curve(*_binary_curve(y, order, ends), thr)


def best_balanced_accuracy(labels, scores):
    """The oracle operating point: the best balanced accuracy any image-score threshold reaches.

    -> ``(balanced accuracy, threshold)``, deciding defective when ``score >= threshold``
    (ties: the highest threshold); NaN and NaN when a class is absent. It looks at the labels
    of the images it is given, so it is a yardstick for a chosen point, never a way to choose one.
    """
    y, s = _image_inputs(labels, scores)
    order, ends, thr = _sweep(s)
    tps, fps = _binary_curve(y, order, ends)
    P, N = tps[-1], fps[-1]
    if P == 0 or N == 0:
        return float("nan"), float("nan")
    bal = (tps / P + 1.0 - fps / N) / 2.0
    k = int(np.argmax(bal))  # thresholds descend: the first maximum is the highest threshold
    return float(bal[k]), float(thr[k])


def threshold_metrics(labels, predictions) -> dict:
    """Confusion counts and rates of binary predictions; NaN where a rate is undefined."""
    y = _binary(labels, "labels").reshape(-1)
    p = _binary(predictions, "predictions").reshape(-1)
    if y.shape != p.shape:
        raise InputError(f"labels ({y.size}) and predictions ({p.size}) differ in length")
    tp = int(np.sum(y & p))
    fp = int(np.sum(~y & p))
    fn = int(np.sum(y & ~p))
    tn = int(np.sum(~y & ~p))

    def ratio(a, b):
        return a / b if b else float("nan")

    tpr, tnr = ratio(tp, tp + fn), ratio(tn, tn + fp)
    return {
        "tpr": tpr,
        "tnr": tnr,
        "fpr": ratio(fp, fp + tn),
        "precision": ratio(tp, tp + fp),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "balanced_accuracy": (tpr + tnr) / 2,  # NaN unless both classes are present
        "accuracy": ratio(tp + tn, y.size),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def image_metrics(labels, scores, threshold=None) -> dict:
    """Threshold-free image metrics; with ``threshold``, also :func:`threshold_metrics` at it."""
    y, s = _image_inputs(labels, scores)
    order, ends, thr = _sweep(s)
    tps, fps = _binary_curve(y, order, ends)
    f1, f1_thr = _f1_from_curve(tps, fps, thr)
    out = {
        "image_auroc": _auroc_from_curve(tps, fps),
        "image_ap": _ap_from_curve(tps, fps),
        "image_f1_max": f1,
        "image_f1_threshold": f1_thr,
    }
    if threshold is not None:
        out["threshold"] = float(threshold)
        out.update(threshold_metrics(y, s >= threshold))
    return out


# -- pixel level -------------------------------------------------------------
def pixel_auroc(masks, maps) -> float:
    """ROC AUC over all pixels of all images (masks and maps ``[N, H, W]``)."""
    m, s = _pixel_inputs(masks, maps)
    order, ends, _ = _sweep(s.reshape(-1))
    return _auroc_from_curve(*_binary_curve(m.reshape(-1), order, ends))


def _pro_weights(m: np.ndarray):
    """Per-pixel weight 1 / (n_regions * region size) on defect pixels, 0 elsewhere.

    Summing it over the pixels scoring >= t gives PRO(t), the mean over regions of
    the covered fraction, so one cumulative sum replaces a loop over regions.
    """
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = _REGION_STRUCTURE  # connect within an image, never across images
    regions, n_regions = ndimage.label(m, structure=structure)
    if n_regions == 0:
        return None
    sizes = np.bincount(regions.reshape(-1))
    w = np.zeros(sizes.size)
    w[1:] = 1.0 / (n_regions * sizes[1:])
    return w[regions.reshape(-1)]


def _aupro_sorted(m_flat, order, ends, weights, fpr_limit):
    if weights is None or m_flat.all():
        return float("nan")
    normal = ~m_flat
    fpr = np.cumsum(normal[order], dtype=np.int64)[ends] / np.count_nonzero(normal)
    pro = np.cumsum(weights[order])[ends]
    return _partial_area(fpr, pro, fpr_limit) / fpr_limit


def _check_limit(fpr_limit):
    if not 0 < fpr_limit <= 1:
        raise InputError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return float(fpr_limit)


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit``.

    Regions are the 8-connected components of each ground-truth mask. PRO(t) is
    the mean over all regions of all images of the fraction of the region's
    pixels scoring >= t; FPR(t) is measured on all defect-free pixels. The curve
    is integrated (trapezoids, exact interpolation at the limit) over FPR in
    ``[0, fpr_limit]`` and divided by ``fpr_limit``. NaN without defect regions.
    """
    fpr_limit = _check_limit(fpr_limit)
    m, s = _pixel_inputs(masks, maps)
    weights = _pro_weights(m)
    if weights is None:
        return float("nan")
    order, ends, _ = _sweep(s.reshape(-1))
    return _aupro_sorted(m.reshape(-1), order, ends, weights, fpr_limit)


def pixel_metrics(masks, maps, fpr_limit: float = 0.3) -> dict:
    """Pixel AUROC, AP, best F1 and AUPRO, sharing a single sort of the pixel scores."""
    fpr_limit = _check_limit(fpr_limit)
    m, s = _pixel_inputs(masks, maps)
    m_flat = m.reshape(-1)
    order, ends, thr = _sweep(s.reshape(-1))
    tps, fps = _binary_curve(m_flat, order, ends)
    f1, f1_thr = _f1_from_curve(tps, fps, thr)
    return {
        "pixel_auroc": _auroc_from_curve(tps, fps),
        "pixel_ap": _ap_from_curve(tps, fps),
        "pixel_f1_max": f1,
        "pixel_f1_threshold": f1_thr,
        "aupro": _aupro_sorted(m_flat, order, ends, _pro_weights(m), fpr_limit),
        "aupro_fpr_limit": fpr_limit,
    }
