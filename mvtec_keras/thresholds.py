"""Every operating-point rule, and the decisions an operating point makes.

An operating point (a dict, see :mod:`mvtec_keras.operating_point`) turns
scores and maps into decisions through :func:`decide`. The rules that choose one:

- ``search`` (:func:`search_min_area_threshold`): min_area x map threshold,
  for detectors whose image score summarises their map (below);
- ``balanced`` / ``f1`` (:func:`balanced_optimal`, :func:`f1_optimal`): the
  image-score threshold with the best balanced accuracy / F1 on a labelled split;
- ``fpr`` (:func:`normal_fpr`, :func:`normal_fpr_maps`): from normal images
  only, a target false-positive rate (a quantile of validation scores);
- ``chi2`` (:func:`chi2_bound`): for the Gaussian methods, a bound from the
  fitted distribution alone;
- :func:`choose_operating_point` picks and applies one, falling back to the
  normal-only rule when no anomalous image is there to choose on.

The labelled rules never return a point that flags all or none of a split
holding both classes: their candidates span that split's scores (not only the
validation normals' range), and the flag-everything threshold (the minimum
score) is never a candidate.

Segmentation rule: threshold the anomaly map (``map >= threshold``), drop the connected
regions that touch the image border, and call the image defective when a
remaining region has at least ``min_area`` pixels. Regions are 8-connected by
default (``connectivity=4`` is available), as in :mod:`mvtec_keras.metrics`.

:func:`search_min_area_threshold` tunes the pair: for every ``min_area`` it
takes the lowest candidate threshold that flags no defect-free validation
image, scores that pair by balanced accuracy on a labelled finetune set, and
keeps the best. Because border regions are dropped, "flagged" is not monotone
in the threshold (a region can grow into the border and vanish), so "flags no
validation image" is required at the chosen threshold *and every higher
candidate*; otherwise the lowest thresholds, where everything merges into one
border region, would always qualify.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .errors import InputError

__all__ = [
    "largest_region_areas",
    "candidate_thresholds",
    "to_uint8",
    "search_min_area_threshold",
    "MinAreaThresholdSearch",
    "threshold_from_fpr",
    "threshold_from_fpr_maps",
    "classify",
    "decide",
    "normal_fpr",
    "normal_fpr_maps",
    "balanced_optimal",
    "f1_optimal",
    "chi2_bound",
    "choose_operating_point",
    "RULES",
]

# Voxels labelled per scipy call when stacking one image's thresholds (~40 MB of work arrays).
_MAX_VOXELS = 1 << 23


# -- checks --------------------------------------------------------------------
def _check_maps(maps, name="maps") -> np.ndarray:
    a = np.asarray(maps)
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 3 or a.shape[0] == 0:
        raise InputError(f"{name}: expected a non-empty stack of maps [N, H, W], got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number):
        raise InputError(f"{name}: expected numbers, got dtype {a.dtype}")
    a = a.astype(np.float32 if a.dtype in (np.float32, np.uint8) else np.float64, copy=False)
    if not np.isfinite(a).all():
        raise InputError(f"{name}: contains NaN or infinite values")
    return a


def _check_min_area(min_area) -> int:
    if int(min_area) != min_area or min_area < 1:
        raise InputError(f"min_area must be a positive integer, got {min_area}")
    return int(min_area)


def _check_fpr(target_fpr) -> float:
    if not 0 <= target_fpr < 1:
        raise InputError(f"target_fpr must be in [0, 1), got {target_fpr}")
    return float(target_fpr)


def _structure(connectivity) -> np.ndarray:
    """3-D structure that connects pixels within a plane only (planes = images or thresholds)."""
    if connectivity not in (4, 8):
        raise InputError(f"connectivity must be 4 or 8, got {connectivity}")
    s = np.zeros((3, 3, 3), dtype=bool)
    s[1] = ndimage.generate_binary_structure(2, 2 if connectivity == 8 else 1)
    return s


# -- connected regions ---------------------------------------------------------
def _region_areas(binary: np.ndarray, structure, exclude_border: bool):
    """Label a stack ``[K, H, W]`` plane by plane -> (labels, area of each label).

    ``area[0]`` (background) and, with ``exclude_border``, the areas of regions
    touching the image border are set to 0.
    """
    labels, n = ndimage.label(binary, structure=structure)
    areas = np.bincount(labels.reshape(-1), minlength=n + 1)
    areas[0] = 0
    if exclude_border:
        edge = np.concatenate(
            [labels[:, 0].ravel(), labels[:, -1].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]
        )
        areas[edge] = 0
    return labels, areas


def _largest_per_plane(labels: np.ndarray, areas: np.ndarray) -> np.ndarray:
    # scipy numbers labels in raster order, so plane k owns the contiguous label range
    # (highest label of the earlier planes, highest label of plane k]: a reduceat
    # gives each plane's largest area without gathering areas back onto the voxels.
    top = labels.reshape(len(labels), -1).max(axis=1)
    first = np.maximum.accumulate(np.r_[0, top[:-1]]) + 1
    has = top >= first
    out = np.zeros(len(labels), dtype=np.int64)
    if has.any():
        out[has] = np.maximum.reduceat(areas, first[has])
    return out


def largest_region_areas(maps, thresholds, exclude_border: bool = True, connectivity: int = 8) -> np.ndarray:
    """Area of the largest region of ``map >= t`` per image and threshold -> ``[N, T]`` int64.

    With ``exclude_border`` regions touching the image border count as area 0.
    All thresholds of one image are labelled in a few stacked scipy calls.
    """
    maps = _check_maps(maps)
    thr = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    n, h, w = maps.shape
    structure = _structure(connectivity)
    out = np.zeros((n, thr.size), dtype=np.int64)
    lows = maps.reshape(n, -1).min(axis=1)
    highs = maps.reshape(n, -1).max(axis=1)
    chunk = max(1, _MAX_VOXELS // (h * w))
    for i in range(n):
        # Trivial planes need no labelling: above the maximum nothing is left, at or
        # below the minimum the whole image is one region (which touches the border).
        if not exclude_border:
            out[i, thr <= lows[i]] = h * w
        todo = np.flatnonzero((thr > lows[i]) & (thr <= highs[i]))
        for start in range(0, todo.size, chunk):
            idx = todo[start : start + chunk]
            labels, areas = _region_areas(maps[i] >= thr[idx, None, None], structure, exclude_border)
            out[i, idx] = _largest_per_plane(labels, areas)
    return out


def classify(maps, threshold, min_area, exclude_border: bool = True, connectivity: int = 8):
    """Apply the rule -> ``(predictions [N] bool, segmentations [N, H, W] bool)``.

    The segmentation keeps only the regions that decided: at least ``min_area``
    pixels and, with ``exclude_border``, not touching the border.
    """
    maps = _check_maps(maps)
    min_area = _check_min_area(min_area)
    # A float64 scalar keeps the comparison exact for float32 maps.
    labels, areas = _region_areas(maps >= np.float64(threshold), _structure(connectivity), exclude_border)
    seg = (areas >= min_area)[labels]
    return seg.any(axis=(1, 2)), seg


def decide(operating_point: dict, scores, maps=None):
    """Decisions at an operating point (see :mod:`mvtec_keras.operating_point`).

    Returns ``(predictions [N] bool, segmentations [N, H, W] bool or None)``.
    Segmentation decisions need the maps; image-score decisions ignore them.
    """
    op = operating_point
    if op.get("decision") == "segmentation":
        if maps is None:
            raise InputError("this operating point decides on anomaly maps, but no maps were given")
        return classify(maps, op["threshold"], op["min_area"])
    s = np.asarray(scores).reshape(-1)
    return s >= np.float64(op["threshold"]), None


# -- candidate thresholds ------------------------------------------------------
def _uint8_range(maps, value_range):
    lo, hi = (float(maps.min()), float(maps.max())) if value_range is None else map(float, value_range)
    if not hi >= lo:
        raise InputError(f"value_range must be (low, high) with low <= high, got {value_range}")
    return lo, ((hi - lo) / 255.0 or 1.0 / 255.0)


def to_uint8(maps, value_range=None) -> np.ndarray:
    """Quantise maps to 0..255 over ``value_range`` (default: their min and max), rounding half up."""
    maps = _check_maps(maps)
    lo, step = _uint8_range(maps, value_range)
    return np.clip(np.floor((maps - lo) / step + 0.5), 0, 255).astype(np.uint8)


def candidate_thresholds(maps, dtype: str = "float32", n: int = 256, value_range=None) -> np.ndarray:
    """Ascending candidate thresholds, in map units, from (validation) maps.

    ``"uint8"``: the 256 levels of :func:`to_uint8`; level k is returned as
    ``low + (k - 0.5) * step``, so ``map >= thresholds[k]`` is exactly
    ``to_uint8(map) >= k`` (up to float rounding on a boundary) and the search
    over them is exhaustive for uint8 maps.
    ``"float32"``: unique pixel values at ``n`` quantiles spaced geometrically
    in the number of pixels above them (1 pixel .. all), so the grid is dense
    in the upper tail where min-area decisions are made.
    """
    maps = _check_maps(maps)
    if dtype == "uint8":
        lo, step = _uint8_range(maps, value_range)
        return lo + (np.arange(256) - 0.5) * step
    if dtype != "float32":
        raise InputError(f"dtype must be 'float32' or 'uint8', got {dtype!r}")
    if int(n) < 2:
        raise InputError(f"n must be at least 2, got {n}")
    values = np.sort(maps.reshape(-1))
    above = np.unique(np.round(np.geomspace(1, values.size, int(n))).astype(np.int64))
    return np.unique(values[values.size - above]).astype(np.float64)


# -- tuning --------------------------------------------------------------------
@dataclass
class MinAreaThresholdSearch:
    """Outcome of :func:`search_min_area_threshold`; arrays run over ``min_areas``."""

    min_areas: np.ndarray  # [M] int
    thresholds: np.ndarray  # [M] lowest safe threshold per min_area (inf: none is safe)
    balanced_accuracy: np.ndarray  # [M] on the finetune set
    tpr: np.ndarray  # [M]
    tnr: np.ndarray  # [M]
    min_area: int  # best pair
    threshold: float
    score: float  # its balanced accuracy
    candidates: np.ndarray  # [T] thresholds searched
    dtype: str
    exclude_border: bool = True
    connectivity: int = 8
    #: the chosen pair came from the finetune split alone: every validation-safe pair flagged all or none of it
    relaxed: bool = False
    best_tpr: float = float("nan")  # of the chosen pair, on the finetune set
    best_tnr: float = float("nan")

    def classify(self, maps):
        """Apply the chosen pair, see :func:`classify`."""
        return classify(maps, self.threshold, self.min_area, self.exclude_border, self.connectivity)

    def summary(self) -> dict:
        """The chosen pair as JSON-friendly values."""
        return {
            "min_area": self.min_area,
            "threshold": self.threshold,
            "balanced_accuracy": self.score,
            "dtype": self.dtype,
            "exclude_border": self.exclude_border,
            "connectivity": self.connectivity,
        }

    def operating_point(self) -> dict:
        """The chosen pair as an operating point (see :mod:`mvtec_keras.operating_point`)."""
        return {
            "rule": "search",
            "decision": "segmentation",
            "threshold": float(self.threshold),
            "min_area": int(self.min_area),
            "score": float(self.score),
            "tpr": float(self.best_tpr),
            "tnr": float(self.best_tnr),
            "relaxed": bool(self.relaxed),
            "chosen_on": "finetune split" if self.relaxed else "validation normals (threshold) + finetune split (min_area)",
        }


def _lowest_safe(flags: np.ndarray, allowed: int = 0) -> np.ndarray:
    """Lowest candidate index with at most ``allowed`` images flagged there or higher.

    ``flags`` is ``[N, T, ...]`` (ascending candidates); returns ``[...]``, where
    ``T`` means no candidate qualifies.
    """
    flagged_above = np.logical_or.accumulate(flags[:, ::-1], axis=1)[:, ::-1]
    ok = flagged_above.sum(axis=0) <= allowed  # False ... False True ... True along T
    return np.where(ok.any(axis=0), np.argmax(ok, axis=0), flags.shape[1])


def _search_candidates(val, ft, dtype, n_thresholds, value_range):
    """Candidates spanning the validation *and* finetune maps (float32: the union of both grids)."""
    if dtype == "uint8":
        return candidate_thresholds(np.concatenate([val, ft]), dtype, n_thresholds, value_range)
    return np.union1d(candidate_thresholds(val, dtype, n_thresholds), candidate_thresholds(ft, dtype, n_thresholds))


def search_min_area_threshold(
    val_maps,
    ft_maps,
    ft_labels,
    min_areas=range(5, 1001, 5),
    dtype: str = "float32",
    n_thresholds: int = 256,
    value_range=None,
    exclude_border: bool = True,
    connectivity: int = 8,
) -> MinAreaThresholdSearch:
    """Tune ``(min_area, threshold)`` on defect-free validation maps and a labelled finetune set.

    For each ``min_area`` the threshold is the lowest candidate at which, and
    above which, no validation image is flagged; ``inf`` when there is none.
    Candidates (see :func:`candidate_thresholds`) span the validation and the
    finetune maps. The pair with the best finetune balanced accuracy wins; ties
    go to the smallest ``min_area``, the most sensitive rule to small defects.

    When normal and defective maps overlap, every validation-safe pair can flag
    all or none of the finetune set (balanced accuracy 0.5, a useless point).
    Then the search is ``relaxed``: the pair is chosen on the finetune set alone,
    best balanced accuracy over every (min_area, candidate) that flags some but
    not all of it (ties: smallest min_area, then highest threshold).
    """
    val = _check_maps(val_maps, "val_maps")
    ft = _check_maps(ft_maps, "ft_maps")
    y = np.asarray(ft_labels).reshape(-1)
    if y.size != len(ft) or not np.isin(y, (0, 1)).all():
        raise InputError(f"ft_labels: expected {len(ft)} labels in {{0, 1}} (1 = defective)")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise InputError("ft_labels: the finetune set needs both normal and defective images")
    areas = np.unique(np.asarray(list(min_areas)))
    if areas.size == 0 or areas.dtype.kind not in "iuf" or (areas != np.round(areas)).any() or areas[0] < 1:
        raise InputError("min_areas: expected positive integers")
    areas = areas.astype(np.int64)

    cand = _search_candidates(val, ft, dtype, n_thresholds, value_range)
    t = cand.size
    val_areas = largest_region_areas(val, cand, exclude_border, connectivity)
    # One image flagged is enough, so the largest area over images decides.
    k = _lowest_safe((val_areas.max(axis=0)[:, None] >= areas)[None])  # [M]
    thresholds = np.where(k < t, cand[np.minimum(k, t - 1)], np.inf)

    # Finetune maps are only needed at the candidates some min_area chose;
    # column t stands for the infinite threshold (nothing flagged).
    chosen = np.unique(k[k < t])
    ft_areas = np.zeros((len(ft), t + 1), dtype=np.int64)
    ft_areas[:, chosen] = largest_region_areas(ft, cand[chosen], exclude_border, connectivity)
    pred = ft_areas[:, k] >= areas  # [N_ft, M]
    tpr = pred[y].mean(axis=0)
    tnr = 1.0 - pred[~y].mean(axis=0)
    bal = (tpr + tnr) / 2
    best = int(np.argmax(bal))  # first maximum = smallest min_area
    out = MinAreaThresholdSearch(
        min_areas=areas,
        thresholds=thresholds,
        balanced_accuracy=bal,
        tpr=tpr,
        tnr=tnr,
        min_area=int(areas[best]),
        threshold=float(thresholds[best]),
        score=float(bal[best]),
        candidates=cand,
        dtype=dtype,
        exclude_border=exclude_border,
        connectivity=connectivity,
        best_tpr=float(tpr[best]),
        best_tnr=float(tnr[best]),
    )
    if 0 < pred[:, best].sum() < len(ft):
        return out
    relaxed = _finetune_optimal_pair(ft, y, areas, cand, exclude_border, connectivity)
    if relaxed is not None:
        out.min_area, out.threshold, out.score, out.best_tpr, out.best_tnr = relaxed
        out.relaxed = True
    return out


def _finetune_optimal_pair(ft, y, areas, cand, exclude_border, connectivity):
    """(min_area, threshold, balanced accuracy, tpr, tnr) best on the finetune set among pairs
    that flag some but not all of it; None when every pair flags all or none."""
    ft_areas = largest_region_areas(ft, cand, exclude_border, connectivity)  # [N, T]
    best = None
    for a in areas:
        pred = ft_areas >= a  # [N, T]
        n_flagged = pred.sum(axis=0)
        tpr = pred[y].mean(axis=0)
        tnr = 1.0 - pred[~y].mean(axis=0)
        bal = np.where((n_flagged > 0) & (n_flagged < len(ft)), (tpr + tnr) / 2, -1.0)
        j = int(len(bal) - 1 - np.argmax(bal[::-1]))  # highest threshold among ties
        if bal[j] >= 0 and (best is None or bal[j] > best[2]):  # strict: ties keep the smaller min_area
            best = (int(a), float(cand[j]), float(bal[j]), float(tpr[j]), float(tnr[j]))
    return best


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


def threshold_from_fpr_maps(
    val_maps,
    min_area,
    target_fpr: float = 0.01,
    dtype: str = "float32",
    n_thresholds: int = 256,
    value_range=None,
    exclude_border: bool = True,
    connectivity: int = 8,
) -> float:
    """Map version of :func:`threshold_from_fpr` for a fixed ``min_area`` (no defect images needed).

    Lowest candidate threshold at which at most ``floor(target_fpr * N)``
    validation images are flagged there or at any higher candidate; ``inf``
    when there is none.
    """
    val = _check_maps(val_maps, "val_maps")
    min_area = _check_min_area(min_area)
    allowed = math.floor(_check_fpr(target_fpr) * len(val) + 1e-9)
    cand = candidate_thresholds(val, dtype, n_thresholds, value_range)
    flags = largest_region_areas(val, cand, exclude_border, connectivity) >= min_area
    k = int(_lowest_safe(flags, allowed))
    return float(cand[k]) if k < cand.size else float("inf")


def choose_map_sigma(maps, masks, has_mask, sigmas):
    """The Gaussian blur of anomaly maps that ranks labelled pixels best.

    Returns ``(best sigma, {sigma: pixel AUROC})`` over the images where
    ``has_mask`` is True (ties go to the smaller sigma), or ``(None, {})`` when
    no image there has a defect pixel.
    """
    from . import metrics, residuals

    if not has_mask.any() or not masks[has_mask].any():
        return None, {}
    maps, masks = maps[has_mask], masks[has_mask]
    table = {s: metrics.pixel_auroc(masks, np.asarray(residuals.gaussian_blur(maps, s))) for s in sigmas}
    best = max(table.values())
    return min(s for s, v in table.items() if v == best), table


def choose_score_reduction(scores_by_reduction: dict, labels):
    """The image-score reduction (``{name: scores}``) that ranks labelled images best.

    Returns ``(best name, {name: image AUROC})``; ties go to the first name
    given, or ``(None, {})`` when the labels hold one class only.
    """
    from .metrics import image_auroc

    y = np.asarray(labels).reshape(-1).astype(int)
    if y.all() or not y.any():
        return None, {}
    table = {k: float(image_auroc(y, np.asarray(v).reshape(-1))) for k, v in scores_by_reduction.items()}
    best = max(table.values())
    return next(k for k, v in table.items() if v == best), table


# -- operating-point rules --------------------------------------------------------
#: rule names accepted by :func:`choose_operating_point` (``auto`` picks one)
RULES = ("auto", "search", "balanced", "f1", "fpr", "chi2")


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


def normal_fpr_maps(val_maps, min_area, target_fpr: float = 0.01, **kwargs) -> dict:
    """Normal-only rule on maps: :func:`threshold_from_fpr_maps` at a fixed ``min_area``."""
    t = threshold_from_fpr_maps(val_maps, min_area, target_fpr, **kwargs)
    return {
        "rule": "fpr",
        "decision": "segmentation",
        "threshold": float(t),
        "min_area": int(min_area),
        "target_fpr": float(target_fpr),
        "score": None,
        "chosen_on": f"{len(np.asarray(val_maps))} validation normals",
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


def choose_operating_point(
    rule: str = "auto",
    *,
    val_scores,
    val_maps=None,
    ft_scores=None,
    ft_maps=None,
    ft_labels=None,
    map_decisions: bool = False,
    gaussian=None,
    target_fpr: float = 0.01,
    fpr_min_area: int = 25,
    min_areas=range(5, 1001, 5),
    dtype: str = "float32",
    n_thresholds: int = 256,
    value_range=None,
):
    """Apply one rule -> ``(operating point dict, MinAreaThresholdSearch or None)``.

    ``auto``: with a labelled split holding both classes, ``search`` when
    ``map_decisions`` (the detector's image score summarises its map) else
    ``balanced``; without one, the normal-only ``fpr`` rule. A labelled rule
    asked for with no anomalous image falls back to ``fpr`` (never to the
    minimum score), recorded as ``requested_rule`` and ``fallback``.
    ``fpr`` thresholds maps (at ``fpr_min_area``) when ``map_decisions`` and
    ``val_maps`` are given, else image scores.
    """
    if rule not in RULES:
        raise InputError(f"--rule: unknown '{rule}'; choose from {', '.join(RULES)}")
    y = None if ft_labels is None else np.asarray(ft_labels).reshape(-1)
    labelled = y is not None and y.size > 0 and bool(y.any()) and not bool(y.all())
    requested, fallback = rule, None
    if rule == "auto":
        rule = ("search" if map_decisions else "balanced") if labelled else "fpr"
    elif rule == "search" and not map_decisions:
        raise InputError("--rule search decides on map regions, but this detector's image score is not a "
                         "summary of its map (or it has no map); use balanced, f1, fpr or chi2")
    elif rule == "chi2" and gaussian is None:
        raise InputError("--rule chi2 needs a Gaussian method (mahalanobis, padim)")
    if rule in ("search", "balanced", "f1") and not labelled:
        fallback = "no anomalous image to choose on: normal-only rule (target FPR on validation normals)"
        rule = "fpr"
    search = None
    if rule == "search":
        search = search_min_area_threshold(val_maps, ft_maps, y, min_areas=min_areas, dtype=dtype,
                                           n_thresholds=n_thresholds, value_range=value_range)
        op = search.operating_point()
    elif rule == "balanced":
        op = balanced_optimal(ft_scores, y)
    elif rule == "f1":
        op = f1_optimal(ft_scores, y)
    elif rule == "chi2":
        op = chi2_bound(gaussian, target_fpr)
    elif map_decisions and val_maps is not None:
        op = normal_fpr_maps(val_maps, fpr_min_area, target_fpr, dtype=dtype, n_thresholds=n_thresholds,
                             value_range=value_range)
    else:
        op = normal_fpr(val_scores, target_fpr)
    if fallback or requested not in ("auto", rule):
        op["requested_rule"] = requested
    if fallback:
        op["fallback"] = fallback
    return op, search


def describe(op: dict) -> str:
    """One line saying which rule chose the operating point, and what it is."""
    what = (f"map >= {op['threshold']:.6g} in a region of >= {op['min_area']} px"
            if op.get("decision") == "segmentation" else f"image score >= {op['threshold']:.6g}")
    extra = ""
    if op.get("target_fpr") is not None:
        extra += f", target FPR {op['target_fpr']:g}"
    if op.get("score") is not None:
        extra += f", {'F1' if op['rule'] == 'f1' else 'balanced accuracy'} {op['score']:.3f} on the {op.get('chosen_on')}"
    else:
        extra += f", from the {op.get('chosen_on')}"
    if op.get("relaxed"):
        extra += " (relaxed: every validation-safe pair flagged all or none of the finetune split)"
    line = f"operating point by rule '{op['rule']}': {what}{extra}"
    if op.get("fallback"):
        line += f" [asked for '{op['requested_rule']}'; {op['fallback']}]"
    return line
