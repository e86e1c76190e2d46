"""Benchmark: throughput under the Keras JAX backend, for a GPU machine without TensorFlow.

Measures (steady state, after a compile / warm-up pass):

- mvtecCAE training img/s: ``model.fit`` with the SSIM loss, grayscale, ``--size`` px (default 256);
- EfficientNet-B4 feature extraction img/s (PaDiM's taps, levels 3, 4, 6) and PaDiM scoring img/s
  (extraction + Mahalanobis map + upsampling + blur + max) at ``--feature-size`` px (default 380).

Needs JAX, Keras 3, NumPy (and Pillow for ``--images``); never imports TensorFlow and downloads
nothing: backbone weights are random (speed does not depend on them). Images are read from a folder
with Pillow (``--images DIR``), or generated: the demo category's brick texture when scikit-image
is installed, else smooth random textures. It prints the device, sizes and img/s.

    python bench/gpu_jax.py                          # the GPU measurement
    python bench/gpu_jax.py --size 64 --feature-size 64 --steps 2 --batch 2   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if os.environ.setdefault("KERAS_BACKEND", "jax") != "jax":
    sys.exit(f"bench/gpu_jax.py measures the JAX backend; unset KERAS_BACKEND (it is {os.environ['KERAS_BACKEND']!r})")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def images_from_folder(folder, n, size, channels):
    """Up to ``n`` images of ``folder`` (recursively), resized, float32 in [0, 1]; repeated to ``n``."""
    import numpy as np
    from PIL import Image

    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise SystemExit(f"--images: no image files under {folder}")
    out = []
    for p in paths[:n]:
        with Image.open(p) as im:
            im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
            a = np.asarray(im, np.float32) / 255.0
        out.append(a[..., None] if channels == 1 else a)
    x = np.stack(out)
    return np.resize(x, (n,) + x.shape[1:])  # cycles the images when the folder has fewer


def synthetic_images(n, size, channels, seed=0):
    """The demo category's normal images (scikit-image's brick photo) or, without scikit-image,
    smooth random textures. Returns float32 ``[n, size, size, channels]`` in [0, 1]."""
    import numpy as np

    try:
        from mvtec_keras.data.demo import demo_sample

        x = np.stack([demo_sample(seed, "train", i, size=size)[1] for i in range(min(n, 16))]).astype(np.float32) / 255
        source = "demo brick texture"
    except ImportError:
        rng = np.random.default_rng(seed)
        base = rng.uniform(0.2, 0.8, (min(n, 16), 8, 8, 3))
        x = np.kron(base, np.ones((1, -(-size // 8), -(-size // 8), 1)))[:, :size, :size]
        x = np.clip(x + rng.normal(0, 0.03, x.shape), 0, 1).astype(np.float32)
        source = "smooth random textures"
    if channels == 1:
        x = x.mean(axis=-1, keepdims=True)
    return np.resize(x, (n,) + x.shape[1:]), source


def get_images(args, n, size, channels):
    if args.images:
        return images_from_folder(args.images, n, size, channels), f"files under {args.images}"
    return synthetic_images(n, size, channels)


def feature_throughput(backbone, size, images, batch, steps, n_fit):
    """(extraction img/s, PaDiM scoring img/s) with random backbone weights."""
    import numpy as np

    from mvtec_keras.detectors.padim import PadimDetector

    det = PadimDetector(backbone=backbone, weights=None, input_size=size)
    det.fit(images[:n_fit], batch_size=batch)
    levels = det._needed_levels()
    batches = [images[i : i + batch] for i in range(0, batch * steps, batch)]

    def timed(fn):
        fn(batches[0])  # compile for this batch shape
        t = time.perf_counter()
        for b in batches:
            fn(b)
        return len(batches) * batch / (time.perf_counter() - t)

    # np.asarray waits for the device: the clock stops when the results exist.
    extract = timed(lambda b: [np.asarray(f) for f in det._features(b, levels)])
    score = timed(lambda b: [np.asarray(v) for v in det.score_batch(b)])
    return extract, score, det


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=256, help="mvtecCAE image side (multiple of 32)")
    p.add_argument("--feature-size", type=int, default=380, help="EfficientNet-B4 input side")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed batches per measurement")
    p.add_argument("--fit-images", type=int, default=32, help="images PaDiM is fitted on before scoring is timed")
    p.add_argument("--images", help="folder of images read with Pillow (default: generated images)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-features", action="store_true")
    args = p.parse_args(argv)
    for flag in ("size", "feature_size", "batch", "steps", "fit_images"):
        if getattr(args, flag) < (32 if "size" in flag else 1):
            p.error(f"--{flag.replace('_', '-')} too small: {getattr(args, flag)}")

    import jax
    import keras

    from bench.autoencoders import train_throughput

    print(f"backend: keras {keras.__version__} on {keras.backend.backend()}, jax {jax.__version__}")
    print(f"devices: {', '.join(f'{d.platform}:{d.id} {d.device_kind}' for d in jax.devices())}")
    print("tensorflow imported:", "tensorflow" in sys.modules)
    if not args.skip_train:
        n = args.batch * args.steps
        x, source = get_images(args, n, args.size, 1)
        t0 = time.perf_counter()
        rate = train_throughput("mvtecCAE", "ssim", "grayscale", args.size, args.batch, args.steps, True, x)
        print(f"mvtecCAE training (SSIM loss, grayscale {args.size} px, batch {args.batch}, {args.steps} timed steps, "
              f"{source}): {rate:.1f} img/s  [{time.perf_counter() - t0:.0f} s with compile]")
    if not args.skip_features:
        n = max(args.batch * args.steps, args.fit_images)
        x, source = get_images(args, n, args.feature_size, 3)
        t0 = time.perf_counter()
        extract, score, det = feature_throughput("efficientnet-b4", args.feature_size, x, args.batch, args.steps,
                                                 args.fit_images)
        h, w = (int(v) for v in det.feature_shape_)
        print(f"EfficientNet-B4 (random weights) at {args.feature_size} px, batch {args.batch}, {source}:")
        print(f"  feature extraction (levels {', '.join(map(str, det.levels))}): {extract:.1f} img/s")
        print(f"  PaDiM scoring ({h}x{w} positions, d={det.mean_.shape[1]}, fitted on {args.fit_images} images): "
              f"{score:.1f} img/s  [{time.perf_counter() - t0:.0f} s with fit and compile]")
    print("tensorflow imported:", "tensorflow" in sys.modules)
    return 0


if __name__ == "__main__":
    sys.exit(main())
