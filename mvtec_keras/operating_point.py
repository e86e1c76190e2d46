"""The operating point of a run: how its scores and maps become decisions.

finetune.py chooses it (by a rule of :mod:`mvtec_keras.thresholds`) and writes
it beside the detector (``finetune.json``); test.py, predict.py and exported
models read it back through :func:`load_operating_point` (or
:func:`operating_point_for_run`, which also serves a run without
finetune.json), set the detector up with :func:`configure_detector` and decide
with :func:`mvtec_keras.thresholds.decide`, so a decision is made by one piece
of code wherever a run is used.

Keys of an operating point (a JSON dict):

- ``rule``: the rule that chose it: ``search`` (min_area x map threshold),
  ``balanced`` / ``f1`` (image-score threshold best on the labelled finetune
  split), ``fpr`` (normal-only: target false-positive rate on validation
  normals), ``chi2`` (bound from a fitted Gaussian);
  ``requested_rule`` and ``fallback`` (a reason) when another rule was asked
  for; ``chosen_on``: what it was chosen on, in words;
- ``decision``: ``"segmentation"`` (a region of ``map >= threshold`` with at
  least ``min_area`` pixels, not touching the border) or ``"image_score"``
  (``score >= threshold``);
- ``threshold``; ``min_area`` (None for image-score decisions);
  ``target_fpr`` (``fpr``, ``chi2``); ``score`` (balanced accuracy or F1 on the
  finetune split, None for normal-only rules), ``tpr`` / ``tnr`` there;
  ``relaxed`` (search: chosen on the finetune split alone, see
  :func:`mvtec_keras.thresholds.search_min_area_threshold`);
- detector settings it was chosen with, applied by :func:`configure_detector`:
  ``method`` (autoencoder residual map), ``map_sigma`` (autoencoder map
  blur), ``score_reduction`` (autoencoder image score: max / mean / topk of the
  blurred map), when present;
- bookkeeping written by finetune.py: ``mode``, ``detector``, ``dtype``,
  ``finetune_files`` (left out of test.py's metrics), ``n_finetune``, ``n_validation``,
  and the candidates' figures (``map_sigma_search``, ``score_reduction_search``).
"""

from __future__ import annotations

import json
import os
from typing import Optional

from .errors import InputError

OPERATING_POINT_FILE = "finetune.json"
#: target false-positive rate of the normal-only rule used for runs without finetune.json
DEFAULT_TARGET_FPR = 0.01


def load_operating_point(model_dir: str) -> Optional[dict]:
    """The saved operating point of a run folder, or None when finetune.py has not run."""
    path = os.path.join(model_dir, OPERATING_POINT_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            op = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    if not isinstance(op, dict) or "threshold" not in op:
        raise InputError(f"{path}: not an operating point (no threshold)")
    return op


def configure_detector(det, op: Optional[dict]):
    """Set the detector options the operating point was chosen with (residual map, map blur, score reduction)."""
    if not op:
        return det
    if hasattr(det, "residual") and op.get("method") in ("ssim", "l2"):
        det.residual = op["method"]  # score with the map the operating point was chosen on
    if hasattr(det, "map_sigma") and op.get("map_sigma") is not None:
        det.map_sigma = float(op["map_sigma"])  # ... and with its blur
    if hasattr(det, "score_reduction") and op.get("score_reduction") is not None:
        det.score_reduction = str(op["score_reduction"])  # ... and its image score
    return det


def normal_only_operating_point(det, validation, target_fpr: float = DEFAULT_TARGET_FPR, batch_size: int = 8,
                                progress: bool = False) -> dict:
    """The normal-only rule on the image scores ``det`` gives ``validation`` (a dataset or images)."""
    from .thresholds import normal_fpr

    res = det.score(validation, batch_size=batch_size, progress=progress)
    return normal_fpr(res.scores, target_fpr)


def operating_point_for_run(model_dir: str, det, batch_size: int = 8, progress: bool = False,
                            target_fpr: float = DEFAULT_TARGET_FPR) -> dict:
    """The operating point a run decides with, ``det`` configured for it.

    finetune.json when there is one; otherwise the normal-only rule (target
    false-positive rate ``target_fpr`` on image scores) applied to the
    validation normals recorded in the run's info.json, with
    ``source: "validation normals (no finetune.json)"``.
    """
    op = load_operating_point(model_dir)
    if op is not None:
        configure_detector(det, op)
        return op
    from .cli.common import category_from_info, read_info, validation_samples
    from .data import Preprocessing, make_dataset

    info = read_info(model_dir)
    val = validation_samples(category_from_info(info), info)
    if not val:
        raise InputError(f"{model_dir}: no finetune.json and no validation images recorded in info.json, so no "
                         "operating point can be set; run finetune.py, or retrain with --val-fraction > 0")
    prep = Preprocessing.from_dict(info["preprocessing"])
    op = normal_only_operating_point(det, make_dataset(val, prep, batch_size), target_fpr, batch_size, progress)
    op["source"] = "validation normals (no finetune.json)"
    return op
