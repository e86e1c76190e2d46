"""What predict.py scores with: a run folder (Keras) or an exported file (TF-free).

Both answer the same small interface: ``prepare(path)`` reads one file into
the model's input (and a float image to draw overlays on), ``score(x)``
returns ``(scores, maps)``, and ``operating_point`` is the decision rule.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .images import read_image, to_model_input, to_uint8


def fallback_operating_point(validation_scores, fpr: float) -> dict:
    """An image-score decision at ``fpr`` on the validation normals (a run without finetune.json)."""
    from ..thresholds import threshold_from_fpr

    if not 0 <= fpr < 1:
        raise InputError(f"--fpr must be in [0, 1), got {fpr}")
    t = threshold_from_fpr(np.asarray(validation_scores, np.float32), fpr)
    return {"decision": "image_score", "threshold": t, "min_area": None, "mode": "validation_fpr",
            "target_fpr": float(fpr), "n_validation": int(np.size(validation_scores))}


class KerasScorer:
    """A run folder: the detector configured by its operating point, images read by training's own ops."""

    def __init__(self, model_dir: str, fpr: float = 0.01, batch_size: int = 8):
        from ..cli.common import category_from_info, validation_samples
        from ..cli.finetune import load_for_scoring
        from ..data.pipeline import Preprocessing
        from ..operating_point import configure_detector, load_operating_point

        op = load_operating_point(model_dir)
        self.detector, info = load_for_scoring(model_dir)
        configure_detector(self.detector, op)
        self.preprocessing = info["preprocessing"]
        self._prep = Preprocessing.from_dict(self.preprocessing)
        self.source = model_dir
        self.fallback = op is None
        if op is None:
            from ..data import make_dataset

            val = validation_samples(category_from_info(info), info)
            if not val:
                raise InputError(f"{model_dir}: no finetune.json and no validation images to set a threshold from")
            res = self.detector.score(make_dataset(val, self._prep, batch_size))
            op = fallback_operating_point(res.scores, fpr)
        self.operating_point = op

    def prepare(self, path):
        from ..data.pipeline import load_image

        read_image(path)  # names a corrupt or wrong-mode file in one line, as for exported models
        x = load_image(path, self._prep)
        return x, x

    def score(self, x):
        s, m = self.detector.score_batch(np.asarray(x, np.float32)[None])
        return np.asarray(s, np.float32).reshape(-1), None if m is None else np.asarray(m, np.float32)


class ExportedScorer:
    """A ``.tflite`` / ``.onnx`` file: numpy preprocessing, the exported graph, the operating point it carries."""

    def __init__(self, path: str, fpr: float = 0.01, num_threads: int = 2):
        from .model import ExportedModel

        self.model = ExportedModel(path, num_threads=num_threads)
        meta = self.model.metadata
        self.preprocessing = meta["preprocessing"]
        self.source = path
        op = meta.get("operating_point")
        self.fallback = op is None
        if op is None:
            scores = meta.get("validation_scores")
            if not scores:
                raise InputError(f"{path}: no operating point and no validation scores in its metadata")
            op = fallback_operating_point(scores, fpr)
        self.operating_point = op

    def prepare(self, path):
        x = to_uint8(to_model_input(read_image(path), self.preprocessing))
        return x, x.astype(np.float32) / 255.0

    def score(self, x):
        return self.model.score(x[None])
