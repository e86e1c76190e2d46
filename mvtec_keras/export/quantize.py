"""int8 LiteRT: the network in int8, the head in float, and feature heads refitted on int8 features.

Two measured facts shape this (``bench/export.py`` on bottle, EfficientNet-Lite0):

- Full-integer quantisation of the whole graph destroys the anomaly score: a
  Mahalanobis distance or an SSIM map computed in int8 is noise. So only the
  *network* (the backbone, the autoencoder, the GAN's generator / encoders)
  is quantised; every op outside it (input scaling, colour, the feature
  distance or residual map, upsampling, blur, the score reduction) is
  kept float through the quantiser's node denylist.
- Even then int8 activations move Lite0's features by about 10 % (relative
  RMS), while PaDiM's per-position Gaussians have directions with variance near
  ``eps``: a head fitted on float features reads that noise as anomaly. The
  feature detectors' heads (Gaussians, memory banks, galleries) are therefore
  refitted on the *int8 backbone's own features* of the run's training
  images, so the head models the features the deployed backbone produces.

The refit reads the features out of an int8 export of the detector's own graph;
calibration is deterministic and the head's constants do not change the
backbone's ranges, so the final graph quantises its backbone identically (the
export's parity check verifies it).
"""

from __future__ import annotations

import re

import numpy as np
import tensorflow as tf

from .graph import ENDPOINT, INPUT_NAME, NotExportable


def network_prefixes(det) -> list:
    """Name prefixes of the ops that belong to the quantised network (the tracked Keras models)."""
    from .graph import tracked_models

    return sorted({m.name for m in tracked_models(det)})


def _op_output_names(flat: bytes) -> list:
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(flat), 0)
    names = []
    for graph in model.subgraphs:
        for op in graph.operators:
            names += [graph.tensors[i].name.decode() for i in op.outputs if i >= 0]
    return names


def _scope(name: str) -> str:
    """``model/layer`` of an op output name (fused ops join several names with ';': the first names it)."""
    return "/".join(name.split(";")[0].split("/")[:2])


def network_scopes(flat: bytes, prefixes) -> list:
    """The network's layer scopes (``model/layer``) in the order their ops run in ``flat``."""
    scopes = []
    for name in _op_output_names(flat):
        scope = _scope(name)
        if any(name.startswith(p) for p in prefixes) and scope not in scopes:
            scopes.append(scope)
    return scopes


def int8_litert(saved_model_dir: str, representative, prefixes, float_scopes=()) -> bytes:
    """Calibrate on ``representative``, quantise the ops named under ``prefixes`` to int8, keep the rest float
    (and the network's layers in ``float_scopes``, see :func:`network_scopes`)."""
    if not prefixes:
        raise NotExportable("int8: this detector has no network to quantise")
    c = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, signature_keys=[ENDPOINT])
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.representative_dataset = representative
    c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    # The quantisation debugger is the converter's public route to a node denylist; it calibrates once
    # (and checks one image through a debug model).
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=c, debug_dataset=lambda: (batch for _, batch in zip(range(1), representative())))
    float_scopes = set(float_scopes)
    keep_float = [n for n in _op_output_names(debugger.calibrated_model)
                  if not any(n.startswith(p) for p in prefixes) or _scope(n) in float_scopes]
    debugger.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=keep_float)
    return debugger.get_nondebug_quantized_model()


class Int8Features:
    """The backbone inside an int8 export, read out: ``images [B, H, W, C] in [0, 1] -> {"level<i>": array}``.

    ``flat`` is an int8 export of the detector's own graph; the level features
    are read (dequantised) from its intermediate tensors, so they are exactly
    what that graph's head sees. (A separate features-only graph does not do:
    the quantiser picks other ranges for some of its tensors.) A level's
    tensor is the output of the last op in its Keras layer's name scope.
    """

    def __init__(self, det, flat: bytes):
        from ai_edge_litert.interpreter import Interpreter

        ext = det.extractor
        self.levels = tuple(int(v) for v in det._needed_levels())
        import warnings

        with warnings.catch_warnings():  # "preserve all tensors is for debugging": reading them is the point
            warnings.simplefilter("ignore")
            self._interpreter = Interpreter(model_content=flat, experimental_preserve_all_tensors=True)
        self._runner = self._interpreter.get_signature_runner(ENDPOINT)
        outputs = ext.output if isinstance(ext.output, dict) else dict(zip(ext.output_names, ext.outputs))
        produced = [t for op in self._interpreter._get_ops_details() for t in op["outputs"]]
        details = {t["index"]: t for t in self._interpreter.get_tensor_details()}
        self._tensors = {}
        for lv in self.levels:
            layer = outputs[f"level{lv}"]._keras_history.operation.name
            scope = re.compile(rf"(^|/){re.escape(ext.name)}(_\d+)?/{re.escape(layer)}_\d+/")
            found = [i for i in produced if scope.search(details[i]["name"].split(";")[0])]
            if not found:
                raise NotExportable(f"int8: cannot find backbone level {lv} (layer {layer}) in the quantised graph")
            self._tensors[f"level{lv}"] = details[found[-1]]

    def _read(self, detail):
        a = self._interpreter.get_tensor(detail["index"])
        scale, zero = detail["quantization"]
        return a.astype(np.float32) if not scale else ((a.astype(np.float32) - zero) * scale).astype(np.float32)

    def __call__(self, images) -> dict:
        x = np.clip(np.rint(np.asarray(images, np.float32) * 255.0), 0, 255).astype(np.uint8)
        feats = {k: [] for k in self._tensors}
        for img in x:
            self._runner(**{INPUT_NAME: img[None]})
            for k, d in self._tensors.items():
                feats[k].append(self._read(d))
        return {k: np.concatenate(v) for k, v in feats.items()}


def refit_on_int8_features(det, train_u8, flat: bytes) -> None:
    """Refit ``det``'s head on the features the int8 export ``flat`` computes for ``train_u8``.

    ``det`` keeps its Keras backbone (the final graph is built from it and
    quantises identically); ``det._feature_source`` stays set, so eager scoring
    reads the int8 features: that is the reference the final file must match.
    """
    det._feature_source = Int8Features(det, flat)
    det.fit(train_u8.astype(np.float32) / 255.0)
