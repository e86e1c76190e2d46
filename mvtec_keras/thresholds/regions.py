"""The segmentation rule's connected regions: ``map >= threshold``, regions touching the border
dropped, the image flagged when a region left has at least ``min_area`` pixels."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ._checks import _check_maps, _check_min_area

# Voxels labelled per scipy call when stacking one image's thresholds (~40 MB of work arrays).
_MAX_VOXELS = 1 << 23


def _structure(connectivity) -> np.ndarray:
    """3-D structure that connects pixels within a plane only (planes = images or thresholds)."""
    if connectivity not in (4, 8):
        raise InputError(f"connectivity must be 4 or 8, got {connectivity}")
    s = np.zeros((3, 3, 3), dtype=bool)
    s[1] = ndimage.generate_binary_structure(2, 2 if connectivity == 8 else 1)
    return s


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
