"""Find images on disk: the MVTec AD folder layout and a plain folder mode.

MVTec layout::

    <category>/train/good/*.png
    <category>/test/good/*.png
    <category>/test/<defect_type>/*.png
    <category>/ground_truth/<defect_type>/<stem>_mask.png

Folder mode (custom data): a folder of normal images, optionally a folder of
abnormal images and optionally a folder of masks (``<stem>_mask.*`` or
``<stem>.*``). Without abnormal images everything is training data.

Discovery only lists files; :func:`check_samples` opens headers to catch
corrupt files, unsupported pixel formats and masks of the wrong size before
any pipeline runs, so the error names the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"
# PIL modes we accept: 8-bit grey or colour, optionally with alpha or a palette; 16-bit grey
# ("I;16*"; Pillow may open a 16-bit grey PNG as "I", so that is accepted for PNG only).
_ACCEPTED_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "I;16", "I;16L", "I;16B", "I;16N"}


@dataclass(frozen=True)
class Sample:
    """One image and what is known about it."""

    path: str
    label: int = 0  # 1 = defective
    defect_type: str = GOOD
    mask_path: Optional[str] = None


@dataclass
class Category:
    """The images of one product category, split into train (normal) and test."""

    root: str
    name: str
    mode: str  # "mvtec" or "folder"
    train: list = field(default_factory=list)
    test: list = field(default_factory=list)

    @property
    def defect_types(self) -> list:
        return sorted({s.defect_type for s in self.test if s.label == 1})

    @property
    def defects_without_mask(self) -> list:
        return [s for s in self.test if s.label == 1 and s.mask_path is None]

    def summary(self) -> str:
        lines = [f"category '{self.name}' ({self.mode} layout) at {self.root}"]
        lines.append(f"  train/good: {len(self.train)} images")
        counts: dict[str, int] = {}
        for s in self.test:
            counts[s.defect_type] = counts.get(s.defect_type, 0) + 1
        for t in sorted(counts, key=lambda t: (t != GOOD, t)):
            lines.append(f"  test/{t}: {counts[t]} images")
        missing = self.defects_without_mask
        if missing:
            lines.append(f"  {len(missing)} defect image(s) without a mask: image-level metrics only for those")
        return "\n".join(lines)


def list_images(folder: str) -> list:
    """Image files directly inside ``folder``, sorted by name."""
    if not os.path.isdir(folder):
        raise InputError(f"folder not found: {folder}")
    return sorted(
        os.path.join(folder, f)
        for f in os.listdir(folder)
        if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
    )


def _find_mask(mask_dir: str, stem: str) -> Optional[str]:
    if not os.path.isdir(mask_dir):
        return None
    for candidate in (f"{stem}_mask", stem):
        for ext in IMAGE_EXTENSIONS:
            for e in (ext, ext.upper()):
                p = os.path.join(mask_dir, candidate + e)
                if os.path.isfile(p):
                    return p
    return None


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def discover_mvtec(root: str) -> Category:
    """List an MVTec-layout category. ``test/`` is optional (training only)."""
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise InputError(f"category folder not found: {root}")
    train_dir = os.path.join(root, "train", GOOD)
    if not os.path.isdir(train_dir):
        raise InputError(f"not an MVTec-layout category (no train/good folder): {root}")
    train = [Sample(p) for p in list_images(train_dir)]
    if not train:
        raise InputError(f"empty split: no images in {train_dir}")
    test = []
    test_root = os.path.join(root, "test")
    if os.path.isdir(test_root):
        for dtype in sorted(os.listdir(test_root)):
            d = os.path.join(test_root, dtype)
            if not os.path.isdir(d):
                continue
            label = 0 if dtype == GOOD else 1
            gt_dir = os.path.join(root, "ground_truth", dtype)
            for p in list_images(d):
                mask = None if label == 0 else _find_mask(gt_dir, _stem(p))
                test.append(Sample(p, label, dtype, mask))
    return Category(root=root, name=os.path.basename(root), mode="mvtec", train=train, test=test)


def discover_folder(
    normal_dir: str,
    abnormal_dir: Optional[str] = None,
    mask_dir: Optional[str] = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Category:
    """Custom data: normal images, optionally abnormal images and their masks.

    With abnormal images, a seeded ``test_fraction`` of the normal images is
    held out for the test set so that test metrics see both classes.
    """
    normal_dir = os.path.abspath(os.fspath(normal_dir))
    normals = list_images(normal_dir)
    if not normals:
        raise InputError(f"empty split: no images in {normal_dir}")
    abnormal = []
    if abnormal_dir:
        abnormal_dir = os.path.abspath(os.fspath(abnormal_dir))
        files = list_images(abnormal_dir)
        if not files:
            raise InputError(f"empty split: no images in {abnormal_dir}")
        if mask_dir and not os.path.isdir(mask_dir):
            raise InputError(f"mask folder not found: {mask_dir}")
        abnormal = [
            Sample(p, 1, "abnormal", _find_mask(mask_dir, _stem(p)) if mask_dir else None) for p in files
        ]
    train = [Sample(p) for p in normals]
    test = []
    if abnormal:
        n_hold = int(round(test_fraction * len(normals)))
        n_hold = min(max(n_hold, 1), len(normals) - 1) if len(normals) > 1 else 0
        order = np.random.RandomState(seed).permutation(len(normals))
        held = set(order[:n_hold].tolist())
        train = [Sample(p) for i, p in enumerate(normals) if i not in held]
        test = [Sample(p) for i, p in enumerate(normals) if i in held] + abnormal
    return Category(root=normal_dir, name=os.path.basename(normal_dir), mode="folder", train=train, test=test)


def discover(path: str, abnormal_dir=None, mask_dir=None, **kwargs) -> Category:
    """MVTec layout when ``path/train/good`` exists, folder mode otherwise."""
    if abnormal_dir is None and mask_dir is None and os.path.isdir(os.path.join(path, "train", GOOD)):
        return discover_mvtec(path)
    if not os.path.isdir(path):
        raise InputError(f"category folder not found: {path}")
    return discover_folder(path, abnormal_dir, mask_dir, **kwargs)


def check_samples(samples, check_masks: bool = True) -> None:
    """Open each file's header (and verify PNG checksums) so a bad file is named up front."""
    from PIL import Image, UnidentifiedImageError

    for s in samples:
        size = _check_image(s.path, Image, UnidentifiedImageError)
        if check_masks and s.mask_path is not None:
            msize = _check_image(s.mask_path, Image, UnidentifiedImageError, what="mask")
            if msize != size:
                raise InputError(
                    f"mask size {msize[0]}x{msize[1]} differs from its image's {size[0]}x{size[1]}: {s.mask_path}"
                )


def _check_image(path, Image, UnidentifiedImageError, what="image"):
    if not os.path.isfile(path):
        raise InputError(f"{what} file not found: {path}")
    try:
        with Image.open(path) as im:
            size, mode = im.size, im.mode
            im.verify()  # PNG: checks every chunk's CRC, catching truncated files
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"unreadable or corrupt {what}: {path} ({e})") from None
    if mode not in _ACCEPTED_MODES and not (mode == "I" and path.lower().endswith(".png")):
        raise InputError(f"unsupported pixel format '{mode}' (8- or 16-bit grey, or 8-bit RGB expected): {path}")
    return size


def split_validation(samples, fraction: float = 0.1, seed: int = 0):
    """Deterministic seeded split of training samples into (train, validation)."""
    samples = list(samples)
    if not samples:
        raise InputError("empty split: no training images")
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"--val-fraction must be in [0, 1), got {fraction}")
    n_val = int(round(fraction * len(samples)))
    if fraction > 0 and len(samples) >= 2:
        n_val = min(max(n_val, 1), len(samples) - 1)
    order = np.random.RandomState(seed).permutation(len(samples))
    val_idx = set(order[:n_val].tolist())
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    return train, val


def stratified_split(samples, fraction: float, seed: int = 0):
    """Split test samples into (part, rest), stratified by defect type (at least one per type)."""
    samples = list(samples)
    rng = np.random.RandomState(seed)
    picked = set()
    by_type: dict[str, list] = {}
    for i, s in enumerate(samples):
        by_type.setdefault(s.defect_type, []).append(i)
    for t in sorted(by_type):
        idx = by_type[t]
        k = int(round(fraction * len(idx)))
        k = min(max(k, 1), len(idx) - 1) if len(idx) > 1 else 0
        picked.update(rng.permutation(idx)[:k].tolist())
    part = [s for i, s in enumerate(samples) if i in picked]
    rest = [s for i, s in enumerate(samples) if i not in picked]
    return part, rest
