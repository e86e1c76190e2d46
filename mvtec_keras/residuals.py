"""Residual (anomaly) maps, SSIM / MS-SSIM and reconstruction losses.

Everything here is written in ``keras.ops`` so it runs inside Keras graphs
(and on other Keras backends). Inputs are float32 batches ``[B, H, W, C]`` in
``[0, 1]``; maps come back as ``[B, H, W]`` and per-image values as ``[B]``.

Conventions shared by every function below:

- **Border handling.** Gaussian filters extend the image by mirror reflection
  about the edge (``d c b a | a b c d``; SciPy ``mode='reflect'``, NumPy
  ``'symmetric'``), repeated as often as needed, so maps keep full size even
  when the window is larger than the image. This is what scikit-image does, so
  :func:`ssim_map` agrees with ``structural_similarity(..., full=True)`` up to
  the edges.
- **Colour.** SSIM is computed per channel and the per-channel values are
  averaged (scikit-image with ``channel_axis``, ``tf.image.ssim``).
- **Image-level SSIM** (metrics, losses) is the mean of the map over the
  interior, leaving out the ``win_size // 2`` border where the window sees
  padding; this equals scikit-image's ``mssim`` and ``tf.image.ssim``. Images
  too small for a window fall back to the mean of the whole map.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from .errors import InputError

#: Wang, Simoncelli & Bovik (2003) weights, finest scale first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

# MS-SSIM terms at or below this are treated as 0 (see _clamped_power).
_MS_SSIM_EPS = 1e-6


# -- filtering ---------------------------------------------------------------


def gaussian_kernel(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """1-D normalised Gaussian taps (float32 ``[size]``); the 2-D kernel is its outer product."""
    if int(size) != size or size < 1 or size % 2 == 0:
        raise InputError(f"gaussian kernel size must be a positive odd integer, got {size}")
    if not sigma > 0:
        raise InputError(f"gaussian sigma must be > 0, got {sigma}")
    r = (int(size) - 1) // 2
    t = np.arange(-r, r + 1, dtype=np.float64)
    g = np.exp(-0.5 * (t / float(sigma)) ** 2)
    return (g / g.sum()).astype(np.float32)


#: "float16" while a float16 graph is traced (``export.graph.filters_for``): that converter rounds every
#: constant to float16, and rounded Gaussian taps sum to 1 + 1.6e-4 (11 taps, sigma 1.5), which SSIM's
#: E[x^2] - E[x]^2 turns into a few % of its contrast term in flat regions; such graphs use
#: :func:`float16_exact_taps` instead. None everywhere else.
TAPS_PRECISION = None


def float16_exact_taps(taps) -> np.ndarray:
    """``taps`` rounded to multiples of 2^-m, m as large as keeps every tap under 1900 units (so each is exact
    in float16), the centre tap taking up the rounding: they sum to exactly 1, and stay symmetric."""
    taps = np.asarray(taps, np.float64)
    scale = 2.0 ** np.floor(np.log2(1900.0 / taps.max()))
    w = np.round(taps * scale)
    w[len(w) // 2] += scale - w.sum()
    return (w / scale).astype(np.float32)


def _taps(size: int, sigma: float) -> np.ndarray:
    k = gaussian_kernel(size, sigma)
    return float16_exact_taps(k) if TAPS_PRECISION == "float16" else k


def _reflect_indices(n, r):
    """Source index of each position of an axis of length ``n`` padded by ``r`` each side.

    Mirror reflection about the edge with period ``2n``, so any ``r`` works
    (``ops.pad`` refuses pads longer than the axis).
    """
    i = ops.arange(-r, n + r, dtype="int32")
    i = ops.mod(i, 2 * n)
    return ops.where(i >= n, 2 * n - 1 - i, i)


#: axes up to this length are filtered by one matmul with an [n, n] matrix (reflection folded in):
#: LiteRT runs the 1-channel convolutions below as matrix-vector products, far slower than a matmul
#: (bench/export.py: mvtecCAE 256 px int8 34 -> 12 ms with this and export/rewrite.py); on TF the
#: matmul stops paying beyond a few hundred pixels, where its n^2 work outgrows the taps'.
MATRIX_FILTER_MAX = 256


def filter_matrix(n: int, taps) -> np.ndarray:
    """``[n, n]`` float32 ``M`` with ``M @ v`` = ``v`` filtered by ``taps``, mirror-reflected at both ends."""
    taps = np.asarray(taps, np.float64)
    r = (len(taps) - 1) // 2
    src = np.mod(np.arange(n)[:, None] + np.arange(len(taps))[None, :] - r, 2 * n)
    src = np.where(src >= n, 2 * n - 1 - src, src)
    m = np.zeros((n, n), np.float64)
    np.add.at(m, (np.repeat(np.arange(n), len(taps)), src.ravel()), np.tile(taps, n))
    return m.astype(np.float32)


def _filter_stack(x, taps):
    """Separable filter of ``x`` ``[N, H, W]`` with 1-D ``taps``, reflect-extended, same size out."""
    r = (len(taps) - 1) // 2
    h, w = x.shape[1], x.shape[2]
    if isinstance(h, int) and isinstance(w, int) and max(h, w) <= MATRIX_FILTER_MAX:
        x = ops.einsum("ij,njk->nik", ops.convert_to_tensor(filter_matrix(h, taps), dtype=x.dtype), x)  # rows
        return ops.matmul(x, ops.convert_to_tensor(filter_matrix(w, taps).T, dtype=x.dtype))  # columns
    h, w = ops.shape(x)[1], ops.shape(x)[2]
    x = ops.expand_dims(x, -1)
    k = ops.convert_to_tensor(taps, dtype=x.dtype)
    # Rows, then columns: 2k instead of k^2 multiplies per pixel.
    x = ops.take(x, _reflect_indices(h, r), axis=1)
    x = ops.conv(x, ops.reshape(k, (-1, 1, 1, 1)), padding="valid", data_format="channels_last")
    x = ops.take(x, _reflect_indices(w, r), axis=2)
    x = ops.conv(x, ops.reshape(k, (1, -1, 1, 1)), padding="valid", data_format="channels_last")
    return x[..., 0]


def gaussian_blur(maps, sigma: float = 4.0):
    """Gaussian smoothing of anomaly maps ``[B, H, W]``.

    Separable, truncated at 4 sigma, reflect extension: matches
    ``scipy.ndimage.gaussian_filter(m, sigma, mode='reflect', truncate=4.0)`` per map, for any map
    size. Every detector's maps are blurred here (the feature detectors' too). ``sigma`` 0 or None:
    no blur.
    """
    maps = _float32(maps)
    if len(maps.shape) != 3:
        raise InputError(f"gaussian_blur expects maps [B, H, W], got shape {tuple(maps.shape)}")
    if not sigma:
        return maps
    r = int(4.0 * sigma + 0.5)  # same radius rule as scipy.ndimage
    return _filter_stack(maps, _taps(2 * r + 1, sigma))


# -- colour ------------------------------------------------------------------

_BT601 = (0.299, 0.587, 0.114)


def to_luminance(x):
    """RGB ``[..., 3]`` -> luma ``[..., 1]`` with ITU-R BT.601 weights; 1-channel input passes through."""
    x = ops.convert_to_tensor(x, dtype="float32")
    c = x.shape[-1]
    if c == 1:
        return x
    if c != 3:
        raise InputError(f"to_luminance expects 1 or 3 channels, got {c}")
    w = ops.convert_to_tensor(np.asarray(_BT601, np.float32).reshape(3, 1))
    return ops.matmul(x, w)


def to_rgb(x):
    """1-channel ``[..., 1]`` -> ``[..., 3]`` by repetition; 3-channel input passes through."""
    x = ops.convert_to_tensor(x, dtype="float32")
    c = x.shape[-1]
    if c == 3:
        return x
    if c != 1:
        raise InputError(f"to_rgb expects 1 or 3 channels, got {c}")
    return ops.repeat(x, 3, axis=-1)


# -- SSIM --------------------------------------------------------------------


def _float32(x):
    """To float32, casting (mixed-precision models hand over bfloat16 reconstructions)."""
    x = ops.convert_to_tensor(x)
    return x if x.dtype == "float32" else ops.cast(x, "float32")


def _pair(x, y):
    x, y = _float32(x), _float32(y)
    # Keras hands losses y_true with unknown spatial dims (from tf.data): take them from the other side.
    if len(x.shape) == 4 and len(y.shape) == 4:
        if None in x.shape[1:] and None not in y.shape[1:]:
            x = ops.reshape(x, (-1,) + tuple(y.shape[1:]))
        elif None in y.shape[1:] and None not in x.shape[1:]:
            y = ops.reshape(y, (-1,) + tuple(x.shape[1:]))
    if len(x.shape) != 4 or tuple(x.shape[1:]) != tuple(y.shape[1:]):
        raise InputError(
            f"expected two image batches [B, H, W, C] of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    return x, y


def _ssim_terms(x, y, max_val, win_size, sigma, k1, k2):
    """Per-channel luminance and contrast-structure maps, each ``[B, C, H, W]``."""
    taps = _taps(win_size, sigma)
    h, w, c = x.shape[1], x.shape[2], x.shape[3]
    # Channels (and the five moments) go into the batch axis: one filter call.
    x = ops.reshape(ops.transpose(x, (0, 3, 1, 2)), (-1, h, w))
    y = ops.reshape(ops.transpose(y, (0, 3, 1, 2)), (-1, h, w))
    n = ops.shape(x)[0]
    moments = _filter_stack(ops.concatenate([x, y, x * x, y * y, x * y], axis=0), taps)
    mx, my, mxx, myy, mxy = (moments[i * n : (i + 1) * n] for i in range(5))
    c1 = (k1 * max_val) ** 2
    c2 = (k2 * max_val) ** 2
    # Population (co)variances, as skimage with use_sample_covariance=False.
    vx, vy, vxy = mxx - mx * mx, myy - my * my, mxy - mx * my
    lum = (2.0 * mx * my + c1) / (mx * mx + my * my + c1)
    cs = (2.0 * vxy + c2) / (vx + vy + c2)
    shape = (-1, c, h, w)
    return ops.reshape(lum, shape), ops.reshape(cs, shape)


def ssim_map(x, y, max_val=1.0, win_size=11, sigma=1.5, k1=0.01, k2=0.03):
    """Local SSIM ``[B, H, W]``, Gaussian-weighted, mean over channels, full size (reflect border)."""
    x, y = _pair(x, y)
    lum, cs = _ssim_terms(x, y, max_val, win_size, sigma, k1, k2)
    return ops.mean(lum * cs, axis=1)


def _interior_mean(m, r):
    """Mean over the last two axes, leaving out an ``r``-pixel border when the map is big enough."""
    h, w = m.shape[-2], m.shape[-1]
    if r > 0 and h > 2 * r and w > 2 * r:
        m = m[..., r : h - r, r : w - r]
    return ops.mean(m, axis=(-2, -1))


def ssim(x, y, max_val=1.0, win_size=11, sigma=1.5, k1=0.01, k2=0.03):
    """Mean SSIM per image ``[B]`` (interior of the map; equals skimage ``mssim`` / ``tf.image.ssim``)."""
    return _interior_mean(ssim_map(x, y, max_val, win_size, sigma, k1, k2), win_size // 2)


def _clamped_power(v, p):
    """``max(v, 0) ** p`` with finite gradients.

    Contrast terms can be <= 0; the usual clamp (ReLU, as tf.image) then makes
    ``d/dv v**p`` infinite at 0 and NaN after the chain rule. Terms <= eps give
    0 with a zero gradient; the power only ever sees values > eps.
    """
    ok = v > _MS_SSIM_EPS
    safe = ops.where(ok, v, ops.ones_like(v))
    return ops.where(ok, ops.power(safe, p), ops.zeros_like(v))


def ms_ssim_scales(height: int, width: int, win_size: int = 11) -> int:
    """How many MS-SSIM scales fit: each (halved, rounded up) scale must hold a whole window; at most 5."""
    n, h, w = 1, int(height), int(width)
    while n < len(MS_SSIM_WEIGHTS):
        h, w = (h + 1) // 2, (w + 1) // 2
        if h < win_size or w < win_size:
            break
        n += 1
    return n


def _halve(x):
    """2x2 average pooling; odd sizes are first extended by repeating the last row/column (as tf.image)."""
    h, w = x.shape[1], x.shape[2]
    if h % 2 or w % 2:
        x = ops.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="symmetric")
    return ops.average_pool(x, 2, strides=2, padding="valid", data_format="channels_last")


def ms_ssim(x, y, max_val=1.0, win_size=11, sigma=1.5, k1=0.01, k2=0.03, weights=MS_SSIM_WEIGHTS):
    """Multi-scale SSIM per image ``[B]`` (Wang et al. 2003).

    Per channel: ``prod_s relu(cs_s) ** w_s`` over the finer scales times
    ``relu(ssim_last) ** w_last``, each term the interior mean at its scale,
    then the mean over channels (as ``tf.image.ssim_multiscale``). Images too
    small for ``len(weights)`` scales use :func:`ms_ssim_scales` of them with
    the leading weights renormalised to sum to 1; one scale is plain SSIM.
    """
    x, y = _pair(x, y)
    n = ms_ssim_scales(x.shape[1], x.shape[2], win_size)
    n = min(n, len(weights))
    w = np.asarray(weights[:n], dtype=np.float64)
    w = (w / w.sum()).astype(np.float32)
    r = win_size // 2
    terms = []
    for s in range(n):
        if s > 0:
            x, y = _halve(x), _halve(y)
        lum, cs = _ssim_terms(x, y, max_val, win_size, sigma, k1, k2)
        # Finer scales contribute contrast-structure only; the coarsest the full SSIM.
        term = _interior_mean(cs if s < n - 1 else lum * cs, r)  # [B, C]
        terms.append(_clamped_power(term, float(w[s])))
    per_channel = terms[0]
    for t in terms[1:]:
        per_channel = per_channel * t
    return ops.mean(per_channel, axis=-1)


# -- maps and scores ---------------------------------------------------------


def l2_map(x, y):
    """Squared error ``[B, H, W]``, mean over channels."""
    x, y = _pair(x, y)
    return ops.mean(ops.square(x - y), axis=-1)


RESIDUAL_METHODS = ("ssim", "l2")


def residual_map(x, y, method: str = "ssim", win_size: int = 11, sigma: float = 1.5):
    """Anomaly map ``[B, H, W]`` between images and their reconstructions; higher = more anomalous.

    ``"ssim"``: ``1 - SSIM`` clipped to ``[0, 2]`` (SSIM lies in [-1, 1]; the
    clip only removes float round-off). ``"l2"``: :func:`l2_map`.
    """
    if method == "ssim":
        return ops.clip(1.0 - ssim_map(x, y, win_size=win_size, sigma=sigma), 0.0, 2.0)
    if method == "l2":
        return l2_map(x, y)
    raise InputError(f"unknown residual method '{method}'; choose from {', '.join(RESIDUAL_METHODS)}")


REDUCTIONS = ("max", "mean", "topk")


def image_scores(maps, reduction: str = "max", k_fraction: float = 0.01):
    """One score per image ``[B]`` from maps ``[B, H, W]`` (or ``[B, H, W, 1]``).

    ``"topk"`` is the mean of the ``ceil(k_fraction * H * W)`` highest pixels:
    steadier than the max, more local than the mean. Reductions never cross
    the batch axis.
    """
    maps = _float32(maps)
    if len(maps.shape) == 4 and maps.shape[-1] == 1:
        maps = maps[..., 0]
    if len(maps.shape) != 3:
        raise InputError(f"image_scores expects maps [B, H, W], got shape {tuple(maps.shape)}")
    flat = ops.reshape(maps, (ops.shape(maps)[0], -1))
    if reduction == "max":
        return ops.max(flat, axis=1)
    if reduction == "mean":
        return ops.mean(flat, axis=1)
    if reduction == "topk":
        if not 0.0 < k_fraction <= 1.0:
            raise InputError(f"k_fraction must be in (0, 1], got {k_fraction}")
        k = max(1, math.ceil(k_fraction * maps.shape[1] * maps.shape[2]))
        top, _ = ops.top_k(flat, k, sorted=False)
        return ops.mean(top, axis=1)
    raise InputError(f"unknown score reduction '{reduction}'; choose from {', '.join(REDUCTIONS)}")


# -- Keras losses and metrics ------------------------------------------------
# Each returns one value per sample [B]; Keras then takes the batch mean.


@keras.saving.register_keras_serializable(package="mvtec_keras")
def ssim_metric(y_true, y_pred):
    """Mean SSIM per image (higher is better)."""
    return ssim(y_true, y_pred)


@keras.saving.register_keras_serializable(package="mvtec_keras")
def mssim_metric(y_true, y_pred):
    """MS-SSIM per image (higher is better)."""
    return ms_ssim(y_true, y_pred)


@keras.saving.register_keras_serializable(package="mvtec_keras")
def ssim_loss(y_true, y_pred):
    """``1 - mean SSIM`` per image."""
    return 1.0 - ssim(y_true, y_pred)


@keras.saving.register_keras_serializable(package="mvtec_keras")
def ms_ssim_loss(y_true, y_pred):
    """``1 - MS-SSIM`` per image."""
    return 1.0 - ms_ssim(y_true, y_pred)


@keras.saving.register_keras_serializable(package="mvtec_keras")
def l2_loss(y_true, y_pred):
    """Mean squared error per image."""
    y_true, y_pred = _pair(y_true, y_pred)
    return ops.mean(ops.square(y_true - y_pred), axis=(1, 2, 3))


LOSSES = {"ssim": ssim_loss, "mssim": ms_ssim_loss, "l2": l2_loss}


def get_loss(name: str):
    """The loss function for ``"ssim"``, ``"mssim"`` or ``"l2"``."""
    if name not in LOSSES:
        raise InputError(f"unknown loss '{name}'; choose from {', '.join(LOSSES)}")
    return LOSSES[name]
