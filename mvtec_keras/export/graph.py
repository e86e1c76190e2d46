"""One scoring graph per detector: uint8 image in, image score and anomaly map out.

The graph holds everything between the decoded, resized image and the
scores: the ``/ 255`` rescaling, colour handling, the backbone or
autoencoder, the residual map or feature distance, upsampling, blur and the
image-score reduction, and -- for image-score operating points -- the
decision. Resizing from the camera's size stays outside (see
:mod:`mvtec_keras.runtime.images`), as does the region analysis of
segmentation decisions (connected components; the runtime does it with
:func:`mvtec_keras.thresholds.decide`).

Each family maps to a function of float images ``[B, H, W, C]`` in ``[0, 1]``
that reuses the detector's own scoring code (the same Keras ops that
``score_batch`` runs), so an export cannot drift from the detector.
"""

from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf

from ..errors import InputError

#: the endpoint every exported SavedModel / LiteRT file / ONNX graph serves
ENDPOINT = "serve"
INPUT_NAME = "image"


class NotExportable(InputError):
    """This detector (or this precision of it) cannot become one graph; the message says why."""


def scoring_function(det):
    """``x [B, H, W, C] float32 in [0, 1] -> (scores [B], maps [B, H, W] or None)`` for ``det``."""
    from ..detectors.autoencoder import AutoencoderDetector
    from ..detectors.ensemble import SeedEnsemble
    from ..detectors.gan import AnoGANDetector, _KerasModelDetector

    det._check_fitted()
    if isinstance(det, AnoGANDetector):
        raise NotExportable(
            "anogan cannot be exported: it scores by optimising a latent vector per image "
            "(gradient steps through the generator at test time), which no LiteRT/ONNX graph runs"
        )
    if isinstance(det, AutoencoderDetector):
        return det.scoring_graph
    if isinstance(det, _KerasModelDetector):
        return det._score_graph
    if isinstance(det, SeedEnsemble):
        members = [scoring_function(m) for m in det.members_]
        center, scale = tf.constant(det.center_), tf.constant(det.scale_)

        def ensemble(x):
            outs = [f(x) for f in members]
            s = tf.stack([tf.cast(o[0], tf.float32) for o in outs], axis=0)
            score = tf.reduce_mean((s - center[:, None]) / scale[:, None], axis=0)
            if any(o[1] is None for o in outs):
                return score, None
            return score, tf.reduce_mean(tf.stack([tf.cast(o[1], tf.float32) for o in outs], axis=0), axis=0)

        return ensemble
    if hasattr(det, "extractor"):  # Mahalanobis, PaDiM, PatchCore, SPADE: score_batch is Keras ops
        return det.score_batch
    raise NotExportable(f"{det.name}: no export graph for this detector family")


def tracked_models(det) -> list:
    """The Keras models whose variables the exported graph reads."""
    from ..detectors.ensemble import SeedEnsemble

    if isinstance(det, SeedEnsemble):
        return [m for member in det.members_ for m in tracked_models(member)]
    if hasattr(det, "model_"):
        return [det.model_]
    if hasattr(det, "extractor"):
        return [det.extractor]
    return []


#: LiteRT precisions whose converter quantises every constant of the graph (it has no float denylist for them)
WHOLE_GRAPH_PRECISIONS = ("float16", "dynamic")


def has_fitted_head(det) -> bool:
    """Whether the graph holds fitted statistics beside its network: a Gaussian's means and precisions or a
    memory bank (the feature detectors)."""
    from ..detectors.ensemble import SeedEnsemble

    if isinstance(det, SeedEnsemble):
        return any(has_fitted_head(m) for m in det.members_)
    return hasattr(det, "extractor")


def check_precision(det, precision: str) -> None:
    """One line and exit 2 for a precision that would quantise a fitted head: its distances are differences
    of nearly equal numbers, and float16 or int8 constants move them far more than they move the backbone."""
    if precision in WHOLE_GRAPH_PRECISIONS and has_fitted_head(det):
        raise NotExportable(
            f"--precision {precision}: not for {det.name}: it quantises every constant, the fitted head's (means, "
            f"precisions, memory bank) too, which moves the distances; use float32, or int8 (int8 backbone, "
            f"float head refitted on its features)")


@contextlib.contextmanager
def filters_for(precision: str):
    """Inside the block, a float16 / dynamic graph filters (SSIM moments, map blur) by convolution with its
    few taps: those modes would quantise the [n, n] filter matrices of the matmul form (dynamic: to int8);
    float16 graphs take taps that float16 represents exactly and that still sum to 1."""
    from .. import residuals

    saved = residuals.MATRIX_FILTER_MAX, residuals.TAPS_PRECISION
    if precision in WHOLE_GRAPH_PRECISIONS:
        residuals.MATRIX_FILTER_MAX = 0
    if precision == "float16":
        residuals.TAPS_PRECISION = "float16"
    try:
        yield
    finally:
        residuals.MATRIX_FILTER_MAX, residuals.TAPS_PRECISION = saved


def needs_static_batch(det) -> bool:
    """SPADE matches each image against its own gallery in a Python loop over the batch."""
    from ..detectors.ensemble import SeedEnsemble

    if isinstance(det, SeedEnsemble):
        return any(needs_static_batch(m) for m in det.members_)
    return det.name == "spade"


def serving_fn(det, input_shape, operating_point=None):
    """The endpoint: ``{"image": uint8 [B, H, W, C]} -> {"score", "map"?, "decision"?}``.

    ``decision`` (1 = anomalous) is in the graph only for image-score operating
    points; a segmentation decision needs connected regions of the thresholded
    map, which the runtime computes.
    """
    score_fn = scoring_function(det)
    threshold = None
    if operating_point and operating_point.get("decision") == "image_score":
        threshold = float(operating_point["threshold"])

    def serve(image):
        x = tf.cast(image, tf.float32) * (1.0 / 255.0)  # as tf.image.convert_image_dtype in training
        x = tf.ensure_shape(x, [None, *input_shape])
        scores, maps = score_fn(x)
        out = {"score": tf.reshape(tf.cast(scores, tf.float32), [-1])}
        if maps is not None:
            out["map"] = tf.cast(maps, tf.float32)
        if threshold is not None:
            # thresholds.decide compares float32 scores with a float64 threshold; the smallest float32 >= it
            # gives the same decisions with a float32 op (LiteRT's int8 path has no float64 compare)
            out["decision"] = tf.cast(out["score"] >= _float32_at_or_above(threshold), tf.uint8)
        return out

    return serve


def _float32_at_or_above(value: float) -> np.float32:
    """The smallest float32 >= ``value``: for float32 ``s``, ``s >= value`` iff ``s >= this``."""
    t = np.float32(value)
    return np.nextafter(t, np.float32(np.inf)) if float(t) < float(value) else t


def build_archive(det, input_shape, operating_point=None, batch_size=None):
    """A ``keras.export.ExportArchive`` with the ``serve`` endpoint (batch ``batch_size``, None = any)."""
    import keras

    if batch_size is None and needs_static_batch(det):
        batch_size = 1
    _warm_caches(det)
    archive = keras.export.ExportArchive()
    for model in tracked_models(det):
        archive.track(model)
    spec = tf.TensorSpec([batch_size, *input_shape], tf.uint8, name=INPUT_NAME)
    archive.add_endpoint(ENDPOINT, serving_fn(det, tuple(input_shape), operating_point), input_signature=[spec])
    return archive


def float32_networks(det) -> list:
    """Give every network of ``det`` that was trained in mixed precision a float32 copy (same weights), in place;
    returns the names of the members changed. The exported graph computes in float32, and so does the Keras
    detector it is checked against."""
    from ..models.precision import float32_model

    changed = []
    for member in getattr(det, "members_", None) or [det]:
        model = getattr(member, "model_", None)
        copy = None if model is None else float32_model(model)
        if copy is not model:
            member.model_ = copy
            changed.append(member.name)
    return changed


@contextlib.contextmanager
def fast_networks(det, precision: str = "float32"):
    """The autoencoders' networks replaced by :func:`rewrite.fast_inference_model` inside the block (strided
    transposed convs in phase form for int8 graphs): build *and write* the archive in it (writing traces
    again). Outside, the Keras detector, which the export is checked against, has its own networks."""
    from ..detectors.autoencoder import AutoencoderDetector
    from .rewrite import fast_inference_model

    swapped = []
    try:
        for member in getattr(det, "members_", None) or [det]:
            if isinstance(member, AutoencoderDetector):
                fast = fast_inference_model(member.model_, transposed=precision == "int8")
                if fast is not None:
                    swapped.append((member, member.model_))
                    member.model_ = fast
        yield
    finally:
        for member, model in swapped:
            member.model_ = model


def _warm_caches(det) -> None:
    """Build the detectors' cached constant tensors eagerly, so that traces capture them
    (a cache first filled inside one trace would hand later traces a foreign graph's tensor)."""
    for member in getattr(det, "members_", None) or [det]:
        if hasattr(member, "_tensors"):
            member._tensors()
