"""SPADE: k nearest training images, then pixel-level matching (Cohen & Hoshen, 2020).

Image score: mean Euclidean distance from the pooled features of the test
image to its ``k`` nearest training images. Anomaly map: for every level in
``map_levels`` and every position, the smallest distance to any position of
those ``k`` images' feature maps; the level maps are upsampled to the input
size, averaged and blurred. The memory bank keeps at most ``max_bank_images``
training images (uniform reservoir sample beyond that).
"""

from __future__ import annotations

import os

import numpy as np
from keras import ops

from .. import backends

from ..errors import InputError
from .base import Detector, load_arrays, register_detector, save_arrays
from .components.backbone import BackboneMixin, iter_images
from ..residuals import gaussian_blur
from .components.feature_maps import pooled, resize
from .components.nearest import augment_bank, knn, min_distances
from .components.sampling import ReservoirSlots

STATE_FILE = "spade_state.npz"


def image_scores(pooled_features, image_bank, k: int):
    """SPADE's image score of pooled features ``[B, c]``: the mean distance to their ``k`` nearest
    rows of ``image_bank`` (``k`` clipped to the bank size); also returns those rows' indices."""
    dist, nn = knn(pooled_features, image_bank, int(k))
    return ops.mean(dist, axis=1), nn


@register_detector("spade")
class SpadeDetector(BackboneMixin, Detector):
    has_maps = True
    #: the image score is the k-NN distance of global features, not a summary of the map
    score_is_map_summary = False

    def __init__(
        self,
        backbone="efficientnet-b0",
        weights="imagenet",
        input_size=None,
        image_level=9,
        map_levels=(3, 4, 6),
        k=50,
        sigma=4.0,
        max_bank_images=1000,
        seed=0,
    ):
        self._init_backbone(backbone, weights, input_size)
        self.image_level = image_level
        self.map_levels = map_levels
        self.k = k
        self.sigma = sigma
        self.max_bank_images = max_bank_images
        self.seed = seed

    def _needed_levels(self):
        return tuple(dict.fromkeys([int(self.image_level), *(int(v) for v in self.map_levels)]))

    def _split(self, images):
        feats = dict(zip(self._needed_levels(), self._features(images, self._needed_levels())))
        return pooled(feats[int(self.image_level)]), [feats[int(v)] for v in self.map_levels]

    # -- fitting ---------------------------------------------------------------
    def _fit(self, train, validation=None, batch_size: int = 16, progress: bool = False, **kwargs) -> None:
        if int(self.k) < 1 or int(self.max_bank_images) < 1:
            raise InputError(f"k and max_bank_images must be >= 1, got {self.k} and {self.max_bank_images}")
        cap = int(self.max_bank_images)
        slots = ReservoirSlots(cap, seed=int(self.seed))  # keeps memory bounded by `cap` images
        bank = []  # entries: (pooled vector, [per-level maps])
        for x in iter_images(train, batch_size, progress):
            # Replicas' features joined in replica order: the one-device stream, whatever the replicas.
            parts = self._per_replica(self._split, x)
            g = np.concatenate([ops.convert_to_numpy(p[0]) for p in parts])
            maps = [np.concatenate([ops.convert_to_numpy(p[1][j]) for p in parts]) for j in range(len(parts[0][1]))]
            slots.place(bank, len(g), lambda i: (g[i].copy(), [m[i].copy() for m in maps]))
        seen = slots.seen
        if not seen:
            raise InputError("SPADE got no training images")
        n = len(bank)
        self._cache = None
        self.image_bank_ = np.stack([e[0] for e in bank]).astype(np.float32)
        self.map_banks_ = [np.stack([e[1][j] for e in bank]).astype(np.float32) for j in range(len(self.map_levels))]
        self.memory_bank_size_ = n
        self.n_train_ = seen

    # -- scoring ---------------------------------------------------------------
    def _tensors(self):
        if getattr(self, "_cache", None) is None:
            # per level [n, h*w, c + 1] = [-2 b, |b|^2]: the gallery norms are computed once here
            aug = [augment_bank(np.reshape(m, (m.shape[0], -1, m.shape[-1]))) for m in self.map_banks_]
            self._cache = (ops.convert_to_tensor(self.image_bank_), aug)
            self._search_fn = None
        return self._cache

    @staticmethod
    def _nearest_in_gallery(query, bank_aug, idx):
        """[h*w] distances from one image's positions to all positions of bank images ``idx``."""
        # one gather per image and level: the k images' positions as one [k*h*w, c + 1] gallery
        gallery = ops.reshape(ops.take(bank_aug, idx, axis=0), (-1, int(bank_aug.shape[-1])))
        return min_distances(query, gallery)

    def _search(self, query, bank_aug, idx):
        if not backends.is_tensorflow():
            return self._nearest_in_gallery(query, bank_aug, idx)
        import tensorflow as tf

        if not tf.executing_eagerly():  # inside an export trace: inline the ops
            return self._nearest_in_gallery(query, bank_aug, idx)
        if getattr(self, "_search_fn", None) is None:
            # a traced graph per level shape: the ~300 blocks of level 3 would cost ~1 ms each eagerly
            self._search_fn = tf.function(self._nearest_in_gallery, autograph=False)
        return self._search_fn(query, bank_aug, idx)

    def score_batch(self, images):
        self._check_fitted()
        size = tuple(ops.shape(images)[1:3])
        g, maps = self._split(images)
        bank_img, bank_augs = self._tensors()
        scores, nn = image_scores(g, bank_img, int(self.k))
        level_maps = []
        for f, bank, aug in zip(maps, self.map_banks_, bank_augs):
            b, h, w, c = f.shape
            if (h, w) != tuple(bank.shape[1:3]):
                raise InputError(f"images give {h}x{w} feature maps, the bank holds {bank.shape[1]}x{bank.shape[2]}")
            query = ops.reshape(f, (b, h * w, c))
            # one image at a time: the gallery differs per test image
            per = [self._search(query[i], aug, nn[i]) for i in range(b)]
            m = ops.reshape(ops.stack(per, axis=0), (b, h, w, 1))
            level_maps.append(resize(m, size, "bilinear")[..., 0])
        maps = gaussian_blur(ops.mean(ops.stack(level_maps, axis=0), axis=0), self.sigma)
        return scores, maps

    # -- persistence -----------------------------------------------------------
    def _save_state(self, dirpath: str) -> None:
        arrays = {"image_bank": self.image_bank_, "n_train": np.int64(self.n_train_)}
        for i, m in enumerate(self.map_banks_):
            arrays[f"map_bank_{i}"] = m
        save_arrays(os.path.join(dirpath, STATE_FILE), **arrays)
        self._save_extractor(dirpath)

    def _load_state(self, dirpath: str) -> None:
        a = load_arrays(os.path.join(dirpath, STATE_FILE))
        self.image_bank_ = a["image_bank"]
        self.map_banks_ = [a[f"map_bank_{i}"] for i in range(len(self.map_levels))]
        self.memory_bank_size_ = len(self.image_bank_)
        self.n_train_ = int(a["n_train"])
        self._cache = None
        self._load_extractor(dirpath)
