"""Exact rewrites of layers that LiteRT runs slowly, applied to a network for export only.

A ``Conv2D`` with very few output channels (an autoencoder's reconstruction
layer: 8 x 8 kernel, 1 or 3 channels, at full resolution) leaves LiteRT's
GEMM kernels nearly idle: they compute 8-16 output channels at once. The
same convolution computed in space-to-depth form (blocks of ``b x b`` pixels
become channels, a small convolution makes ``b*b`` output channels per block,
depth-to-space puts them back) gives those kernels full tiles. It computes
the same sums (float results differ by rounding only), and int8 quantises it
per output phase, which is finer than per channel.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

#: rewrite a stride-1 'same' Conv2D with at most this many filters and a kernel at least this large
MAX_FILTERS, MIN_KERNEL, BLOCK = 3, 7, 4


def space_to_depth_kernel(kernel: np.ndarray, block: int) -> np.ndarray:
    """``[k, k, cin, cout]`` of a stride-1 'same' conv -> the ``[n, n, b*b*cin, b*b*cout]`` kernel of the same
    conv on ``tf.nn.space_to_depth(x, b)`` whose output ``tf.nn.depth_to_space(., b)`` restores."""
    k, _, cin, cout = kernel.shape
    before = (k - 1) // 2  # TF's 'same' pads (k - 1) // 2 before
    lo, hi = -((before + block - 1) // block), (block - 1 + k - 1 - before) // block
    n = hi - lo + 1
    if lo != -(n // 2) or n % 2 == 0:
        raise ValueError(f"kernel {k} with block {block}: its block-space kernel is not centred")
    w = np.zeros((n, n, block, block, cin, block, block, cout), kernel.dtype)
    # output pixel (b*Y + p) reads input pixel (b*(Y + a + lo) + s) with tap d = b*(a + lo) + s - p + before
    for a in range(n):
        for s in range(block):
            for p in range(block):
                dy = block * (a + lo) + s - p + before
                if not 0 <= dy < k:
                    continue
                for c in range(n):
                    for t in range(block):
                        for q in range(block):
                            dx = block * (c + lo) + t - q + before
                            if 0 <= dx < k:
                                w[a, c, s, t, :, p, q, :] = kernel[dy, dx]
    return w.reshape(n, n, block * block * cin, block * block * cout)


class _RewrittenConv(keras.layers.Layer):
    """A layer holding the constant kernel and bias of a rewritten conv (``_kernel_value``, ``_bias_value``,
    set by the subclass before build) as its weights."""

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=self._kernel_value.shape, initializer="zeros", name="kernel")
        self.bias = self.add_weight(shape=self._bias_value.shape, initializer="zeros", name="bias")
        self.kernel.assign(self._kernel_value)
        self.bias.assign(self._bias_value)


class SpaceToDepthConv2D(_RewrittenConv):
    """A stride-1 'same' ``Conv2D`` computed as space-to-depth -> conv -> depth-to-space (TF ops: export only)."""

    def __init__(self, conv: keras.layers.Conv2D, block: int = BLOCK, **kwargs):
        super().__init__(name=f"{conv.name}_s2d", **kwargs)
        kernel = keras.ops.convert_to_numpy(conv.kernel)
        self.block = block
        self.activation = conv.activation
        self._kernel_value = space_to_depth_kernel(kernel, block)
        bias = keras.ops.convert_to_numpy(conv.bias) if conv.use_bias else np.zeros(kernel.shape[-1], kernel.dtype)
        self._bias_value = np.tile(bias, block * block)  # depth_to_space channel order: (p, q, cout)

    def call(self, x):
        y = tf.nn.conv2d(tf.nn.space_to_depth(x, self.block), self.kernel, 1, "SAME") + self.bias
        return self.activation(tf.nn.depth_to_space(y, self.block))


def transposed_conv_phase_kernel(kernel: np.ndarray, stride: int) -> np.ndarray | None:
    """``[k, k, cout, cin]`` of a 'same' ``Conv2DTranspose`` with ``stride`` -> the ``[n, n, cin, s*s*cout]``
    kernel of a stride-1 'same' conv whose ``tf.nn.depth_to_space(., s)`` is the transposed conv's output
    (None for a kernel smaller than the stride)."""
    k, _, cout, cin = kernel.shape
    s = stride
    before = (k - s) // 2  # the forward conv's 'same' padding before, for an input of s * H
    # output pixel s*m + p reads input pixel m + d with tap t = p + before - s*d
    reach = max((k - 1 - before) // s, (s - 1 + before) // s)
    d_lo, n = -reach, 2 * reach + 1  # centred: the taps a side does not reach stay zero
    if k < s:
        return None
    w = np.zeros((n, n, cin, s, s, cout), kernel.dtype)
    for a in range(n):
        for p in range(s):
            ty = p + before - s * (a + d_lo)
            if not 0 <= ty < k:
                continue
            for b in range(n):
                for q in range(s):
                    tx = q + before - s * (b + d_lo)
                    if 0 <= tx < k:
                        w[a, b, :, p, q, :] = kernel[ty, tx].T
    return w.reshape(n, n, cin, s * s * cout)


class PhaseConv2DTranspose(_RewrittenConv):
    """A strided 'same' ``Conv2DTranspose`` computed as a stride-1 conv making one channel group per output
    phase, then depth-to-space (TF ops: export only). Same sums. int8 graphs only: LiteRT's int8
    TRANSPOSE_CONV was the slow part of an int8 mvtecCAE at 256 px, while in float32 the phase kernel's zero
    taps (a 4 x 4, stride-2 kernel becomes 3 x 3 x 4 phases) only make the file larger."""

    def __init__(self, layer: keras.layers.Conv2DTranspose, **kwargs):
        super().__init__(name=f"{layer.name}_phase", **kwargs)
        self.stride = int(layer.strides[0])
        self.activation = layer.activation
        self._kernel_value = transposed_conv_phase_kernel(keras.ops.convert_to_numpy(layer.kernel), self.stride)
        cout = int(layer.kernel.shape[2])
        bias = (keras.ops.convert_to_numpy(layer.bias) if layer.use_bias else np.zeros(cout, np.float32))
        self._bias_value = np.tile(bias, self.stride * self.stride)  # depth_to_space order: (p, q, cout)

    def call(self, x):
        y = tf.nn.conv2d(x, self.kernel, 1, "SAME") + self.bias
        return self.activation(tf.nn.depth_to_space(y, self.stride))


def _transposed_rewritable(layer) -> bool:
    if type(layer) is not keras.layers.Conv2DTranspose:
        return False
    c = layer.get_config()
    strides, kernel = tuple(c["strides"]), tuple(c["kernel_size"])
    return (strides[0] == strides[1] > 1 and kernel[0] == kernel[1] and c["padding"] == "same"
            and c.get("output_padding") is None and tuple(c["dilation_rate"]) == (1, 1)
            and c["data_format"] == "channels_last" and kernel[0] >= strides[0])


def _rewritable(layer) -> bool:
    if type(layer) is not keras.layers.Conv2D:
        return False
    c = layer.get_config()
    h, w = layer.input.shape[1:3]
    return (c["filters"] <= MAX_FILTERS and min(c["kernel_size"]) >= MIN_KERNEL
            and c["kernel_size"][0] == c["kernel_size"][1] and tuple(c["strides"]) == (1, 1)
            and tuple(c["dilation_rate"]) == (1, 1) and c["padding"] == "same" and c.get("groups", 1) == 1
            and c["data_format"] == "channels_last" and h and w and h % BLOCK == 0 and w % BLOCK == 0)


def fast_inference_model(model: keras.Model, transposed: bool = False) -> keras.Model | None:
    """``model`` with its output-channel-starved convs rewritten and, with ``transposed``, its strided
    transposed convs in phase form (other layers shared, not copied), or None when it has none of them."""

    def phase(layer):
        return transposed and _transposed_rewritable(layer)

    if not isinstance(model, keras.Model) or not any(_rewritable(layer) or phase(layer) for layer in model.layers):
        return None

    def rewrite(layer):
        if _rewritable(layer):
            return SpaceToDepthConv2D(layer)
        return PhaseConv2DTranspose(layer) if phase(layer) else layer

    return keras.models.clone_model(model, clone_function=rewrite)
