"""Rules that decide on anomaly maps: the min-area x threshold search on a labelled split, and the
normal-only target FPR at a fixed ``min_area``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ._checks import _check_maps, _check_min_area
from .candidates import candidate_thresholds
from .image_rules import conformal_rank, conformal_summary
from .regions import classify, largest_region_areas


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
    not all of it (ties: smallest min_area; the threshold goes to the middle candidate of the longest
    run of equal accuracy).
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


def _middle_of_best_run(values) -> int:
    """Index in the middle of the longest run of consecutive maxima (ties: the highest run): a
    threshold inside an interval of equal split accuracy sits in its middle, not at an end."""
    hit = np.isclose(values, values.max(), rtol=0, atol=1e-12)
    edges = np.flatnonzero(np.diff(np.r_[0, hit.astype(np.int8), 0]))
    starts, ends = edges[::2], edges[1::2] - 1
    r = len(starts) - 1 - int(np.argmax((ends - starts)[::-1]))
    return int((starts[r] + ends[r] + 1) // 2)


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
        j = _middle_of_best_run(bal)
        if bal[j] >= 0 and (best is None or bal[j] > best[2]):  # strict: ties keep the smaller min_area
            best = (int(a), float(cand[j]), float(bal[j]), float(tpr[j]), float(tnr[j]))
    return best


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

    Each validation image's statistic is the lowest candidate at which it is
    flagged neither there nor at any higher one; the threshold is the
    conformal rank's (:func:`conformal_rank`) smallest of them, i.e. the lowest
    candidate at which at most ``N - rank`` images are flagged there or higher
    (0 when N is too small for the target); ``inf`` when there is none.
    """
    val = _check_maps(val_maps, "val_maps")
    min_area = _check_min_area(min_area)
    allowed = max(0, len(val) - conformal_rank(len(val), target_fpr))
    cand = candidate_thresholds(val, dtype, n_thresholds, value_range)
    flags = largest_region_areas(val, cand, exclude_border, connectivity) >= min_area
    k = int(_lowest_safe(flags, allowed))
    return float(cand[k]) if k < cand.size else float("inf")


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
        "conformal": conformal_summary(len(np.asarray(val_maps)), target_fpr),
        "chosen_on": f"{len(np.asarray(val_maps))} validation normals",
    }
