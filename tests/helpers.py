"""Small on-disk datasets for tests (written with Pillow into tmp folders)."""

import os

import numpy as np
from PIL import Image


def write_image(path, arr):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def smooth_image(rng, size, channels):
    """A smooth random texture (low-frequency) so autoencoders can learn it quickly."""
    base = rng.uniform(0.3, 0.7, size=(4, 4, channels))
    img = np.kron(base, np.ones((size // 4, size // 4, 1)))
    img = img + rng.normal(0, 0.02, img.shape)
    arr = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return arr[..., 0] if channels == 1 else arr


def make_mvtec(root, size=32, n_train=12, n_good=4, defects=("scratch", "hole"), n_defect=3, channels=3,
               ext=".png", seed=0, missing_mask_for=None):
    """A tiny MVTec-layout category; defects are bright squares with exact masks."""
    rng = np.random.RandomState(seed)
    for i in range(n_train):
        write_image(os.path.join(root, "train", "good", f"{i:03d}{ext}"), smooth_image(rng, size, channels))
    for i in range(n_good):
        write_image(os.path.join(root, "test", "good", f"{i:03d}{ext}"), smooth_image(rng, size, channels))
    for d in defects:
        for i in range(n_defect):
            img = smooth_image(rng, size, channels)
            mask = np.zeros((size, size), np.uint8)
            y, x = rng.randint(size // 4, size // 2, 2)
            s = max(size // 6, 2)
            mask[y : y + s, x : x + s] = 255
            img[mask > 0] = 255
            write_image(os.path.join(root, "test", d, f"{i:03d}{ext}"), img)
            if (d, i) != missing_mask_for:
                write_image(os.path.join(root, "ground_truth", d, f"{i:03d}_mask.png"), mask)
    return root


def toy_images(n, size=28, channels=1, anomalous=False, seed=0):
    """Normals: smooth dark gradients; anomalies: bright uniform noise."""
    rng = np.random.default_rng(seed)
    if anomalous:
        return rng.uniform(0.5, 1.0, (n, size, size, channels)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size] / size
    a, b = rng.uniform(0, 1, (2, n, 1, 1))
    img = 0.2 * (a * xx + (1 - a) * yy) + 0.05 * b
    return np.repeat(img[..., None], channels, axis=-1).astype(np.float32)
