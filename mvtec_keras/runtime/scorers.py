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
    """The normal-only rule (``thresholds.normal_fpr``): an image-score threshold at ``fpr`` on validation normals."""
    from ..thresholds import normal_fpr

    if not 0 <= fpr < 1:
        raise InputError(f"--fpr must be in [0, 1), got {fpr}")
    op = normal_fpr(np.asarray(validation_scores, np.float32), fpr)
    op["source"] = "validation normals (no finetune.json)"
    return op


class KerasScorer:
    """A run folder: the detector configured by its operating point, images read by training's own ops."""

    def __init__(self, model_dir: str, fpr: float = 0.01, batch_size: int = 8):
        from ..cli.finetune import load_for_scoring
        from ..data.pipeline import Preprocessing
        from ..operating_point import load_operating_point, operating_point_for_run

        self.detector, info = load_for_scoring(model_dir)
        self.fallback = load_operating_point(model_dir) is None
        # finetune.json, or the normal-only rule on the run's validation normals (configures the detector)
        op = operating_point_for_run(model_dir, self.detector, batch_size, target_fpr=fpr)
        self.preprocessing = info["preprocessing"]
        self._prep = Preprocessing.from_dict(self.preprocessing)
        self.source = model_dir
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
