"""The detector settings an operating point carries (``map_sigma``, ``score_reduction``; see
:mod:`mvtec_keras.operating_point`), chosen on the labelled finetune split before its threshold."""

from __future__ import annotations

import numpy as np


def choose_map_sigma(maps, masks, has_mask, sigmas):
    """The Gaussian blur of anomaly maps that ranks labelled pixels best.

    Returns ``(best sigma, {sigma: pixel AUROC})`` over the images where
    ``has_mask`` is True (ties go to the smaller sigma), or ``(None, {})`` when
    no image there has a defect pixel.
    """
    from .. import metrics, residuals

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
    from ..metrics import image_auroc

    y = np.asarray(labels).reshape(-1).astype(int)
    if y.all() or not y.any():
        return None, {}
    table = {k: float(image_auroc(y, np.asarray(v).reshape(-1))) for k, v in scores_by_reduction.items()}
    best = max(table.values())
    return next(k for k, v in table.items() if v == best), table
