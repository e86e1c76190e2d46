"""Segmentation-style decisions: a map threshold combined with a minimum defect area.

Rule: threshold the anomaly map (``map >= threshold``), drop the connected
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


def _lowest_safe(flags: np.ndarray, allowed: int = 0) -> np.ndarray:
    """Lowest candidate index with at most ``allowed`` images flagged there or higher.

    ``flags`` is ``[N, T, ...]`` (ascending candidates); returns ``[...]``, where
    ``T`` means no candidate qualifies.
    """
    flagged_above = np.logical_or.accumulate(flags[:, ::-1], axis=1)[:, ::-1]
    ok = flagged_above.sum(axis=0) <= allowed  # False ... False True ... True along T
    return np.where(ok.any(axis=0), np.argmax(ok, axis=0), flags.shape[1])


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

    For each ``min_area`` the threshold is the lowest candidate (from the
    validation maps, see :func:`candidate_thresholds`) at which, and above
    which, no validation image is flagged; ``inf`` when there is none. The pair
    with the best finetune balanced accuracy wins; ties go to the smallest
    ``min_area``, the most sensitive rule to small defects.
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

    cand = candidate_thresholds(val, dtype, n_thresholds, value_range)
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
    return MinAreaThresholdSearch(
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
    )


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
