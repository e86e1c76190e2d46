"""tf.data pipelines: decode, colour mode, resize / crop, rescale, augment, batch.

Every element is a dict:

- ``image``: float32 ``[H, W, C]`` in **[0, 1]** (C = 1 grayscale, 3 RGB);
- ``mask``: float32 ``[H, W, 1]`` in {0, 1}, all zeros for good images and for
  defect images without a mask file (``has_mask`` is then False);
- ``label`` (int32, 1 = defective), ``defect_type``, ``path`` (strings),
  ``has_mask`` (bool).

Masks are resized with nearest neighbour and cropped exactly like their images
so they stay aligned. Augmentation applies to training (defect-free) images
only, which have no masks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from ..errors import InputError
from .discovery import check_samples

COLOR_MODES = ("grayscale", "rgb")


@dataclass
class Preprocessing:
    """How files become model input; stored in ``info.json`` so later scripts repeat it exactly.

    ``size``: resize target (square). ``crop``: optional centre crop after the resize
    (e.g. 256 -> 224 as in anomalib). Output range is always [0, 1].
    """

    size: int = 256
    color_mode: str = "grayscale"
    crop: Optional[int] = None

    def __post_init__(self):
        if self.color_mode not in COLOR_MODES:
            raise InputError(f"--color: unknown colour mode '{self.color_mode}'; choose grayscale or rgb")
        if int(self.size) < 8:
            raise InputError(f"--size must be at least 8, got {self.size}")
        if self.crop is not None and not 0 < int(self.crop) <= int(self.size):
            raise InputError(f"--crop must be in (0, size], got {self.crop}")

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "grayscale" else 3

    @property
    def output_size(self) -> int:
        return int(self.crop or self.size)

    @property
    def input_shape(self) -> tuple:
        return (self.output_size, self.output_size, self.channels)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(**{k: d[k] for k in ("size", "color_mode", "crop") if k in d})


@dataclass
class Augmentation:
    """Training-time augmentation of defect-free images (small, label-preserving changes)."""

    rotation_deg: float = 5.0
    shift_fraction: float = 0.05
    brightness: float = 0.05
    flip_horizontal: bool = False
    flip_vertical: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _pil_to_unit_float(im) -> np.ndarray:
    """A Pillow image -> float32 [H, W, c] in [0, 1], scaled by its bit depth (8 or 16)."""
    if im.mode.startswith("I;16"):
        arr = np.asarray(im).astype(np.float32) / 65535.0
    else:
        arr = np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im).astype(np.float32) / 255.0
    return arr if arr.ndim == 3 else arr[..., None]


def _decode_any(contents: tf.Tensor, is_tiff: tf.Tensor) -> tf.Tensor:
    """Bytes -> float32 [H, W, c] in [0, 1] with c in 1..4, scaled by bit depth (8- and 16-bit PNG /
    TIFF alike); TIFF goes through Pillow (TF has no TIFF decoder)."""

    def tiff():
        def _pil(raw):
            import io

            from PIL import Image

            with Image.open(io.BytesIO(raw.tobytes())) as im:
                return _pil_to_unit_float(im)

        # As uint8, not as a string: eagerly (load_image) a string reaches numpy as a 0-d object array,
        # whose buffer is not the file's bytes, and Pillow could not identify any TIFF.
        return tf.numpy_function(_pil, [tf.io.decode_raw(contents, tf.uint8)], tf.float32)

    def native():
        # float32 output: decode_image scales uint8 by 1/255 and 16-bit PNG by 1/65535.
        return tf.io.decode_image(contents, channels=0, expand_animations=False, dtype=tf.float32)

    img = tf.cond(is_tiff, tiff, native)
    img.set_shape([None, None, None])
    return img


def _to_channels(img: tf.Tensor, channels: int) -> tf.Tensor:
    """[H, W, c] (c = 1..4, float32 in [0, 1] or an integer dtype) -> float32 [H, W, channels] in [0, 1].

    RGB -> grayscale uses ITU-R BT.601 luminance (tf.image.rgb_to_grayscale);
    grayscale -> RGB repeats the channel; alpha is dropped.
    """
    c = tf.shape(img)[-1]
    img = tf.image.convert_image_dtype(img, tf.float32)
    rgb = tf.cond(c >= 3, lambda: img[..., :3], lambda: tf.tile(img[..., :1], [1, 1, 3]))
    if channels == 3:
        return rgb
    return tf.cond(c >= 3, lambda: tf.image.rgb_to_grayscale(rgb), lambda: img[..., :1])


def _resize_crop(x: tf.Tensor, prep: Preprocessing, method: str) -> tf.Tensor:
    size = int(prep.size)
    x = tf.image.resize(x, [size, size], method=method, antialias=(method == "bilinear"))
    if prep.crop:
        off = (size - int(prep.crop)) // 2
        x = x[off : off + int(prep.crop), off : off + int(prep.crop), :]
    return x


def _load_element(path, mask_path, has_mask, is_tiff, mask_is_tiff, label, defect_type, prep: Preprocessing):
    img = _to_channels(_decode_any(tf.io.read_file(path), is_tiff), prep.channels)
    img = tf.clip_by_value(_resize_crop(img, prep, "bilinear"), 0.0, 1.0)

    def read_mask():
        m = _decode_any(tf.io.read_file(mask_path), mask_is_tiff)[..., :1]
        return tf.cast(m > 0, tf.float32)

    def zero_mask():
        return tf.zeros(tf.concat([tf.shape(img)[:2], [1]], 0), tf.float32)

    # Good images have no mask: zeros at the *original* size would need the
    # original size, so build them after resizing instead.
    mask = tf.cond(has_mask, lambda: _resize_crop(read_mask(), prep, "nearest"), zero_mask)
    out = prep.output_size
    img = tf.ensure_shape(img, [out, out, prep.channels])
    mask = tf.ensure_shape(mask, [out, out, 1])
    return {
        "image": img,
        "mask": mask,
        "label": label,
        "defect_type": defect_type,
        "path": path,
        "has_mask": has_mask,
    }


def _augment_batch(batch, seeds, aug: Augmentation):
    """Random rotation, shift, brightness (and flips) from stateless ops: reproducible for a seed."""
    x = batch["image"]
    n = tf.shape(x)[0]
    h = tf.cast(tf.shape(x)[1], tf.float32)
    w = tf.cast(tf.shape(x)[2], tf.float32)

    def uniform(i, lo, hi):
        return tf.random.stateless_uniform([n], seed=seeds[i], minval=lo, maxval=hi)

    theta = uniform(0, -1.0, 1.0) * (aug.rotation_deg * np.pi / 180.0)
    tx = uniform(1, -1.0, 1.0) * aug.shift_fraction * w
    ty = uniform(2, -1.0, 1.0) * aug.shift_fraction * h
    cos, sin = tf.cos(theta), tf.sin(theta)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    # Output pixel (x, y) samples input R^-1 (p - c) + c - t: rotation about the centre, then a shift.
    zeros = tf.zeros_like(cos)
    transform = tf.stack(
        [cos, sin, cx - cos * cx - sin * cy - tx, -sin, cos, cy + sin * cx - cos * cy - ty, zeros, zeros], axis=1
    )
    x = tf.raw_ops.ImageProjectiveTransformV3(
        images=x, transforms=transform, output_shape=tf.shape(x)[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="REFLECT",
    )
    if aug.flip_horizontal:
        flip = uniform(3, 0.0, 1.0) < 0.5
        x = tf.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
    if aug.flip_vertical:
        flip = uniform(4, 0.0, 1.0) < 0.5
        x = tf.where(flip[:, None, None, None], x[:, ::-1, :, :], x)
    if aug.brightness:
        x = x + uniform(5, -aug.brightness, aug.brightness)[:, None, None, None]
    batch = dict(batch)
    x = tf.clip_by_value(x, 0.0, 1.0)
    x.set_shape(batch["image"].shape)  # the projective transform forgets static H, W
    batch["image"] = x
    return batch


def make_dataset(
    samples: Sequence,
    prep: Preprocessing,
    batch_size: int = 8,
    shuffle: bool = False,
    seed: int = 0,
    augment: Optional[Augmentation] = None,
    cache: bool = False,
    repeat: bool = False,
    drop_remainder: bool = False,
    check: bool = True,
) -> tf.data.Dataset:
    """A batched ``tf.data.Dataset`` of dict elements for ``samples`` (see module doc).

    ``check`` opens every file header first so that a corrupt image or a mask of
    the wrong size is reported by name (as :class:`InputError`) before training.
    Order is deterministic; shuffling is seeded.
    """
    samples = list(samples)
    if not samples:
        raise InputError("empty split: no images to load")
    if int(batch_size) < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    if check:
        check_samples(samples)

    def tiff(p):
        return bool(p) and p.lower().endswith((".tif", ".tiff"))

    columns = (
        [s.path for s in samples],
        [s.mask_path or "" for s in samples],
        [s.mask_path is not None for s in samples],
        [tiff(s.path) for s in samples],
        [tiff(s.mask_path) for s in samples],
        np.asarray([s.label for s in samples], np.int32),
        [s.defect_type for s in samples],
    )
    ds = tf.data.Dataset.from_tensor_slices(columns)
    ds = ds.map(
        lambda *c: _load_element(*c, prep=prep),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if cache:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(len(samples), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)
    if augment is not None:
        # One [6, 2] block of stateless seeds per batch, from a seeded stream that differs per epoch.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(12).map(
            lambda v: tf.reshape(v, [6, 2])
        )
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda b, s: _augment_batch(b, s, augment), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
    return ds.prefetch(tf.data.AUTOTUNE)


def load_arrays(samples, prep: Preprocessing, batch_size: int = 32) -> dict:
    """All of ``samples`` as numpy arrays (images, masks, labels, paths, defect types)."""
    out: dict[str, list] = {}
    for batch in make_dataset(samples, prep, batch_size=batch_size):
        for k, v in batch.items():
            out.setdefault(k, []).append(v.numpy())
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    for k in ("path", "defect_type"):
        arrays[k] = [b.decode() for b in arrays[k].tolist()]
    return arrays


def load_image(path: str, prep: Preprocessing) -> np.ndarray:
    """One file as float32 ``[S, S, C]`` in [0, 1], by the same ops as :func:`make_dataset`."""
    is_tiff = tf.constant(path.lower().endswith((".tif", ".tiff")))
    img = _to_channels(_decode_any(tf.io.read_file(path), is_tiff), prep.channels)
    return tf.clip_by_value(_resize_crop(img, prep, "bilinear"), 0.0, 1.0).numpy()
