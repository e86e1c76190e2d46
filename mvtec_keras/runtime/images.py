"""Read an image file and bring it to a model's input the way training did, in numpy.

Training (:mod:`mvtec_keras.data.pipeline`) decodes to uint8, rescales with
``x * (1/255)`` in float32, converts colour (BT.601 luma via
``tf.image.rgb_to_grayscale`` weights; grey repeated to RGB; alpha dropped),
resizes with ``tf.image.resize(..., "bilinear", antialias=True)`` (TF's
ScaleAndTranslate with a triangle kernel), centre-crops and clips to [0, 1].
:func:`to_model_input` repeats those steps; tests check that both agree.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import InputError

#: PIL modes accepted (as training's file check): 8-bit grey or colour, optional alpha / palette, 16-bit grey
ACCEPTED_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "I;16", "I;16B", "I;16L", "I;16N"}
_GRAY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140], np.float32)  # tf.image.rgb_to_grayscale


def read_image(path: str) -> np.ndarray:
    """Decode ``path`` to ``[H, W, c]`` (c = 1..4), uint8, or uint16 for 16-bit grey; bad files raise
    one-line InputErrors."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise InputError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in ACCEPTED_MODES:
                raise InputError(f"unsupported pixel format '{mode}' (8-bit grey or RGB, or 16-bit grey "
                                 f"expected): {path}")
            if mode in ("1", "P", "PA"):
                # as TF's decoders: bilevel -> grey, palette -> its colours (with alpha if any)
                im = im.convert("L" if mode == "1" else ("RGBA" if mode == "PA" or "transparency" in im.info
                                                         else "RGB"))
            arr = np.asarray(im).astype(np.uint16) if mode.startswith("I;16") else np.asarray(im, dtype=np.uint8)
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"unreadable or corrupt image: {path} ({' '.join(str(e).split())})") from None
    return arr[..., None] if arr.ndim == 2 else arr


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """uint8 / uint16 ``[H, W, c]`` -> float32 ``[H, W, channels]`` in [0, 1], as training's ``_to_channels``
    (scaled by bit depth, as its decoder)."""
    x = img.astype(np.float32) * np.float32(1.0 / (65535.0 if img.dtype == np.uint16 else 255.0))
    c = x.shape[-1]
    rgb = x[..., :3] if c >= 3 else np.repeat(x[..., :1], 3, axis=-1)
    if channels == 3:
        return rgb
    if c >= 3:
        return np.tensordot(rgb, _GRAY_WEIGHTS, axes=([-1], [0]))[..., None].astype(np.float32)
    return x[..., :1]


def _triangle_weights(in_size: int, out_size: int) -> np.ndarray:
    """``[out, in]`` weights of TF's ScaleAndTranslate, triangle kernel, antialias on."""
    scale = np.float32(out_size) / np.float32(in_size)
    inv = np.float32(1.0) / scale
    kscale = max(inv, np.float32(1.0))
    w = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        sample = (np.float32(i) + np.float32(0.5)) * inv
        start = int(np.ceil(sample - kscale - np.float32(0.5)))
        end = int(np.floor(sample + kscale - np.float32(0.5)))
        start, end = min(max(start, 0), in_size - 1), min(max(end, 0), in_size - 1) + 1
        src = np.arange(start, end, dtype=np.float32)
        k = np.maximum(np.float32(0.0), np.float32(1.0) - np.abs((src + np.float32(0.5) - sample) / kscale))
        total = k.sum(dtype=np.float32)
        w[i, start:end] = k / total if abs(total) >= 1000.0 * np.finfo(np.float32).tiny else k
    return w


def resize_bilinear_antialias(x: np.ndarray, size: int) -> np.ndarray:
    """float32 ``[H, W, C]`` -> ``[size, size, C]`` as ``tf.image.resize(bilinear, antialias=True)``."""
    h, w = x.shape[:2]
    if (h, w) == (size, size):
        return x  # the triangle kernel at scale 1 is the identity
    rows, cols = _triangle_weights(h, size), _triangle_weights(w, size)
    y = np.einsum("oh,hwc->owc", rows, x, dtype=np.float32)
    return np.einsum("pw,owc->opc", cols, y, dtype=np.float32)


def to_model_input(img: np.ndarray, preprocessing: dict) -> np.ndarray:
    """Decoded uint8 image -> float32 ``[S, S, C]`` in [0, 1], exactly the training preprocessing."""
    channels = 1 if preprocessing.get("color_mode", "grayscale") == "grayscale" else 3
    size, crop = int(preprocessing["size"]), preprocessing.get("crop")
    x = resize_bilinear_antialias(to_channels(img, channels), size)
    if crop:
        off = (size - int(crop)) // 2
        x = x[off : off + int(crop), off : off + int(crop)]
    return np.clip(x, 0.0, 1.0)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Model input in [0, 1] -> the uint8 an exported graph takes (exact for images already at input size)."""
    return np.clip(np.floor(x * 255.0 + 0.5), 0, 255).astype(np.uint8)


def _images_under(folder: str, extensions) -> list:
    """Image files anywhere under ``folder``, sorted folder by folder (a camera's day of subfolders)."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, f) for f in sorted(files) if f.lower().endswith(extensions))
    return found


def list_images(items) -> list:
    """Files, folders (their image files, searched recursively, sorted) and globs (``**`` recurses; a folder
    they match is searched too) -> image paths, in order, no duplicates. Paths keep their folders, so
    same-named files of different subfolders stay apart."""
    import glob

    from ..data.discovery import IMAGE_EXTENSIONS

    out = []
    for item in items:
        if os.path.isdir(item):
            found = _images_under(item, IMAGE_EXTENSIONS)
        elif os.path.exists(item):
            found = [item]
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise InputError(f"IMAGES: no such file, folder or matching glob: {item}")
            found = [f for m in matches for f in (_images_under(m, IMAGE_EXTENSIONS) if os.path.isdir(m) else [m])]
        out.extend(found)
    seen = set()
    return [p for p in out if not (p in seen or seen.add(p))]
