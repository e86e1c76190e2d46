"""Choosing an operating point by rule name, deciding with one, and saying which it is."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .image_rules import balanced_optimal, chi2_bound, f1_optimal, normal_fpr
from .map_rules import normal_fpr_maps, search_min_area_threshold
from .regions import classify

#: rule names accepted by :func:`choose_operating_point` (``auto`` picks one)
RULES = ("auto", "search", "balanced", "f1", "fpr", "chi2")


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
    """Apply one rule -> ``(operating point dict, MinAreaThresholdSearch when the search ran, else None)``.

    ``auto``: with a labelled split holding both classes, it compares the
    candidate decisions on the finetune split and keeps the best by balanced
    accuracy: the image-score threshold (``balanced``) always, and the map-region
    ``search`` when ``map_decisions`` (the detector's image score summarises its
    map). Ties go to the image score: one fitted number instead of two, with its
    threshold in the middle of its interval (a margin on both sides), where the
    search's sits at the edge of the validation normals. Every candidate is in
    ``candidates``. Without a labelled split: the normal-only ``fpr`` rule. A
    labelled rule asked for with no anomalous image falls back to ``fpr`` (never
    to the minimum score), recorded as ``requested_rule`` and ``fallback``.
    ``fpr`` thresholds maps (at ``fpr_min_area``) when ``map_decisions`` and
    ``val_maps`` are given, else image scores.
    """
    if rule not in RULES:
        raise InputError(f"--rule: unknown '{rule}'; choose from {', '.join(RULES)}")
    y = None if ft_labels is None else np.asarray(ft_labels).reshape(-1)
    labelled = y is not None and y.size > 0 and bool(y.any()) and not bool(y.all())
    requested, fallback = rule, None
    if rule == "auto" and labelled:
        return _compare_candidates(val_maps, ft_scores, ft_maps, y, map_decisions, min_areas=min_areas,
                                   dtype=dtype, n_thresholds=n_thresholds, value_range=value_range)
    if rule == "auto":
        rule = "fpr"
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


def _compare_candidates(val_maps, ft_scores, ft_maps, y, map_decisions, **search_kw):
    """``auto`` on a labelled split: the best candidate decision on the finetune split (see
    :func:`choose_operating_point`) -> ``(operating point, search or None)``."""
    try:
        found = [(balanced_optimal(ft_scores, y), None)]
    except InputError:  # every image score equal: only the map regions can decide
        if not map_decisions:
            raise
        found = []
    if map_decisions:
        search = search_min_area_threshold(val_maps, ft_maps, y, **search_kw)
        found.append((search.operating_point(), search))
    best = max(range(len(found)), key=lambda i: (found[i][0]["score"], -i))  # ties: the first, the image score
    chosen = found[best][0]
    search = found[-1][1]  # the search, when it ran, whichever candidate won (finetune.py plots it)
    chosen["candidates"] = [{k: c.get(k) for k in ("rule", "decision", "threshold", "min_area", "score")}
                            for c, _ in found]
    chosen["chosen_on"] = f"{chosen['chosen_on']}; best of {len(found)} candidates by balanced accuracy on the " \
                          "finetune split"
    chosen["chosen_by"] = "auto"
    return chosen, search


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
    if op.get("candidates"):
        line += " [auto: best of " + ", ".join(
            f"{c['rule']} {c['score']:.3f}" for c in op["candidates"]) + "]"
    from .image_rules import conformal_warning

    warning = conformal_warning(op)
    if warning:
        line += f"\nwarning: {warning}"
    if op.get("fallback"):
        line += f" [asked for '{op['requested_rule']}'; {op['fallback']}]"
    return line
