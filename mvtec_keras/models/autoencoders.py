"""Five convolutional autoencoders for reconstruction-based anomaly detection.

Every builder returns a plain Keras 3 functional model made of stock layers
(so ``.keras`` files load without custom objects): input ``[H, W, C]`` with
``C`` = 1 (grayscale) or 3 (RGB), sigmoid output of the same shape. The
reference input is 256 x 256; other sizes work when each side is a multiple of
the model's ``size_multiple`` (see :func:`autoencoder_info`), because the
decoder mirrors a fixed number of stride-2 stages of the encoder.

The designs follow the architectures compared in the MVTec AD literature:

- ``mvtecCAE``: Bergmann et al. 2019 (SSIM autoencoder), strided 4x4 convs to
  an 8x8x1 convolutional bottleneck, transposed-conv decoder.
- ``baselineCAE``: six conv/BN/LeakyReLU/max-pool stages, Dense-64 latent.
- ``inceptionCAE``: inception blocks (1x1, 3x3, 5x5, pool) down to 4x4x512.
- ``resnetCAE``: ResNet-18 encoder (post-activation basic blocks, 1x1
  projection shortcuts) and a residual transposed-conv decoder.
- ``skipCAE``: seven strided convs to a Dense-64 latent, two additive skips.
"""

from __future__ import annotations

import math

import keras
from keras import layers

from ..distribute import batch_norm
from ..errors import InputError

AUTOENCODERS = ("mvtecCAE", "baselineCAE", "inceptionCAE", "resnetCAE", "skipCAE")

# Parameter counts at 256 x 256 as built here (count_params, BN statistics
# included); the tests re-derive them from the architecture.
_INFO = {
    "mvtecCAE": dict(
        size_multiple=32,
        reference_params={"grayscale": 744_994, "rgb": 750_116},
        color_mode="grayscale",
        loss="ssim",
        description="Bergmann et al. 2019 SSIM autoencoder: strided 4x4 convs, 8x8x1 conv bottleneck",
    ),
    "baselineCAE": dict(
        size_multiple=64,
        reference_params={"grayscale": 712_197, "rgb": 713_359},
        color_mode="grayscale",
        loss="ssim",
        description="six conv/BN/LeakyReLU/max-pool stages to a Dense-64 latent and back",
    ),
    "inceptionCAE": dict(
        size_multiple=64,
        reference_params={"grayscale": 11_521_797, "rgb": 11_526_415},
        color_mode="rgb",
        loss="mssim",
        description="inception blocks (1x1, 3x3, 5x5, pool branches) down to 4x4x512",
    ),
    "resnetCAE": dict(
        size_multiple=32,
        reference_params={"grayscale": 15_017_025, "rgb": 15_024_323},
        color_mode="rgb",
        loss="l2",
        description="ResNet-18 encoder with projection shortcuts, residual transposed-conv decoder",
    ),
    "skipCAE": dict(
        size_multiple=128,
        reference_params={"grayscale": 3_047_617, "rgb": 3_048_771},
        color_mode="rgb",
        loss="l2",
        description="seven strided convs to a Dense-64 latent, two additive encoder-decoder skips",
    ),
}

_CONSTRAINTS = {
    "mvtecCAE": "height and width multiples of 32 (five stride-2 convs)",
    "baselineCAE": (
        "height and width multiples of 64 (six max-pools), and (H/64)*(W/64) must divide 64 "
        "(the 64-d latent is reshaped onto the H/64 x W/64 grid), e.g. 64, 128, 256, 512"
    ),
    "inceptionCAE": "height and width multiples of 64 (six max-pools)",
    "resnetCAE": "height and width multiples of 32 (stem conv, max-pool and three strided stages)",
    "skipCAE": "height and width multiples of 128 (seven stride-2 convs)",
}


def _canonical(name) -> str:
    by_lower = {n.lower(): n for n in AUTOENCODERS}
    key = str(name).lower()
    if key not in by_lower:
        raise InputError(f"unknown autoencoder '{name}'; choose from {', '.join(AUTOENCODERS)}")
    return by_lower[key]


def autoencoder_info(name) -> dict:
    """Static facts about one architecture (no model is built)."""
    canon = _canonical(name)
    info = dict(_INFO[canon])
    info["reference_params"] = dict(info["reference_params"])
    info.update(
        name=canon,
        default_size=(256, 256),
        size_constraint=_CONSTRAINTS[canon],
        # Default input shape for the reference colour mode.
        default_input_shape=(256, 256, 1 if info["color_mode"] == "grayscale" else 3),
    )
    return info


def build_autoencoder(name, input_shape=(256, 256, 1)) -> keras.Model:
    """Build an untrained autoencoder by (case-insensitive) name."""
    canon = _canonical(name)
    h, w, c = _check_shape(canon, input_shape)
    return _BUILDERS[canon](h, w, c)


def _check_shape(canon, input_shape):
    try:
        h, w, c = (int(v) for v in input_shape)
    except (TypeError, ValueError):
        raise InputError(f"input_shape {input_shape!r}: expected (height, width, channels)") from None
    if c not in (1, 3):
        raise InputError(f"input_shape {tuple(input_shape)}: channels must be 1 (grayscale) or 3 (rgb)")
    m = _INFO[canon]["size_multiple"]
    if h < m or w < m or h % m or w % m:
        raise InputError(f"input_shape {tuple(input_shape)}: {canon} needs {_CONSTRAINTS[canon]}")
    if canon == "baselineCAE" and 64 % ((h // 64) * (w // 64)):
        raise InputError(f"input_shape {tuple(input_shape)}: {canon} needs {_CONSTRAINTS[canon]}")
    return h, w, c


# ---------------------------------------------------------------------------
# mvtecCAE
# ---------------------------------------------------------------------------
def _mvtec_cae(h, w, c):
    def conv(x, filters, kernel, strides=1, name=None):
        x = layers.Conv2D(filters, kernel, strides=strides, padding="same", name=name)(x)
        return layers.LeakyReLU(negative_slope=0.2)(x)

    def deconv(x, filters):
        x = layers.Conv2DTranspose(filters, 4, strides=2, padding="same")(x)
        return layers.LeakyReLU(negative_slope=0.2)(x)

    inp = keras.Input((h, w, c), name="image")
    # Encoder: the 128-px design of Bergmann et al. with one more 4x4/2 conv for 256 px.
    x = conv(inp, 32, 4, 2)
    x = conv(x, 32, 4, 2)
    x = conv(x, 32, 4, 2)
    x = conv(x, 32, 3)
    x = conv(x, 64, 4, 2)
    x = conv(x, 64, 3)
    x = conv(x, 128, 4, 2)
    x = conv(x, 64, 3)
    x = conv(x, 32, 3)
    # Linear 1-channel bottleneck: an 8x8x1 code at 256 px (H/32 x W/32 x 1 in general).
    z = layers.Conv2D(1, 8, padding="same", name="bottleneck")(x)

    # Decoder mirrors the encoder with transposed convs.
    x = conv(z, 32, 8)
    x = conv(x, 64, 3)
    x = conv(x, 128, 3)
    x = deconv(x, 64)
    x = conv(x, 64, 3)
    x = deconv(x, 64)
    x = conv(x, 32, 3)
    x = deconv(x, 32)
    x = conv(x, 32, 3)
    x = deconv(x, 32)
    x = deconv(x, 32)
    out = layers.Conv2D(c, 8, padding="same", activation="sigmoid", name="reconstruction")(x)
    return keras.Model(inp, out, name="mvtecCAE")


# ---------------------------------------------------------------------------
# baselineCAE
# ---------------------------------------------------------------------------
def _baseline_cae(h, w, c):
    def block(x, filters):
        x = layers.Conv2D(filters, 3, padding="same")(x)
        x = batch_norm()(x)
        return layers.LeakyReLU(negative_slope=0.1)(x)

    inp = keras.Input((h, w, c), name="image")
    x = inp
    for filters in (32, 32, 64, 64, 128, 128):
        x = layers.MaxPooling2D(2)(block(x, filters))
    x = layers.Flatten()(x)
    x = layers.Dense(64, name="latent")(x)
    x = layers.LeakyReLU(negative_slope=0.1)(x)

    # The 64-d code is laid out on the H/64 x W/64 grid the encoder ended on
    # (4 x 4 x 4 at 256 px), so the decoder is fully convolutional.
    gh, gw = h // 64, w // 64
    x = layers.Reshape((gh, gw, 64 // (gh * gw)))(x)
    for filters in (128, 128, 64, 64, 32, 32):
        x = layers.UpSampling2D(2)(block(x, filters))
    x = layers.Conv2D(c, 3, padding="same")(x)
    x = batch_norm()(x)
    out = layers.Activation("sigmoid", name="reconstruction")(x)
    return keras.Model(inp, out, name="baselineCAE")


# ---------------------------------------------------------------------------
# inceptionCAE
# ---------------------------------------------------------------------------
def _inception_block(x, filters):
    """Four parallel branches (1x1, 3x3, 5x5, 3x3-maxpool + 1x1), concatenated: 4*filters channels."""

    def conv_bn(t, kernel):
        t = layers.Conv2D(filters, kernel, padding="same")(t)
        t = batch_norm()(t)
        return layers.LeakyReLU(negative_slope=0.1)(t)

    pooled = layers.MaxPooling2D(3, strides=1, padding="same")(x)
    return layers.Concatenate()([conv_bn(x, 1), conv_bn(x, 3), conv_bn(x, 5), conv_bn(pooled, 1)])


def _inception_cae(h, w, c):
    inp = keras.Input((h, w, c), name="image")
    x = inp
    enc = (32, 32, 64, 64, 128, 128)
    for i, filters in enumerate(enc):
        # The last pool yields the code: H/64 x W/64 x 512 (4 x 4 x 512 at 256 px).
        x = layers.MaxPooling2D(2, name="code" if i == len(enc) - 1 else None)(_inception_block(x, filters))
    for filters in (128, 128, 64, 64, 32, 32):
        x = layers.UpSampling2D(2)(_inception_block(x, filters))
    x = layers.Conv2D(c, 3, padding="same")(x)
    x = batch_norm()(x)
    out = layers.Activation("sigmoid", name="reconstruction")(x)
    return keras.Model(inp, out, name="inceptionCAE")


# ---------------------------------------------------------------------------
# resnetCAE
# ---------------------------------------------------------------------------
def _basic_block(x, filters, strides, name):
    """ResNet basic block: two 3x3 conv-BN, shortcut (1x1 projection when the shape changes), add, ReLU."""
    y = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    y = batch_norm(name=f"{name}_bn1")(y)
    y = layers.ReLU()(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = batch_norm(name=f"{name}_bn2")(y)
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=strides, use_bias=False, name=f"{name}_proj")(x)
        shortcut = batch_norm(name=f"{name}_proj_bn")(shortcut)
    # Every block, the last one included, sums both branches.
    out = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.ReLU(name=f"{name}_out")(out)


def _up_block(x, filters, name):
    """x2 upsampling (4x4 transposed conv) refined by a 3x3 transposed conv, with an additive skip."""
    up = layers.Conv2DTranspose(filters, 4, strides=2, padding="same", use_bias=False, name=f"{name}_up")(x)
    y = layers.ReLU()(batch_norm()(up))
    y = layers.Conv2DTranspose(filters, 3, padding="same", use_bias=False, name=f"{name}_refine")(y)
    y = layers.ReLU()(batch_norm()(y))
    return layers.Add(name=f"{name}_add")([up, y])


def _resnet_cae(h, w, c):
    inp = keras.Input((h, w, c), name="image")
    x = layers.Conv2D(64, 7, strides=2, padding="same", use_bias=False, name="stem_conv")(inp)
    x = layers.ReLU()(batch_norm(name="stem_bn")(x))
    x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
    # ResNet-18: four stages of two basic blocks; stages 2-4 halve the resolution.
    for stage, filters in enumerate((64, 128, 256, 512), start=1):
        for block in (1, 2):
            strides = 2 if (stage > 1 and block == 1) else 1
            x = _basic_block(x, filters, strides, name=f"stage{stage}_block{block}")
    # 1x1 bottleneck on the H/32 x W/32 x 512 code.
    x = layers.Conv2D(512, 1, use_bias=False, name="bottleneck")(x)
    x = layers.ReLU()(batch_norm()(x))
    for i, filters in enumerate((256, 128, 64, 32), start=1):
        x = _up_block(x, filters, name=f"decoder{i}")
    out = layers.Conv2DTranspose(c, 4, strides=2, padding="same", activation="sigmoid", name="reconstruction")(x)
    return keras.Model(inp, out, name="resnetCAE")


# ---------------------------------------------------------------------------
# skipCAE
# ---------------------------------------------------------------------------
def _skip_cae(h, w, c):
    def lrelu(t):
        return layers.LeakyReLU(negative_slope=0.3)(t)

    def down(t, filters):
        return layers.Conv2D(filters, 3, strides=2, padding="same")(t)

    def up(t, filters, strides=2):
        return layers.Conv2DTranspose(filters, 3, strides=strides, padding="same")(t)

    inp = keras.Input((h, w, c), name="image")
    y = lrelu(down(inp, 32))
    y = lrelu(down(y, 64))
    skip1 = down(y, 64)  # H/8, 64 channels
    y = lrelu(down(lrelu(skip1), 128))
    skip2 = down(y, 128)  # H/32, 128 channels
    y = lrelu(down(lrelu(skip2), 256))
    y = lrelu(down(y, 256))  # H/128 x W/128 x 256

    grid = tuple(y.shape[1:])
    y = layers.Dense(64, activation="relu", name="latent")(layers.Flatten()(y))
    y = layers.Dense(math.prod(grid), activation="relu")(y)
    y = layers.Reshape(grid)(y)

    y = lrelu(up(y, 256, strides=1))
    y = lrelu(up(y, 256))
    y = layers.Add(name="skip2_add")([skip2, up(y, 128)])
    y = batch_norm()(lrelu(y))
    y = lrelu(up(y, 128))
    y = layers.Add(name="skip1_add")([skip1, up(y, 64)])
    y = batch_norm()(lrelu(y))
    y = lrelu(up(y, 64))
    y = lrelu(up(y, 32))
    out = layers.Conv2DTranspose(c, 3, strides=2, padding="same", activation="sigmoid", name="reconstruction")(y)
    return keras.Model(inp, out, name="skipCAE")


_BUILDERS = {
    "mvtecCAE": _mvtec_cae,
    "baselineCAE": _baseline_cae,
    "inceptionCAE": _inception_cae,
    "resnetCAE": _resnet_cae,
    "skipCAE": _skip_cae,
}
