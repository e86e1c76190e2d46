"""The operating point of a run: how its scores and maps become decisions.

finetune.py chooses it and writes it beside the detector (``finetune.json``);
test.py, predict.py and exported models all read it back through
:func:`load_operating_point` and decide with :func:`mvtec_keras.thresholds.decide`,
so a decision is made by one piece of code wherever a run is used.

Keys every operating point has:

- ``decision``: ``"segmentation"`` (a region of ``map >= threshold`` with at
  least ``min_area`` pixels, not touching the border) or ``"image_score"``
  (``score >= threshold``);
- ``threshold``, ``min_area`` (None for image-score decisions);
- detector settings it was chosen with: ``method`` (autoencoder residual map),
  ``map_sigma`` (autoencoder map blur), when present.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from .errors import InputError

OPERATING_POINT_FILE = "finetune.json"


def load_operating_point(model_dir: str) -> Optional[dict]:
    """The saved operating point of a run folder, or None when finetune.py has not run."""
    path = os.path.join(model_dir, OPERATING_POINT_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            op = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    if not isinstance(op, dict) or "threshold" not in op:
        raise InputError(f"{path}: not an operating point (no threshold)")
    return op


def configure_detector(det, op: Optional[dict]):
    """Set the detector options the operating point was chosen with (residual map, map blur)."""
    if not op:
        return det
    if hasattr(det, "residual") and op.get("method") in ("ssim", "l2"):
        det.residual = op["method"]  # score with the map the operating point was chosen on
    if hasattr(det, "map_sigma") and op.get("map_sigma") is not None:
        det.map_sigma = float(op["map_sigma"])  # ... and with its blur
    return det
