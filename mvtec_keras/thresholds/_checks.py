"""Input checks shared by the rules: one line naming the bad argument (:class:`InputError`)."""

from __future__ import annotations

import numpy as np

from ..errors import InputError


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
