"""The embedded demo category: an MVTec-layout texture built from a photo bundled with scikit-image.

Normal images are random crops of ``skimage.data.brick()`` (a 512x512 photo
shipped inside the package, so no download) with flips and a small brightness
jitter, tinted to RGB. Test images carry one synthetic defect each: a dark
branching ``crack``, a dark chipped ``hole``, a light ``scratch`` or a tinted
``stain``. The ground-truth mask is exact: a pixel is in the mask iff the
defect changed one of its 8-bit channels by at least :data:`MASK_THRESHOLD`
levels; smaller changes are undone, so outside the mask the defect image is
byte-identical to its clean version.

Every image comes from its own random stream, keyed by (seed, split, defect
type, index), so a build is byte-reproducible and :func:`demo_sample` can
regenerate any file together with its clean version.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Optional

import numpy as np

from ..errors import InputError

DEMO_VERSION = 1
MANIFEST = "demo.json"
TEXTURE = "brick"
DEFECT_TYPES = ("crack", "hole", "scratch", "stain")
#: minimum change (8-bit levels, any channel) for a pixel to count as defective
MASK_THRESHOLD = 16
#: side of the square crop taken from the 512x512 photo, before resizing to ``size``
_CROP = 256
# Warm tint so the grey photo reads as brick; the stains then differ in hue too.
_TINT = np.array([1.0, 0.86, 0.74], dtype=np.float32)
_SPLITS = {"train": 0, "test": 1}
_KIND_ID = {"good": 0, **{k: i + 1 for i, k in enumerate(DEFECT_TYPES)}}
_MIN_SIZE, _MAX_SIZE = 32, 1024

_photo_cache: Optional[np.ndarray] = None


def default_demo_root(seed: int = 0, size: int = 256) -> pathlib.Path:
    """``$MVTEC_KERAS_CACHE/demo-v1-seed{seed}-{size}`` (cache defaults to ``~/.cache/mvtec_keras``)."""
    cache = os.environ.get("MVTEC_KERAS_CACHE") or os.path.join("~", ".cache", "mvtec_keras")
    return pathlib.Path(os.path.expanduser(cache)) / f"demo-v{DEMO_VERSION}-seed{seed}-{size}"


def build_demo(
    root=None,
    seed: int = 0,
    size: int = 256,
    n_train: int = 200,
    n_test_good: int = 40,
    n_per_defect: int = 20,
    force: bool = False,
) -> pathlib.Path:
    """Build the demo category (or reuse a matching cached build) and return its folder."""
    seed, size = _check_int("seed", seed, 0), _check_int("size", size, _MIN_SIZE, _MAX_SIZE)
    n_train = _check_int("n_train", n_train, 1)
    n_test_good = _check_int("n_test_good", n_test_good, 0)
    n_per_defect = _check_int("n_per_defect", n_per_defect, 0)
    root = pathlib.Path(root).expanduser() if root is not None else default_demo_root(seed, size)
    root = root.absolute()
    expected = _manifest(seed, size, n_train, n_test_good, n_per_defect)

    if root.exists():
        found = _read_manifest(root)
        if found is None and (not root.is_dir() or any(root.iterdir())):
            # Never delete a folder we did not build.
            raise InputError(f"{root}: exists and is not a demo build (no {MANIFEST}); pass a new or empty folder")
        if found == expected and not force:
            return root

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".tmp-{root.name}-", dir=root.parent))
    try:
        _write_category(tmp, seed, size, n_train, n_test_good, n_per_defect)
        # The manifest goes in last: a folder holding one is complete.
        (tmp / MANIFEST).write_text(json.dumps(expected, indent=2) + "\n")
        _swap_into_place(tmp, root, expected)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def describe_demo(root) -> str:
    """Short summary of a demo (or any MVTec-layout) category: counts, image size, mask coverage."""
    root = pathlib.Path(root).expanduser()
    if not (root / "train" / "good").is_dir():
        raise InputError(f"{root}: not an MVTec-layout category (no train/good folder)")
    manifest = _read_manifest(root) or {}
    train = sorted((root / "train" / "good").glob("*.png"))
    test_dir = root / "test"
    test_types = sorted(p.name for p in test_dir.iterdir() if p.is_dir()) if test_dir.is_dir() else []
    test_types.sort(key=lambda t: t != "good")

    from PIL import Image

    first = train[0] if train else None
    head = f"category at {root}"
    if manifest:
        head = f"demo category '{manifest['texture']}' (seed {manifest['seed']}) at {root}"
    lines = [head]
    if first is not None:
        with Image.open(first) as im:
            lines.append(f"  images: {im.width}x{im.height} {im.mode} png")
    lines.append(f"  {'train/good':<14}{len(train):>5} images")
    n_test = n_bad = 0
    for t in test_types:
        files = sorted((test_dir / t).glob("*.png"))
        n_test += len(files)
        line = f"  {'test/' + t:<14}{len(files):>5} images"
        if t != "good":
            n_bad += len(files)
            cov = [_mask_coverage(root / "ground_truth" / t / f"{f.stem}_mask.png") for f in files]
            cov = np.array([c for c in cov if c is not None])
            if cov.size:
                line += f"   mask coverage {100 * cov.min():.2f}-{100 * cov.max():.2f}% (mean {100 * cov.mean():.2f}%)"
            if cov.size < len(files):
                line += f"   {len(files) - cov.size} without mask"
        lines.append(line)
    lines.append(f"  total: {len(train)} train, {n_test} test ({n_bad} defective)")
    return "\n".join(lines)


def demo_sample(seed: int, split: str, index: int, defect_type: str = "good", size: int = 256):
    """Regenerate one demo image: ``(clean, image, mask)`` as uint8 ``[H,W,3], [H,W,3], [H,W]``.

    ``mask`` is 0/255; for good images ``image`` equals ``clean`` and the mask is empty.
    """
    if split not in _SPLITS:
        raise InputError(f"split '{split}': choose from {', '.join(_SPLITS)}")
    if defect_type not in _KIND_ID or (split == "train" and defect_type != "good"):
        raise InputError(f"defect_type '{defect_type}': choose from good, {', '.join(DEFECT_TYPES)}")
    rng = np.random.default_rng([int(seed), _SPLITS[split], _KIND_ID[defect_type], int(index)])
    clean = _normal_image(rng, size)
    if defect_type == "good":
        return clean, clean.copy(), np.zeros(clean.shape[:2], np.uint8)
    image, mask = _apply_defect(clean, defect_type, rng)
    return clean, image, mask


# -- building -----------------------------------------------------------------
def _write_category(dst: pathlib.Path, seed, size, n_train, n_test_good, n_per_defect) -> None:
    from PIL import Image

    def save(arr, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path, format="PNG")

    jobs = [("train", "good", n_train), ("test", "good", n_test_good)]
    jobs += [("test", t, n_per_defect) for t in DEFECT_TYPES]
    for split, kind, n in jobs:
        width = max(3, len(str(n - 1)))
        (dst / split / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _, image, mask = demo_sample(seed, split, i, kind, size)
            name = f"{i:0{width}d}"
            save(image, dst / split / kind / f"{name}.png")
            if kind != "good":
                save(mask, dst / "ground_truth" / kind / f"{name}_mask.png")


def _swap_into_place(tmp: pathlib.Path, root: pathlib.Path, expected: dict) -> None:
    """Rename the finished build onto ``root``; an older build there is moved aside first."""
    old = None
    if root.exists():
        old = pathlib.Path(tempfile.mkdtemp(prefix=f".old-{root.name}-", dir=root.parent))
        os.replace(root, old / "build")
    try:
        os.rename(tmp, root)
    except OSError:
        # Another process finished the same build first: keep theirs if it matches.
        if _read_manifest(root) != expected:
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _manifest(seed, size, n_train, n_test_good, n_per_defect) -> dict:
    counts = {"train/good": n_train, "test/good": n_test_good}
    counts.update({f"test/{t}": n_per_defect for t in DEFECT_TYPES})
    return {
        "format": "mvtec_keras-demo",
        "version": DEMO_VERSION,
        "texture": TEXTURE,
        "seed": seed,
        "size": size,
        "channels": 3,
        "counts": counts,
        "defect_types": list(DEFECT_TYPES),
        "mask_threshold": MASK_THRESHOLD,
    }


def _read_manifest(root: pathlib.Path) -> Optional[dict]:
    try:
        with open(root / MANIFEST) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == "mvtec_keras-demo" else None


def _mask_coverage(path: pathlib.Path) -> Optional[float]:
    from PIL import Image

    if not path.is_file():
        return None
    with Image.open(path) as im:
        return float(np.mean(np.asarray(im.convert("L")) > 127))


def _check_int(name, value, lo, hi=None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo or (hi and value > hi):
        bounds = f"an integer >= {lo}" + (f" and <= {hi}" if hi else "")
        raise InputError(f"{name}={value!r}: must be {bounds}")
    return int(value)


# -- normal images --------------------------------------------------------------
def _photo() -> np.ndarray:
    global _photo_cache
    if _photo_cache is None:
        from skimage import data

        _photo_cache = data.brick().astype(np.float32) / 255.0
    return _photo_cache


def _normal_image(rng: np.random.Generator, size: int) -> np.ndarray:
    photo = _photo()
    y, x = rng.integers(0, photo.shape[0] - _CROP + 1), rng.integers(0, photo.shape[1] - _CROP + 1)
    crop = photo[y : y + _CROP, x : x + _CROP]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1, :]
    gain = rng.uniform(0.94, 1.06)
    if size != _CROP:
        from skimage.transform import resize

        crop = resize(crop, (size, size), order=1, anti_aliasing=size < _CROP, preserve_range=True)
    rgb = np.clip(crop[..., None] * (gain * _TINT), 0.0, 1.0)
    return np.round(rgb * 255.0).astype(np.uint8)


# -- defects --------------------------------------------------------------------
def _apply_defect(clean: np.ndarray, kind: str, rng: np.random.Generator):
    """Draw one defect on ``clean``; return the uint8 image and its exact 0/255 mask."""
    h, w = clean.shape[:2]
    base = clean.astype(np.float32) / 255.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    s = h / 256.0  # defect geometry is specified at 256 px
    min_area = max(6, int(2e-4 * h * w))
    draw = {"crack": _crack, "hole": _hole, "scratch": _scratch, "stain": _stain}[kind]
    # A defect clipped by the border or drawn on bright mortar can vanish; redraw (deterministically).
    for _ in range(20):
        out = draw(base, yy, xx, s, rng)
        out = np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)
        change = np.abs(out.astype(np.int16) - clean.astype(np.int16)).max(axis=-1)
        mask = change >= MASK_THRESHOLD
        if mask.sum() >= min_area:
            image = np.where(mask[..., None], out, clean)
            return image, mask.astype(np.uint8) * 255
    raise RuntimeError(f"could not draw a visible '{kind}' defect")  # pragma: no cover


def _centre(rng, h, w, margin=0.15):
    return rng.uniform(margin, 1 - margin) * h, rng.uniform(margin, 1 - margin) * w


def _polyline_distance(points: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Distance from every pixel centre to a polyline ``points [K, 2]`` (y, x), all segments at once."""
    a, b = points[:-1], points[1:]
    ab = b - a
    p = np.stack([yy.ravel(), xx.ravel()], axis=1)[:, None, :]  # [N, 1, 2]
    t = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-6), 0.0, 1.0)  # [N, S]
    d = np.linalg.norm(p - (a + t[..., None] * ab), axis=-1).min(axis=1)
    return d.reshape(yy.shape)


def _stroke_alpha(points, width, yy, xx):
    """Anti-aliased coverage of a stroke of the given width; only its bounding box is evaluated."""
    alpha = np.zeros(yy.shape, np.float32)
    pad = width / 2 + 1.5
    y0, x0 = np.maximum(np.floor(points.min(axis=0) - pad).astype(int), 0)
    y1, x1 = np.ceil(points.max(axis=0) + pad).astype(int) + 1
    box = (slice(y0, y1), slice(x0, x1))
    if yy[box].size:
        alpha[box] = np.clip(width / 2 + 0.5 - _polyline_distance(points, yy[box], xx[box]), 0.0, 1.0)
    return alpha


def _blob_distance(yy, xx, cy, cx, radius, roughness, rng, harmonics=(2, 3, 4, 5)):
    """Approximate signed distance to an irregular star-shaped blob (negative inside)."""
    theta = np.arctan2(yy - cy, xx - cx)
    r = np.full_like(theta, radius)
    for k in harmonics:
        # Higher harmonics get smaller amplitudes so outlines stay lumpy rather than star-like.
        r += radius * rng.uniform(0, roughness) * (2.0 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(yy - cy, xx - cx) - r


def _scratch(base, yy, xx, s, rng):
    """A thin light curve: the surface scraped to lighter material."""
    h, w = base.shape[:2]
    p0 = np.array(_centre(rng, h, w))
    length = rng.uniform(60, 150) * s
    ang = rng.uniform(0, np.pi)
    p2 = p0 + length * np.array([np.sin(ang), np.cos(ang)])
    p1 = (p0 + p2) / 2 + rng.normal(0, 0.2 * length, size=2)  # bend
    t = np.linspace(0, 1, 24)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    alpha = _stroke_alpha(curve, max(1.0, rng.uniform(1.3, 2.4) * s), yy, xx)
    alpha = alpha * rng.uniform(0.7, 0.9)
    light = np.float32(rng.uniform(0.88, 0.97))
    return base + alpha[..., None] * (light - base)


def _crack(base, yy, xx, s, rng):
    """A dark jagged random-walk line with one branch."""
    h, w = base.shape[:2]

    def walk(start, heading, steps, step_len):
        turns = heading + np.cumsum(rng.uniform(-0.55, 0.55, steps))
        moves = step_len * np.stack([np.sin(turns), np.cos(turns)], axis=1)
        return np.concatenate([start[None], start + np.cumsum(moves, axis=0)])

    heading = rng.uniform(0, 2 * np.pi)
    main = walk(np.array(_centre(rng, h, w)), heading, int(rng.integers(10, 20)), 6.0 * s)
    fork = main[int(rng.integers(2, len(main) - 2))]
    branch = walk(fork, heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1), int(rng.integers(4, 9)), 5.0 * s)
    alpha = np.maximum(
        _stroke_alpha(main, max(1.0, rng.uniform(1.6, 2.8) * s), yy, xx),
        _stroke_alpha(branch, max(1.0, rng.uniform(1.0, 1.8) * s), yy, xx),
    )
    return base * (1 - rng.uniform(0.7, 0.85) * alpha[..., None])


def _hole(base, yy, xx, s, rng):
    """A dark chipped pit, lit from one side, with a light rim."""
    h, w = base.shape[:2]
    cy, cx = _centre(rng, h, w)
    radius = max(3.0, rng.uniform(7, 16) * s)
    d = _blob_distance(yy, xx, cy, cx, radius, 0.1, rng)
    inside = np.clip(0.5 - d, 0.0, 1.0)
    # Inner wall shading: darker on the side away from the light.
    light_dir = rng.uniform(0, 2 * np.pi)
    shade = ((yy - cy) * np.sin(light_dir) + (xx - cx) * np.cos(light_dir)) / radius
    pit = np.clip(0.08 + 0.07 * shade, 0.02, 0.2)[..., None]
    rim_w = max(1.0, 1.5 * s)
    rim = np.clip(1 - np.abs(d - rim_w / 2) / rim_w, 0.0, 1.0)[..., None] * 0.25
    out = base + rim * (1 - base)
    return out + inside[..., None] * (pit - out)


def _stain(base, yy, xx, s, rng):
    """A soft-edged translucent blot (oil or rust) that darkens and tints the texture beneath."""
    h, w = base.shape[:2]
    cy, cx = _centre(rng, h, w)
    radius = max(4.0, rng.uniform(14, 30) * s)
    d = _blob_distance(yy, xx, cy, cx, radius, 0.25, rng)
    soft = max(1.0, 4.0 * s)
    alpha = np.clip(0.5 - d / soft, 0.0, 1.0)[..., None] * rng.uniform(0.6, 0.85)
    oil, rust = np.array([0.35, 0.33, 0.3], np.float32), np.array([0.8, 0.45, 0.22], np.float32)
    tint = oil if rng.random() < 0.5 else rust
    return base * (1 - alpha + alpha * tint)


def main(argv=None) -> int:
    """``python -m mvtec_keras.data.demo``: build (or reuse) the demo and print its summary."""
    import argparse
    import sys
    import time

    from ..errors import EXIT_BAD_INPUT

    ap = argparse.ArgumentParser(prog="python -m mvtec_keras.data.demo", description=main.__doc__)
    ap.add_argument("--root", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-test-good", type=int, default=40)
    ap.add_argument("--n-per-defect", type=int, default=20)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    try:
        t0 = time.perf_counter()
        root = build_demo(args.root, args.seed, args.size, args.n_train, args.n_test_good, args.n_per_defect, args.force)
        print(describe_demo(root))
        print(f"  ready in {time.perf_counter() - t0:.1f} s")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
