"""Rules that decide on image scores: best balanced accuracy / F1 on a labelled split, a target FPR
on validation normals, and the chi-squared bound of a fitted Gaussian."""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError
from ._checks import _check_fpr


def conformal_rank(n: int, target_fpr: float) -> int:
    """Rank k of the conformal threshold: ``ceil((n + 1) * (1 - target_fpr))``, at most ``n + 1``.

    For n exchangeable normal scores and a new normal one, flagging scores above
    the k-th smallest keeps the expected false-positive rate at most
    ``1 - k / (n + 1) <= target_fpr``. ``k = n + 1`` means n is too small for the
    target (``n + 1 < 1 / target_fpr``): no validation score is low enough.
    """
    k = math.ceil((n + 1) * (1.0 - _check_fpr(target_fpr)) - 1e-9)
    return int(min(max(k, 1), n + 1))


def normals_needed(target_fpr: float) -> int:
    """Fewest validation normals whose conformal threshold meets ``target_fpr``: ``n + 1 >= 1 / target_fpr``."""
    fpr = _check_fpr(target_fpr)
    return None if fpr <= 0 else max(1, math.ceil(1.0 / fpr - 1 - 1e-9))  # None: no n is enough for 0


def threshold_from_fpr(val_scores, target_fpr: float = 0.01) -> float:
    """The conformal threshold on defect-free scores for a false-positive rate of at most ``target_fpr``.

    Flags a score above the k-th smallest validation score, k =
    :func:`conformal_rank`: returned as the next representable value above it
    (in the scores' dtype, so that ``scores >= threshold`` counts exactly). When
    n is too small for the target, the threshold lies above every validation
    score and the rate it promises is only ``1 / (n + 1)``.
    """
    s = np.asarray(val_scores).reshape(-1)
    if s.size == 0 or not np.issubdtype(s.dtype, np.number) or not np.isfinite(s).all():
        raise InputError("val_scores: expected a non-empty array of finite numbers")
    s = s.astype(np.float32 if s.dtype == np.float32 else np.float64, copy=False)
    k = min(conformal_rank(s.size, target_fpr), s.size)
    v = np.partition(s, k - 1)[k - 1]
    return float(np.nextafter(v, s.dtype.type(np.inf)))


def conformal_summary(n: int, target_fpr: float) -> dict:
    """What the normal-only rule can promise with n validation normals (written into the operating point)."""
    k = conformal_rank(n, target_fpr)
    return {"rank": k, "n": int(n), "guaranteed": k <= n, "normals_needed": normals_needed(target_fpr),
            "promised_fpr": float(1.0 - min(k, n) / (n + 1))}


def conformal_warning(op: dict):
    """One line when the operating point's n validation normals are too few for its target, else None."""
    c = op.get("conformal")
    if not c or c.get("guaranteed", True):
        return None
    need = "no number of" if c["normals_needed"] is None else f"at least {c['normals_needed']}"
    return (f"target FPR {op['target_fpr']:g} needs {need} validation normals for its "
            f"guarantee and {c['n']} were given: the threshold sits above all of them, which promises an FPR of at "
            f"most {c['promised_fpr']:.3g} (1 / (n + 1)); give more normals (--val-fraction) or a target >= "
            f"{1 / (c['n'] + 1):.3g}")


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
    """The ascending distinct scores ``u`` and the TP / FP counts of a threshold in each gap
    (u[j], u[j+1]] (never at or below the minimum, so some image is always left unflagged; the
    highest gap flags only the top score)."""
    s, y = _labelled(scores, labels)
    u = np.unique(s)
    if u.size < 2:
        return None
    order = np.sort(s[y]), np.sort(s[~y])
    tp = y.sum() - np.searchsorted(order[0], u[1:], side="left")
    fp = (~y).sum() - np.searchsorted(order[1], u[1:], side="left")
    return u, tp, fp, int(y.sum()), int((~y).sum())


def _mid(lo: float, hi: float, log: bool) -> float:
    """The middle of (lo, hi]: geometric for positive scores (distances, errors), else arithmetic."""
    m = math.sqrt(lo) * math.sqrt(hi) if log else lo / 2 + hi / 2
    return m if lo < m <= hi else hi  # float rounding guard


def _robust_threshold(u, values):
    """Threshold for the best of ``values`` (one per gap (u[j], u[j+1]] of the ascending distinct
    scores ``u``): among the runs of consecutive gaps that reach it, the widest on the scores' scale
    (log when all are positive; ties: the highest run); the middle of that run, moved off any score
    it lands on. Returns ``(threshold, j of the gap holding it, (low, high) of the run)``."""
    best = values.max()
    hit = np.isclose(values, best, rtol=0, atol=1e-12)
    edges = np.flatnonzero(np.diff(np.r_[0, hit.astype(np.int8), 0]))
    runs = list(zip(edges[::2], edges[1::2] - 1))  # [first gap, last gap] of each run
    log = bool(u[0] > 0)
    scale = np.log if log else (lambda v: v)
    widths = [scale(u[b + 1]) - scale(u[a]) for a, b in runs]
    a, b = runs[len(runs) - 1 - int(np.argmax(widths[::-1]))]
    lo, hi = float(u[a]), float(u[b + 1])
    t = _mid(lo, hi, log)
    j = int(np.searchsorted(u, t, side="left")) - 1  # u[j] < t <= u[j + 1]
    if t == u[j + 1] and j + 1 <= b:  # landed on a score inside the run: the middle of its gap instead
        t = _mid(float(u[j]), float(u[j + 1]), log)
    return t, j, (lo, hi)


def _image_point(rule, scores, labels, metric):
    """The image-score point best by ``metric(tp, fp, npos, nneg)`` on a labelled split."""
    sweep = _image_score_sweep(scores, labels)
    if sweep is None:
        raise InputError("ft_scores: every image has the same score; no threshold separates any of them")
    u, tp, fp, npos, nneg = sweep
    values = metric(tp, fp, npos, nneg)
    t, j, interval = _robust_threshold(u, values)
    return {
        "rule": rule,
        "decision": "image_score",
        "threshold": float(t),
        "min_area": None,
        "score": float(values[j]),
        "tpr": float(tp[j] / npos),
        "tnr": float(1 - fp[j] / nneg),
        "threshold_interval": [interval[0], interval[1]],
        "chosen_on": "finetune split",
    }


def _balanced(tp, fp, npos, nneg):
    return (tp / npos + 1 - fp / nneg) / 2


def _f1(tp, fp, npos, nneg):
    return 2 * tp / np.maximum(tp + fp + npos, 1)


def balanced_optimal(ft_scores, ft_labels) -> dict:
    """Image-score threshold with the best balanced accuracy on a labelled split.

    Every threshold between two neighbouring distinct scores makes the same
    decisions on the split; among the runs of them that reach the best accuracy
    the widest wins, and the threshold goes to its middle (geometric for positive
    scores), never onto a sample: a margin on both sides for the images to come.
    ``threshold_interval`` records the run.
    """
    return _image_point("balanced", ft_scores, ft_labels, _balanced)


def f1_optimal(ft_scores, ft_labels) -> dict:
    """Image-score threshold with the best F1 on a labelled split, placed as in :func:`balanced_optimal`.

    The flag-everything threshold is not a candidate: on a mostly defective
    split it can have the best F1 while telling nothing.
    """
    return _image_point("f1", ft_scores, ft_labels, _f1)


def normal_fpr(val_scores, target_fpr: float = 0.01) -> dict:
    """Normal-only rule: the conformal image-score threshold for ``target_fpr`` on validation normals.

    See :func:`threshold_from_fpr`; ``conformal`` records its rank, whether n
    normals allow the target, how many would, and the rate it promises.
    """
    s = np.asarray(val_scores).reshape(-1)
    return {
        "rule": "fpr",
        "decision": "image_score",
        "threshold": threshold_from_fpr(s, target_fpr),
        "min_area": None,
        "target_fpr": float(target_fpr),
        "score": None,
        "conformal": conformal_summary(s.size, target_fpr),
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
