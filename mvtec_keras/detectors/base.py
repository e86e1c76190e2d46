"""The one interface every detector answers, whatever its family.

A detector is fitted on normal images and then scores images: one anomaly
score per image and, where the method localises, one anomaly map per image at
input resolution (higher = more anomalous). It saves itself to a folder and
loads back with identical scores.

Conventions (scikit-learn style):
- the constructor only stores its parameters (all JSON-serialisable);
  ``get_config()`` returns them and ``from_config`` rebuilds an unfitted twin;
- everything learned in ``fit`` ends in a trailing underscore;
- ``score_batch`` is written in Keras / TF ops so that the scoring path can
  become one graph (LiteRT export, JAX backend).

Images reaching a detector are float32 ``[B, H, W, C]`` in ``[0, 1]``, already
decoded, colour-converted and resized by :mod:`mvtec_keras.data`. Any
backbone-specific normalisation happens inside the detector.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import InputError

DETECTOR_FILE = "detector.json"

_REGISTRY: dict[str, type] = {}


def register_detector(name: str):
    """Class decorator: make a detector loadable by name."""

    def wrap(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def detector_class(name: str) -> type:
    # Importing the package registers every built-in detector.
    from . import _import_all

    if name not in _REGISTRY:
        missing = _import_all.NEEDS_TENSORFLOW
        hint = f" (the {', '.join(missing)} detectors need TensorFlow, which is not installed)" if missing else ""
        raise InputError(f"unknown detector '{name}'; choose from {', '.join(sorted(_REGISTRY))}{hint}")
    return _REGISTRY[name]


@dataclass
class ScoreResult:
    """Scores of a set of images, plus what travelled with them."""

    scores: np.ndarray  # [N] float32
    maps: Optional[np.ndarray] = None  # [N, H, W] float32, or None
    labels: Optional[np.ndarray] = None  # [N] int (1 = defective), when known
    masks: Optional[np.ndarray] = None  # [N, H, W] uint8, when known
    paths: Optional[list] = None
    defect_types: Optional[list] = None
    images: Optional[np.ndarray] = None  # [N, H, W, C], only when asked for


def _plain(value):
    """A JSON-ready copy: NumPy scalars become Python numbers, tuples become lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class Detector:
    """Base class. Subclasses implement ``_fit``, ``score_batch`` and the state hooks."""

    name = "detector"
    #: whether ``score_batch`` returns anomaly maps
    has_maps = True
    #: whether the image score is a summary (max, mean, ...) of the anomaly map; when False
    #: (GAN latent distances, Mahalanobis) decisions use the image score, never map regions
    score_is_map_summary = True

    def gaussian_score_model(self):
        """For Gaussian methods, how the image score follows from the fitted distribution
        (see :func:`mvtec_keras.thresholds.chi2_bound`); None for every other detector."""
        return None

    # -- configuration -------------------------------------------------------
    def get_config(self) -> dict:
        """The constructor's parameters, read back from the attributes of the same name
        (as scikit-learn's ``get_params``), as JSON-ready values."""
        params = inspect.signature(type(self).__init__).parameters
        names = [n for n, p in params.items() if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]
        return {n: _plain(getattr(self, n)) for n in names}

    @classmethod
    def from_config(cls, config: dict) -> "Detector":
        return cls(**config)

    # -- fitting -------------------------------------------------------------
    def fit(self, train, validation=None, **kwargs) -> "Detector":
        """Fit on normal images.

        ``train`` / ``validation`` are ``tf.data.Dataset`` of dict elements
        (see :func:`mvtec_keras.data.pipeline.make_dataset`) or arrays of images.
        """
        self._fit(train, validation, **kwargs)
        return self

    def _fit(self, train, validation=None, **kwargs) -> None:
        raise NotImplementedError

    @property
    def is_fitted(self) -> bool:
        return any(k.endswith("_") and not k.startswith("_") for k in vars(self))

    def _check_fitted(self):
        if not self.is_fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit() first")

    # -- scoring -------------------------------------------------------------
    def score_batch(self, images):
        """Score one batch. Returns ``(scores [B], maps [B, H, W] or None)`` as tensors."""
        raise NotImplementedError

    def iter_score(self, data, batch_size: int = 16, progress: bool = False):
        """Score batch by batch: yields ``(batch, scores [B], maps [B, H, W] or None)`` as numpy.

        Memory stays flat in the number of images (nothing is accumulated), for
        test sets too large to hold every map.
        """
        self._check_fitted()
        for batch in _iterate_batches(data, batch_size, progress):
            s, m = self.score_batch(batch["image"])
            yield batch, np.asarray(s, dtype=np.float32).reshape(-1), (None if m is None else np.asarray(m, np.float32))

    def score(self, data, batch_size: int = 16, keep_images: bool = False, progress: bool = False,
              keep_maps: bool = True) -> ScoreResult:
        """Score a dataset (dict elements) or an array of images, batch by batch.

        ``keep_maps=False`` drops the anomaly maps ([N, H, W] float32, 200 kB per
        224 px image) so that memory stays flat in the test-set size.
        """
        scores, maps, labels, masks, paths, dtypes, images = [], [], [], [], [], [], []
        for batch, s, m in self.iter_score(data, batch_size, progress):
            x = batch["image"]
            scores.append(s)
            if m is not None and keep_maps:
                maps.append(m)
            if "label" in batch:
                labels.append(np.asarray(batch["label"]).reshape(-1))
            if "mask" in batch:
                masks.append(np.asarray(batch["mask"])[..., 0].astype(np.uint8))
            if "path" in batch:
                paths.extend(_strings(batch["path"]))
            if "defect_type" in batch:
                dtypes.extend(_strings(batch["defect_type"]))
            if keep_images:
                images.append(np.asarray(x))
        if not scores:
            raise InputError("nothing to score: the dataset is empty")
        return ScoreResult(
            scores=np.concatenate(scores),
            maps=np.concatenate(maps) if maps else None,
            labels=np.concatenate(labels) if labels else None,
            masks=np.concatenate(masks) if masks else None,
            paths=paths or None,
            defect_types=dtypes or None,
            images=np.concatenate(images) if images else None,
        )

    # -- persistence ---------------------------------------------------------
    def save(self, dirpath: str) -> None:
        """Write the detector to ``dirpath`` atomically (a temp folder, then a rename)."""
        self._check_fitted()
        dirpath = os.path.abspath(dirpath)
        parent = os.path.dirname(dirpath)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-detector-", dir=parent)
        try:
            with open(os.path.join(tmp, DETECTOR_FILE), "w") as f:
                json.dump({"class": self.name, "config": self.get_config()}, f, indent=2)
            self._save_state(tmp)
            if os.path.isdir(dirpath):
                # Keep files that other tools wrote beside the detector (info.json, reports).
                for entry in os.listdir(tmp):
                    dst = os.path.join(dirpath, entry)
                    if os.path.isdir(dst):
                        shutil.rmtree(dst)
                    os.replace(os.path.join(tmp, entry), dst)
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, dirpath)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _save_state(self, dirpath: str) -> None:
        raise NotImplementedError

    def _load_state(self, dirpath: str) -> None:
        raise NotImplementedError


@contextlib.contextmanager
def reading_state(path: str):
    """Reading saved state from ``path``: a damaged file (truncated .npz / .h5 / .keras, bad JSON)
    becomes one InputError naming it, instead of a traceback from deep inside NumPy, h5py or Keras."""
    try:
        yield
    except InputError:
        raise
    except Exception as e:  # BadZipFile, OSError, EOFError, KeyError, ValueError, JSONDecodeError, ...
        msg = " ".join(str(e).split())[:200]
        raise InputError(f"damaged or unreadable saved state: {path} ({type(e).__name__}: {msg})") from None


def read_json_state(path: str, default=None):
    """A JSON file of saved state (``default`` when absent), see :func:`reading_state`."""
    if default is not None and not os.path.isfile(path):
        return default
    with reading_state(path), open(path) as f:
        return json.load(f)


def load_detector(dirpath: str) -> Detector:
    """Load any detector saved with :meth:`Detector.save`.

    Damaged saved state raises :class:`InputError` naming the file.
    """
    meta_path = os.path.join(dirpath, DETECTOR_FILE)
    if not os.path.isfile(meta_path):
        raise InputError(f"{meta_path}: no saved detector here (missing {DETECTOR_FILE})")
    meta = read_json_state(meta_path)
    with reading_state(meta_path):
        cls = detector_class(meta["class"])
        det = cls.from_config(meta["config"])
    # Every state file is read under reading_state at its own load site; this names the
    # folder for anything a detector reads without it.
    with reading_state(dirpath):
        det._load_state(dirpath)
    return det


def save_arrays(path: str, **arrays) -> None:
    """Learned numeric state as one .npz (no pickle)."""
    np.savez(path, **{k: np.asarray(v) for k, v in arrays.items()})


def load_arrays(path: str) -> dict:
    if not os.path.isfile(path):
        raise InputError(f"saved state missing: {path}")
    with reading_state(path), np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _strings(t):
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(t).reshape(-1).tolist()]


def _iterate_batches(data, batch_size, progress, desc: str = "scoring"):
    """Yield dict batches from a tf.data.Dataset of dicts, a dict of arrays, or an image array.

    ``progress`` shows a tqdm bar named ``desc`` (with a total where the length is known).
    """
    batches = _batches(data, batch_size)
    if not progress:
        yield from batches
        return
    from tqdm.auto import tqdm

    total = None
    if isinstance(data, dict):
        total = -(-len(data["image"]) // batch_size)
    elif isinstance(data, np.ndarray) or (hasattr(data, "shape") and not isinstance(data, dict)):
        total = -(-len(data) // batch_size)
    else:
        try:
            total = len(data)  # tf.data: TypeError when the cardinality is unknown
        except TypeError:
            pass
    yield from tqdm(batches, desc=desc, unit="batch", total=total, leave=False)


def _batches(data, batch_size):
    if isinstance(data, np.ndarray) or (hasattr(data, "shape") and not isinstance(data, dict)):
        arr = np.asarray(data, dtype=np.float32)
        if arr.ndim == 3:
            arr = arr[..., None]
        for i in range(0, len(arr), batch_size):
            yield {"image": arr[i : i + batch_size]}
        return
    if isinstance(data, dict):
        n = len(data["image"])
        for i in range(0, n, batch_size):
            yield {k: v[i : i + batch_size] for k, v in data.items()}
        return
    for batch in data:
        yield {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in batch.items()}
