"""Multi-level EfficientNet feature extractor (the nine levels of Rippel et al., 2020).

Level 1 is the stem (after its activation), levels 2-8 the outputs of the
seven MBConv stages, level 9 the head (top conv + BN + activation). The model
takes float32 images ``[B, S, S, 3]`` in ``[0, 1]``; the backbone's own input
normalisation happens inside it.
"""

from __future__ import annotations

import os
import re
import warnings

import keras
import numpy as np

from ..errors import InputError

BACKBONES: dict[str, int] = {
    "efficientnet-b0": 224,
    "efficientnet-b1": 240,
    "efficientnet-b2": 260,
    "efficientnet-b3": 300,
    "efficientnet-b4": 380,
    "efficientnet-b5": 456,
    "efficientnet-b6": 528,
    "efficientnet-b7": 600,
    "efficientnet-lite0": 224,
    "efficientnet-lite1": 240,
    "efficientnet-lite2": 260,
}

ALL_LEVELS = tuple(range(1, 10))
# Stride of each level w.r.t. the input; the same for every B and Lite variant
# (stem /2, then stages 2, 3, 4 and 6 halve the resolution).
_STRIDES = {1: 2, 2: 2, 3: 4, 4: 8, 5: 16, 6: 16, 7: 32, 8: 32, 9: 32}

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

_KERAS_APPS = {f"efficientnet-b{i}": f"EfficientNetB{i}" for i in range(8)}
_NOISY_PREFIX = "noisy-student:"


def _check_backbone(backbone: str) -> str:
    if backbone not in BACKBONES:
        raise InputError(f"unknown backbone '{backbone}'; choose from {', '.join(BACKBONES)}")
    return backbone


def is_lite(backbone: str) -> bool:
    return _check_backbone(backbone).startswith("efficientnet-lite")


def tap_strides(backbone: str = "efficientnet-b0") -> dict[int, int]:
    """Spatial stride of each level relative to the input image."""
    _check_backbone(backbone)
    return dict(_STRIDES)


def _check_levels(levels) -> tuple[int, ...]:
    try:
        levels = tuple(sorted({int(v) for v in levels}))
    except (TypeError, ValueError):
        raise InputError(f"levels: expected integers in 1..9, got {levels!r}") from None
    if not levels or levels[0] < 1 or levels[-1] > 9:
        raise InputError(f"levels: expected a non-empty subset of 1..9, got {list(levels)}")
    return levels


def tap_layer_names(model: keras.Model) -> dict[int, str]:
    """Map level -> layer name in a keras.applications-style EfficientNet (B or Lite)."""
    names = [layer.name for layer in model.layers]
    taps = {1: "stem_activation", 9: "top_activation"}
    for stage in range(1, 8):
        # The stage output is its last layer (the residual add, or project_bn
        # for a stage with one block); layers are listed in topological order.
        pat = re.compile(rf"^block{stage}[a-z]_")
        in_stage = [n for n in names if pat.match(n)]
        if not in_stage:
            raise ValueError(f"{model.name}: no layers for stage {stage}")
        taps[stage + 1] = in_stage[-1]
    return taps


def build_feature_extractor(
    backbone: str = "efficientnet-b0",
    weights="imagenet",
    levels=ALL_LEVELS,
    input_size: int | None = None,
    pooled: bool = False,
) -> keras.Model:
    """Build a Keras model mapping ``[B, S, S, 3]`` images in [0, 1] to ``{"levelK": features}``.

    ``weights``: ``"imagenet"``, ``None`` (random init), a local Keras weights
    file (``.weights.h5`` saved from an extractor of this backbone reaching at
    least as deep, or a keras.applications ``*_notop.h5``), for B0-B7
    ``"noisy-student:/path/model.ckpt"``, for Lite a ``.pth`` state dict.
    ``pooled=True`` global-average-pools every level to ``[B, C]``.
    See docs/weights.md.
    """
    _check_backbone(backbone)
    levels = _check_levels(levels)
    size = BACKBONES[backbone] if input_size is None else int(input_size)
    if size < 32:
        raise InputError(f"input_size: must be at least 32 pixels, got {size}")
    weights = _normalise_weights_arg(weights)
    inp = keras.Input((size, size, 3), name="image")
    if is_lite(backbone):
        full = _lite_backbone(backbone, inp, weights)
    else:
        full = _keras_app_backbone(backbone, inp, weights)

    taps = tap_layer_names(full)
    outputs = {}
    for lvl in levels:
        t = full.get_layer(taps[lvl]).output
        if pooled:
            t = keras.layers.GlobalAveragePooling2D(name=f"pool_level{lvl}")(t)
        outputs[f"level{lvl}"] = t
    name = f"{backbone.replace('-', '_')}_features"
    model = keras.Model(inp, outputs, name=name)
    if isinstance(weights, str) and weights.endswith(".weights.h5"):
        _load_keras_weights(model, weights)
    return model


# -- weights -------------------------------------------------------------------
def _normalise_weights_arg(weights):
    if weights is None or weights == "imagenet":
        return weights
    if not isinstance(weights, (str, os.PathLike)):
        raise InputError(f"weights: expected 'imagenet', None, 'noisy-student:PATH' or a file path, got {weights!r}")
    weights = os.fspath(weights)
    if weights.startswith(_NOISY_PREFIX):
        return weights
    if not os.path.isfile(weights):
        raise InputError(f"weights: file not found: {weights}")
    return weights


def _load_keras_weights(model: keras.Model, path: str) -> None:
    try:
        with warnings.catch_warnings():
            # Keras warns about its own internal op containers; the layers load fine.
            warnings.filterwarnings("ignore", message="Skipping nested container")
            model.load_weights(path)
    except Exception as e:  # noqa: BLE001 - any failure means the file does not fit
        raise InputError(
            f"{path}: cannot load these weights into {model.name} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); save them from an extractor of the same "
            "backbone whose levels reach at least as deep (level 9 fits every request)"
        ) from None


def _set_imagenet_normalisation(model: keras.Model) -> None:
    """Make the keras.applications Normalization layer compute (x/255 - mean) / std.

    keras.applications stores the std (not its square) as the variance and
    compensates with an extra Rescaling layer that it only adds for
    ``weights="imagenet"``; we build without that layer, so set the exact stats.
    """
    norm = next(layer for layer in model.layers if isinstance(layer, keras.layers.Normalization))
    norm.adapt_mean.assign(IMAGENET_MEAN)
    norm.adapt_variance.assign(IMAGENET_STD**2)
    norm.finalize_state()  # the layer reads cached tensors, refreshed here


def _keras_app_backbone(backbone: str, inp, weights) -> keras.Model:
    app_fn = getattr(keras.applications, _KERAS_APPS[backbone])
    # keras.applications expects pixels in [0, 255]; our contract is [0, 1].
    x = keras.layers.Rescaling(255.0, name="to_uint8_range")(inp)
    full = app_fn(include_top=False, weights=None, input_tensor=x)  # rooted at `inp`
    _set_imagenet_normalisation(full)
    if weights is None or (isinstance(weights, str) and weights.endswith(".weights.h5")):
        return full
    if weights == "imagenet":
        path = _fetch_keras_imagenet(backbone)
        _load_legacy_h5(full, path)
    elif weights.startswith(_NOISY_PREFIX):
        from .convert import load_noisy_student

        load_noisy_student(full, weights[len(_NOISY_PREFIX) :], backbone)
    elif weights.endswith(".h5"):
        _load_legacy_h5(full, weights)
    else:
        raise InputError(f"weights: {weights}: expected a .h5 / .weights.h5 Keras file for {backbone}")
    _set_imagenet_normalisation(full)
    return full


def _load_legacy_h5(model: keras.Model, path: str) -> None:
    try:
        model.load_weights(path)
    except Exception as e:  # noqa: BLE001
        raise InputError(
            f"{path}: not a keras.applications notop weights file for {model.name} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def _fetch_keras_imagenet(backbone: str) -> str:
    """Download (or find in ~/.keras/models) the keras.applications notop weights."""
    from keras.src.applications import efficientnet as kapp

    tag = "b" + backbone[-1]
    fname = f"efficientnet{tag}_notop.h5"
    try:
        return keras.utils.get_file(
            fname, kapp.BASE_WEIGHTS_PATH + fname, cache_subdir="models", file_hash=kapp.WEIGHTS_HASHES[tag][1]
        )
    except Exception as e:  # noqa: BLE001 - offline, proxy, hash mismatch...
        raise InputError(
            f"weights=imagenet: could not download {fname} ({type(e).__name__}); download it elsewhere "
            f"and pass the local file: weights='/path/to/{fname}' (see docs/weights.md)"
        ) from None


def _lite_backbone(backbone: str, inp, weights) -> keras.Model:
    from .efficientnet_lite import build_efficientnet_lite

    full = build_efficientnet_lite(backbone, input_tensor=inp, include_top=False)
    if weights is None or (isinstance(weights, str) and weights.endswith(".weights.h5")):
        return full
    from .convert import load_lite_weights

    if weights == "imagenet" or weights.endswith(".pth"):
        load_lite_weights(full, backbone, path=None if weights == "imagenet" else weights)
    else:
        raise InputError(
            f"weights: {weights}: for {backbone} expected 'imagenet', None, a .weights.h5 or a .pth state dict"
        )
    return full
