"""Operations on feature and anomaly maps: global pooling, resizing, upsampling then blurring
(the blur itself is :func:`mvtec_keras.residuals.gaussian_blur`, every detector's)."""

from __future__ import annotations

from keras import ops

from ...residuals import gaussian_blur


def pooled(feature):
    """Global average pooling of [B, h, w, c] (a [B, c] input passes through).

    Rows first, then columns: LiteRT's and onnxruntime's MEAN sum sequentially in float32, and one
    mean over all 112 x 112 stem positions drifted enough that exported Mahalanobis scores on bottle
    differed from TF's by 4e-4 relative; over h, then w, they agree within 1e-5."""
    if len(feature.shape) != 4:
        return feature
    return ops.mean(ops.mean(feature, axis=1), axis=1)


def resize(x, size, method="bilinear"):
    """Resize [B, h, w, c] to ``size``; a no-op when already there."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    return ops.image.resize(x, size, interpolation=method, antialias=False)


def upsample_blur(maps, size, sigma: float):
    """[B, h, w] -> [B, H, W]: bilinear upsampling then :func:`mvtec_keras.residuals.gaussian_blur`."""
    x = resize(ops.convert_to_tensor(maps, dtype="float32")[..., None], size, "bilinear")[..., 0]
    return gaussian_blur(x, sigma)
