"""CIFAR-10 leave-one-class-out protocol (GANomaly's): read the JPEG zip, split, stage as MVTec.

The zip (``../shared/data/cifar10/cifar10_jpg.zip``) holds ``train/<class>/NNNN.jpg``
(10 x 5000) and ``test/<class>/NNNN.jpg`` (10 x 1000). With one class abnormal:

- train: the 45,000 training images of the nine other classes;
- test: their 9,000 test images (normal) plus all 6,000 images of the
  abnormal class (its training and its test images).

:func:`stage` writes that split in the MVTec layout (``train/good``,
``test/good``, ``test/<abnormal>``) so that ``train.py`` / ``extract.py`` /
``test.py`` run on it unchanged; :func:`leave_one_out` gives the same split
as arrays for benchmarks.

    python -m mvtec_keras.data.cifar10 --abnormal dog --out /data/cifar10-dog
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import zipfile

import numpy as np

from ..errors import EXIT_BAD_INPUT, InputError
from ..fileio import staged_dir

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEFAULT_ZIP = "../shared/data/cifar10/cifar10_jpg.zip"
MANIFEST = "cifar10_staging.json"
#: seed of the fixed order given to the normal test images by :func:`reference_order`
REFERENCE_ORDER_SEED = 0


def check_class(name: str) -> str:
    if name not in CLASSES:
        raise InputError(f"--abnormal: unknown CIFAR-10 class '{name}'; choose from {', '.join(CLASSES)}")
    return name


def _open_zip(path: str) -> zipfile.ZipFile:
    if not os.path.isfile(path):
        raise InputError(f"{path}: CIFAR-10 zip not found")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"{path}: not a readable zip file ({e})") from None


def members(zf: zipfile.ZipFile) -> dict:
    """``{(split, class): [member names, sorted]}`` of the ``split/class/*.jpg`` entries."""
    out = {(s, c): [] for s in ("train", "test") for c in CLASSES}
    for name in zf.namelist():
        parts = name.split("/")
        if len(parts) == 3 and parts[2].lower().endswith((".jpg", ".jpeg")) and (parts[0], parts[1]) in out:
            out[(parts[0], parts[1])].append(name)
    empty = [f"{s}/{c}" for (s, c), v in out.items() if not v]
    if empty:
        raise InputError(f"{zf.filename}: no images under {', '.join(empty[:3])}"
                         f"{' ...' if len(empty) > 3 else ''} (expected train|test/<class>/*.jpg)")
    return {k: sorted(v) for k, v in out.items()}


def _decode(zf, name) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(zf.read(name))) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{zf.filename}:{name}: not a readable image ({e})") from None


def load_cifar10(zip_path: str = DEFAULT_ZIP):
    """``{"train" | "test": (images uint8 [N, 32, 32, 3], labels int [N])}``, classes in
    :data:`CLASSES` order, files sorted by name within a class."""
    with _open_zip(zip_path) as zf:
        names = members(zf)
        out = {}
        for split in ("train", "test"):
            images, labels = [], []
            for label, cls in enumerate(CLASSES):
                for name in names[(split, cls)]:
                    images.append(_decode(zf, name))
                    labels.append(label)
            shapes = {im.shape for im in images}
            if len(shapes) != 1:
                raise InputError(f"{zip_path}: {split} images differ in size ({sorted(shapes)[:3]})")
            out[split] = (np.stack(images), np.asarray(labels, np.int32))
    return out


def leave_one_out(data: dict, abnormal: str):
    """``(train uint8 [45000, ...], test uint8 [15000, ...], labels [15000] with 1 = abnormal)``.

    The test images come in the reference's order (see :func:`reference_order`);
    the honest evaluation does not depend on the order.
    """
    k = CLASSES.index(check_class(abnormal))
    (x_tr, y_tr), (x_te, y_te) = data["train"], data["test"]
    order = reference_order(y_te != k)
    normal_test = x_te[y_te != k][order]
    test = np.concatenate([normal_test, x_tr[y_tr == k], x_te[y_te == k]])
    labels = np.concatenate([np.zeros(len(normal_test)), np.ones((y_tr == k).sum() + (y_te == k).sum())])
    return x_tr[y_tr != k], test, labels.astype(np.int32)


def reference_order(normal_mask) -> np.ndarray:
    """Order of the normal test images, mimicking the reference's unshuffled test loader.

    The reference (``get_cifar_anomaly_dataset``) concatenates the normal test
    images in the order of CIFAR-10's own test file, then the abnormal class's
    training images, then its test images. The official test file is in random
    class order; the JPEG zip keeps only per-class folders, so a fixed
    permutation (seed :data:`REFERENCE_ORDER_SEED`) stands in for that order:
    every batch of normals mixes the nine classes, as in the reference, while
    the abnormal images form one block at the end.
    """
    n = int(np.sum(normal_mask))
    return np.random.default_rng(REFERENCE_ORDER_SEED).permutation(n)


# -- staging ---------------------------------------------------------------------------------
def _manifest(zip_path, abnormal, counts) -> dict:
    st = os.stat(zip_path)
    return {"dataset": "cifar10", "protocol": "leave-one-class-out", "abnormal": abnormal,
            "zip": os.path.abspath(zip_path), "zip_bytes": st.st_size, "counts": counts}


def _read_manifest(out: str):
    try:
        with open(os.path.join(out, MANIFEST)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def stage(abnormal: str, out: str, zip_path: str = DEFAULT_ZIP, log=print) -> dict:
    """Write the split in the MVTec layout under ``out`` (atomically); returns the counts.

    A second call with the same class and zip finds the manifest and does nothing.
    Files are extracted (a zip member cannot be linked); names keep the source
    class and split, e.g. ``train/good/cat_0001.jpg``, ``test/dog/train_0001.jpg``.
    """
    check_class(abnormal)
    zf = _open_zip(zip_path)
    with zf:
        names = members(zf)
        plan = {"train/good": [(n, f"{c}_{os.path.basename(n)}") for c in CLASSES if c != abnormal
                               for n in names[("train", c)]],
                "test/good": [(n, f"{c}_{os.path.basename(n)}") for c in CLASSES if c != abnormal
                              for n in names[("test", c)]],
                f"test/{abnormal}": [(n, f"{s}_{os.path.basename(n)}") for s in ("train", "test")
                                     for n in names[(s, abnormal)]]}
        counts = {k: len(v) for k, v in plan.items()}
        want = _manifest(zip_path, abnormal, counts)
        have = _read_manifest(out)
        if have is not None:
            if have == want:
                log(f"{out}: already staged (abnormal={abnormal}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
                    + "); nothing to do")
                return counts
            raise InputError(f"--out {out}: holds another staging (abnormal={have.get('abnormal')}, "
                             f"zip={have.get('zip')}); choose another folder or remove it")
        if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
            raise InputError(f"--out {out}: exists and is not an empty folder")
        with staged_dir(out) as tmp:
            for folder, items in plan.items():
                dst = os.path.join(tmp, folder)
                os.makedirs(dst)
                for src, name in items:
                    with open(os.path.join(dst, name), "wb") as f:
                        f.write(zf.read(src))
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump(want, f, indent=2)
    log(f"staged {out} (abnormal={abnormal}): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mvtec_keras.data.cifar10",
                                description="Stage CIFAR-10 leave-one-class-out in the MVTec layout.")
    p.add_argument("--abnormal", required=True, help=f"the abnormal class: {', '.join(CLASSES)}")
    p.add_argument("--out", required=True, help="category folder to write (train/good, test/good, test/<class>)")
    p.add_argument("--zip", default=DEFAULT_ZIP, help=f"the CIFAR-10 JPEG zip (default {DEFAULT_ZIP})")
    args = p.parse_args(argv)
    try:
        stage(args.abnormal, args.out, args.zip)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
