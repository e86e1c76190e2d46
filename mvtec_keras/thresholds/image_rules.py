"""Rules that decide on image scores: best balanced accuracy / F1 on a labelled split, a target FPR
on validation normals, and the chi-squared bound of a fitted Gaussian."""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError
from ._checks import _check_fpr


def threshold_from_fpr(val_scores, target_fpr: float = 0.01) -> float:
    """Lowest threshold whose false-positive rate on defect-free scores is <= ``target_fpr``.

    With ``k = floor(target_fpr * n)`` false positives allowed, it is the next
    representable value above the (k+1)-th largest score (in the scores' dtype,
    so that ``scores >= threshold`` counts exactly).
    """
    s = np.asarray(val_scores).reshape(-1)
    if s.size == 0 or not np.issubdtype(s.dtype, np.number) or not np.isfinite(s).all():
        raise InputError("val_scores: expected a non-empty array of finite numbers")
    s = s.astype(np.float32 if s.dtype == np.float32 else np.float64, copy=False)
    allowed = math.floor(_check_fpr(target_fpr) * s.size + 1e-9)
    v = np.partition(s, s.size - 1 - allowed)[s.size - 1 - allowed]
    return float(np.nextafter(v, s.dtype.type(np.inf)))


def _scores(values, name) -> np.ndarray:
    s = np.asarray(values).reshape(-1)
    if s.size == 0 or not np.issubdtype(s.dtype, np.number) or not np.isfinite(s).all():
        raise InputError(f"{name}: expected a non-empty array of finite numbers")
    return s.astype(np.float64)


def _labelled(scores, labels, name="ft_labels"):
    s = _scores(scores, "ft_scores")
    y = np.asarray(labels).reshape(-1)
    if y.size != s.size or not np.isin(y, (0, 1)).all():
        raise InputError(f"{name}: expected {s.size} labels in {{0, 1}} (1 = defective)")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise InputError(f"{name}: a labelled rule needs both normal and defective images")
    return s, y


def _image_score_sweep(scores, labels):
    """Candidate thresholds between consecutive distinct scores (never the minimum, so some image
    is always left unflagged; the highest candidate flags only the top score) with TP / FP counts."""
    s, y = _labelled(scores, labels)
    u = np.unique(s)
    if u.size < 2:
        return None
    cand = (u[:-1] + u[1:]) / 2  # midway: the same decisions on this split, a margin on both sides
    cand = np.where((cand > u[:-1]) & (cand <= u[1:]), cand, u[1:])  # float rounding guard
    order = np.sort(s[y]), np.sort(s[~y])
    tp = y.sum() - np.searchsorted(order[0], cand, side="left")
    fp = (~y).sum() - np.searchsorted(order[1], cand, side="left")
    return cand, tp, fp, int(y.sum()), int((~y).sum())


def _image_point(rule, cand, j, tp, fp, npos, nneg, score):
    return {
        "rule": rule,
        "decision": "image_score",
        "threshold": float(cand[j]),
        "min_area": None,
        "score": float(score),
        "tpr": float(tp[j] / npos),
        "tnr": float(1 - fp[j] / nneg),
        "chosen_on": "finetune split",
    }


def balanced_optimal(ft_scores, ft_labels) -> dict:
    """Image-score threshold with the best balanced accuracy on a labelled split (ties: highest)."""
    sweep = _image_score_sweep(ft_scores, ft_labels)
    if sweep is None:
        raise InputError("ft_scores: every image has the same score; no threshold separates any of them")
    cand, tp, fp, npos, nneg = sweep
    bal = (tp / npos + 1 - fp / nneg) / 2
    j = int(len(bal) - 1 - np.argmax(bal[::-1]))
    return _image_point("balanced", cand, j, tp, fp, npos, nneg, bal[j])


def f1_optimal(ft_scores, ft_labels) -> dict:
    """Image-score threshold with the best F1 on a labelled split (ties: highest threshold).

    The flag-everything threshold is not a candidate: on a mostly defective
    split it can have the best F1 while telling nothing.
    """
    sweep = _image_score_sweep(ft_scores, ft_labels)
    if sweep is None:
        raise InputError("ft_scores: every image has the same score; no threshold separates any of them")
    cand, tp, fp, npos, nneg = sweep
    f1 = 2 * tp / np.maximum(tp + fp + npos, 1)
    j = int(len(f1) - 1 - np.argmax(f1[::-1]))
    return _image_point("f1", cand, j, tp, fp, npos, nneg, f1[j])


def normal_fpr(val_scores, target_fpr: float = 0.01) -> dict:
    """Normal-only rule: the image-score threshold at ``target_fpr`` on validation normals.

    See :func:`threshold_from_fpr`; it lies above the minimum score always and
    above every validation score when ``target_fpr * N < 1``.
    """
    s = np.asarray(val_scores).reshape(-1)
    return {
        "rule": "fpr",
        "decision": "image_score",
        "threshold": threshold_from_fpr(s, target_fpr),
        "min_area": None,
        "target_fpr": float(target_fpr),
        "score": None,
        "chosen_on": f"{s.size} validation normals",
    }


def chi2_bound(gaussian: dict, target_fpr: float = 0.01) -> dict:
    """Gaussian methods: a threshold from the fitted distribution, no images needed.

    ``gaussian`` describes the score under the fitted Gaussian (see
    ``Detector.gaussian_score_model``): ``dofs``, one degrees-of-freedom count
    per distance term (a squared Mahalanobis distance in ``d`` dimensions is
    chi-squared with ``d`` dof for a sample of that Gaussian), and ``combine``,
    how the (unsquared) distances make the image score: ``"sum"`` (Mahalanobis,
    one term per level) or ``"max"`` (PaDiM, one term per feature position; the
    upsampling and blur only average positions, so they cannot raise the maximum).

    Threshold, over the L terms (chi quantiles, the square roots of chi2's):

    - ``max``: the maximum of the (1 - target_fpr / L) quantiles. A normal
      image exceeds it only if some term exceeds its quantile, so by the union
      bound its false-positive rate is at most ``target_fpr``, however the
      positions correlate.
    - ``sum``: the sum of the (1 - target_fpr) quantiles: the exact quantile of
      the sum when the levels move together (comonotone), and above it for
      less dependent near-normal terms (chi with many dof), so the rate stays
      at or under ``target_fpr`` (a union bound here would be far too high:
      it flags nothing).

    Real features are not exactly Gaussian and the fit is estimated from few
    images, so the rate actually seen on normal images can be higher; the
    normal-only rule measures it instead.
    """
    from scipy.stats import chi2

    fpr = _check_fpr(target_fpr)
    if fpr <= 0:
        raise InputError("chi2 rule: target_fpr must be > 0")
    dofs = np.asarray(gaussian.get("dofs", []), dtype=np.float64).reshape(-1)
    combine = gaussian.get("combine")
    if dofs.size == 0 or (dofs < 1).any() or combine not in ("sum", "max"):
        raise InputError(f"chi2 rule: not a Gaussian score model: {gaussian}")
    if combine == "max":
        threshold = float(np.sqrt(chi2.isf(fpr / dofs.size, dofs)).max())
    else:
        threshold = float(np.sqrt(chi2.isf(fpr, dofs)).sum())
    return {
        "rule": "chi2",
        "decision": "image_score",
        "threshold": threshold,
        "min_area": None,
        "target_fpr": fpr,
        "score": None,
        "chosen_on": "fitted Gaussian (chi-squared bound)",
    }
