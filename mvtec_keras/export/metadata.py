"""The side ``.json`` written beside every exported file: what a runtime needs to use it correctly."""

from __future__ import annotations

import time

from .. import __version__
from ..fileio import write_json

INPUT_NOTE = ("uint8 image at the input size and colour mode; resize and colour conversion happen "
              "outside the graph as in training (mvtec_keras.runtime.images), then round to uint8: exact when "
              "the image already has the input size and colour mode, else within 0.5/255 per pixel")


def build_metadata(det, info, operating_point, fmt, precision, input_shape, batch, has_maps, parity,
                   validation_scores, size_bytes, ops=None) -> dict:
    outputs = {"score": "float32 [B] image anomaly score"}
    if has_maps:
        outputs["map"] = "float32 [B, H, W] anomaly map at input resolution"
    if operating_point and operating_point.get("decision") == "image_score":
        outputs["decision"] = "uint8 [B] 1 = anomalous (score >= threshold)"
    meta = {
        "format": fmt,
        "precision": precision,
        "package_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "endpoint": "serve",
        "input": {"name": "image", "dtype": "uint8", "shape": [batch, *input_shape], "note": INPUT_NOTE},
        "outputs": outputs,
        "has_maps": bool(has_maps),
        "preprocessing": info["preprocessing"],
        "detector": {"name": det.name, "config": det.get_config(), "architecture": info.get("architecture")},
        "operating_point": operating_point,
        "decision_note": ("segmentation decisions (regions of map >= threshold with at least min_area pixels, "
                          "not touching the border) are made by the runtime with thresholds.decide"
                          if operating_point and operating_point.get("decision") == "segmentation" else
                          None if operating_point else
                          "no finetune.json: predict.py sets an image-score threshold at --fpr from validation_scores"),
        "validation_scores": [float(v) for v in validation_scores],
        "parity": parity,
        "size_bytes": int(size_bytes),
    }
    if ops is not None:
        meta["litert_ops"] = ops
    return meta


def write_metadata(path: str, meta: dict) -> None:
    write_json(path, meta)
