"""Candidate map thresholds: the grid the map rules search, and the uint8 quantisation it can match."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ._checks import _check_maps


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
