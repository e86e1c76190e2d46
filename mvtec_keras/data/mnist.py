"""MNIST from its four idx ``.gz`` files (no download path), plus one-class splits."""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from ..errors import InputError

FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
# idx magic: two zero bytes, type 0x08 (uint8), number of dimensions.
_MAGIC = {1: 0x00000801, 3: 0x00000803}


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Read one gzipped idx file of uint8 with ``ndim`` dimensions."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: MNIST file not found")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"{path}: not a readable gzip file ({e})") from None
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise InputError(f"{path}: truncated idx header")
    magic, *dims = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
    if magic != _MAGIC[ndim]:
        raise InputError(f"{path}: bad idx magic number {int(magic):#010x}, expected {_MAGIC[ndim]:#010x}")
    dims = tuple(int(d) for d in dims)
    if len(raw) - header != int(np.prod(dims)):
        raise InputError(f"{path}: idx payload has {len(raw) - header} bytes, header says {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_mnist(root: str = "../shared/data/mnist"):
    """``(x_train uint8 [60000, 28, 28], y_train, x_test uint8 [10000, 28, 28], y_test)``."""
    if not os.path.isdir(root):
        raise InputError(f"{root}: MNIST folder not found")
    out = {k: read_idx(os.path.join(root, name), 3 if k.startswith("x") else 1) for k, name in FILES.items()}
    for split in ("train", "test"):
        if len(out[f"x_{split}"]) != len(out[f"y_{split}"]):
            raise InputError(f"{root}: {split} images and labels differ in count")
    return out["x_train"], out["y_train"], out["x_test"], out["y_test"]


def one_class_split(x_train, y_train, x_test, y_test, normal_digits, anomaly_digits=None, image_size=28):
    """Split for one-class benchmarks, images as float32 [N, S, S, 1] in [0, 1].

    ``image_size`` S > 28 zero-pads the digits to S x S around the centre (the
    official GANomaly feeds MNIST at 32 x 32); the strokes keep their scale.

    Training keeps the ``normal_digits`` only; the test set keeps normal and
    anomalous digits (``anomaly_digits=None``: every other digit). Returns
    ``(train normals, test images, test labels with 1 = anomaly)``.
    """
    normal_digits = np.atleast_1d(np.asarray(normal_digits))
    if anomaly_digits is None:
        anomaly_digits = np.setdiff1d(np.arange(10), normal_digits)
    anomaly_digits = np.atleast_1d(np.asarray(anomaly_digits))
    size = int(image_size)
    if size < x_train.shape[1] or (size - x_train.shape[1]) % 2:
        raise InputError(f"image_size={image_size}: MNIST digits are {x_train.shape[1]} px; choose 28 + an even "
                         "number of pixels")
    if np.intersect1d(normal_digits, anomaly_digits).size:
        raise InputError(f"digits {normal_digits.tolist()} cannot be both normal and anomalous")
    keep = np.isin(y_test, normal_digits) | np.isin(y_test, anomaly_digits)
    labels = np.isin(y_test[keep], anomaly_digits).astype(np.int32)
    pad = (size - x_train.shape[1]) // 2
    return _float(x_train[np.isin(y_train, normal_digits)], pad), _float(x_test[keep], pad), labels


def _float(x, pad=0):
    x = (x.astype(np.float32) / 255.0)[..., None]
    return np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else x


STAGE_MANIFEST = "mnist_staging.json"


def stage_one_class(normal_digit: int, out: str, root: str = "../shared/data/mnist", log=print) -> dict:
    """Write the one-class protocol for ``normal_digit`` in the MVTec layout under ``out`` (atomically).

    ``train/good``: the digit's training images; ``test/good``: its test images;
    ``test/digit_K``: the test images of each other digit K (the anomalies, one
    "defect type" per digit). 28 x 28 grey PNGs named by their index in the idx
    file. A second call for the same digit finds the manifest and does nothing.
    Returns the counts per folder.
    """
    import json

    from PIL import Image

    from ..fileio import staged_dir

    if int(normal_digit) != normal_digit or not 0 <= normal_digit <= 9:
        raise InputError(f"--normal: a digit 0-9, got {normal_digit}")
    normal_digit = int(normal_digit)
    x_train, y_train, x_test, y_test = load_mnist(root)
    plan = {"train/good": (x_train, np.flatnonzero(y_train == normal_digit)),
            "test/good": (x_test, np.flatnonzero(y_test == normal_digit))}
    for k in range(10):
        if k != normal_digit and (y_test == k).any():
            plan[f"test/digit_{k}"] = (x_test, np.flatnonzero(y_test == k))
    counts = {k: int(len(idx)) for k, (_, idx) in plan.items()}
    want = {"dataset": "mnist", "protocol": "one-class", "normal_digit": normal_digit,
            "root": os.path.abspath(root), "counts": counts}
    manifest = os.path.join(out, STAGE_MANIFEST)
    if os.path.isfile(manifest):
        with open(manifest) as f:
            have = json.load(f)
        if have == want:
            log(f"{out}: already staged (normal digit {normal_digit}); nothing to do")
            return counts
        raise InputError(f"--out {out}: holds another staging (normal digit {have.get('normal_digit')}); "
                         "choose another folder or remove it")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise InputError(f"--out {out}: exists and is not an empty folder")
    with staged_dir(out) as tmp:
        for folder, (images, idx) in plan.items():
            dst = os.path.join(tmp, folder)
            os.makedirs(dst)
            for i in idx:
                Image.fromarray(images[i]).save(os.path.join(dst, f"{int(i):05d}.png"))
        with open(os.path.join(tmp, STAGE_MANIFEST), "w") as f:
            json.dump(want, f, indent=2)
    log(f"staged {out} (normal digit {normal_digit}): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


def main(argv=None) -> int:
    import argparse
    import sys

    from ..errors import EXIT_BAD_INPUT

    p = argparse.ArgumentParser(prog="python -m mvtec_keras.data.mnist",
                                description="Stage an MNIST one-class split (one digit normal) in the MVTec layout.")
    p.add_argument("--normal", type=int, required=True, help="the normal digit, 0-9")
    p.add_argument("--out", required=True, help="category folder to write (train/good, test/good, test/digit_K)")
    p.add_argument("--root", default="../shared/data/mnist", help="folder of the four idx .gz files")
    args = p.parse_args(argv)
    try:
        stage_one_class(args.normal, args.out, args.root)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
