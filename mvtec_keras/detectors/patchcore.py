"""PatchCore: a coreset memory bank of locally aware patch features (Roth et al., 2022).

Patch features: two mid-level taps, each 3x3 average-pooled (stride 1) so a
patch sees its neighbourhood, the coarser bilinearly upsampled to the finer
resolution, concatenated, optionally reduced to ``embed_dim`` channels by
adaptive average pooling over the channel axis. The memory bank is a greedy
k-center coreset (``coreset_ratio`` of the training patches, computed in a
random ``proj_dim`` projection, at most ``max_bank_size`` patches).

Fit memory is bounded by ``memory_budget_mb``, which covers the kept patches
and the coreset's working copy of them (their ``proj_dim`` projection): the
training patches are kept as they stream in until they fill the budget; beyond
it a seeded uniform reservoir sample of that many patches is kept (the bank is
subsampled on the fly), and the coreset (``coreset_ratio`` of the sample) is
taken from it. A training set that fits the budget gives exactly the bank of a
fit without one.

Scoring: distance of every test patch to its nearest bank patch gives the
map (upsampled, blurred). The image score is the largest patch distance
``s*``, reweighted as in the paper by ``1 - softmax`` of the distances from
that test patch to the ``num_neighbors`` bank neighbours of its nearest
bank patch ``m*`` (``m*`` first): an outlier in a sparse bank region counts less.
"""

from __future__ import annotations

import math
import os

import numpy as np
from keras import ops

from .. import backends
from ..errors import InputError
from .base import Detector, load_arrays, register_detector, save_arrays
from .components.backbone import BackboneMixin, iter_images, to_rgb
from .components.coreset import greedy_coreset
from .components.feature_maps import resize, upsample_blur
from .components.nearest import argmax, knn
from .components.sampling import ReservoirSlots

STATE_FILE = "patchcore_state.npz"


@register_detector("patchcore")
class PatchcoreDetector(BackboneMixin, Detector):
    has_maps = True

    def __init__(
        self,
        backbone="efficientnet-b0",
        weights="imagenet",
        input_size=None,
        levels=(4, 6),
        embed_dim=None,
        coreset_ratio=0.1,
        max_bank_size=100_000,
        memory_budget_mb=256,
        proj_dim=128,
        num_neighbors=9,
        sigma=4.0,
        seed=0,
    ):
        self._init_backbone(backbone, weights, input_size)
        self.levels = levels
        self.embed_dim = embed_dim
        self.coreset_ratio = coreset_ratio
        self.max_bank_size = max_bank_size
        self.memory_budget_mb = memory_budget_mb
        self.proj_dim = proj_dim
        self.num_neighbors = num_neighbors
        self.sigma = sigma
        self.seed = seed

    def patch_features(self, images):
        """Locally aware patch features, [B, h, w, C]."""
        return self.patches_of(self._features(images, self._needed_levels()))

    def patches_of(self, level_features):
        """:meth:`patch_features` from the extractor's level tensors (in ``levels`` order)."""
        # 3x3 neighbourhood mean over a zero-padded map (border patches average in
        # the padding, as the reference implementation's unfold does).
        feats = [
            ops.average_pool(ops.pad(f, ((0, 0), (1, 1), (1, 1), (0, 0))), pool_size=3, strides=1, padding="valid")
            for f in level_features
        ]
        size = max((tuple(f.shape[1:3]) for f in feats), key=lambda s: s[0] * s[1])
        x = ops.concatenate([resize(f, size, "bilinear") for f in feats], axis=-1)
        if self.embed_dim is not None and int(self.embed_dim) != x.shape[-1]:
            x = ops.matmul(x, ops.convert_to_tensor(_adaptive_pool_matrix(x.shape[-1], int(self.embed_dim))))
        return x

    # -- fitting ---------------------------------------------------------------
    def _fit(self, train, validation=None, batch_size: int = 16, progress: bool = False, **kwargs) -> None:
        if not 0.0 < float(self.coreset_ratio) <= 1.0:
            raise InputError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if int(self.max_bank_size) < 1:
            raise InputError(f"max_bank_size must be >= 1, got {self.max_bank_size}")
        if not float(self.memory_budget_mb) > 0:
            raise InputError(f"memory_budget_mb must be > 0, got {self.memory_budget_mb}")
        sample, shape = None, None
        for x in iter_images(train, batch_size, progress):
            # Replicas' patches joined in replica order (= the one-device stream) before the
            # reservoir and the coreset, so the bank does not depend on the number of replicas.
            f = np.concatenate([ops.convert_to_numpy(p) for p in self._per_replica(self.patch_features, x)])
            if shape is None:
                shape, sample = f.shape[1:3], self.new_sample(f.shape[-1])
            elif f.shape[1:3] != shape:
                raise InputError(f"training images give feature maps {f.shape[1:3]}, earlier ones {shape}")
            sample.add(f.reshape(-1, f.shape[-1]))
        if sample is None:
            raise InputError("PatchCore got no training images")
        self.fit_sample(sample, shape)

    # The fit in two steps, so that a caller streaming patches itself (the CIFAR-10 bench's shared
    # backbone pass) gets the bank a fit on the same stream gives.
    def new_sample(self, channels: int) -> "PatchReservoir":
        """An empty sample of training patches of ``channels`` features, sized by ``memory_budget_mb``."""
        work = min(int(self.proj_dim), channels) if self.proj_dim else channels  # the coreset's copy of each row
        cap = max(1, int(float(self.memory_budget_mb) * 2**20) // (4 * (channels + work)))
        return PatchReservoir(cap, seed=int(self.seed))

    def fit_sample(self, sample: "PatchReservoir", feature_shape) -> "PatchcoreDetector":
        """The memory bank: the coreset of the patches ``sample`` kept (fed one training batch per ``add``)."""
        patches, n_seen = sample.rows(), sample.seen
        n_keep = min(int(math.ceil(float(self.coreset_ratio) * len(patches))), int(self.max_bank_size))
        if n_keep >= len(patches):
            idx = np.arange(len(patches))
        else:
            idx = greedy_coreset(patches, n_keep, proj_dim=self.proj_dim, seed=int(self.seed))
        self._cache = None
        self.memory_bank_ = np.ascontiguousarray(patches[idx], dtype=np.float32)
        self.memory_bank_size_ = len(self.memory_bank_)
        self.feature_shape_ = np.asarray(tuple(feature_shape), dtype=np.int64)
        self.n_train_patches_ = n_seen
        self.n_sampled_patches_ = len(patches)
        self._warm_up()
        return self

    # -- scoring ---------------------------------------------------------------
    def _tensors(self):
        if getattr(self, "_cache", None) is None:
            bank = ops.convert_to_tensor(self.memory_bank_)
            self._cache = (bank, ops.sum(bank * bank, axis=-1))
            self._nn_fn = None
        return self._cache

    def _warm_up(self) -> None:
        # Trace the nearest-neighbour graph once while building the detector, so that
        # scoring (about 1.2x faster traced than eager) does not pay for the trace.
        self._nearest(np.zeros((1, self.memory_bank_.shape[1]), np.float32))

    def _nearest(self, queries):
        """Nearest bank row of each patch, as one traced graph (any number of patches)."""
        if getattr(self, "_nn_fn", None) is None:
            bank, bank_sq = self._tensors()
            if not backends.is_tensorflow():
                self._nn_fn = lambda q: knn(q, bank, 1, bank_sq=bank_sq)
                return self._nn_fn(queries)
            import tensorflow as tf

            spec = tf.TensorSpec([None, int(bank.shape[1])], tf.float32)
            self._nn_fn = tf.function(lambda q: knn(q, bank, 1, bank_sq=bank_sq), input_signature=[spec],
                                      autograph=False)
        return self._nn_fn(queries)

    def score_batch(self, images):
        self._check_fitted()
        # The backbone and the nearest-neighbour search are traced graphs; the rest is a
        # few large ops, cheap in eager mode.
        images = to_rgb(images)
        return self.score_patches(self.patch_features(images), tuple(images.shape[1:3]))

    def score_patches(self, f, size):
        """``(image scores, maps of ``size``)`` of patch features ``f`` (:meth:`patches_of`)."""
        self._check_fitted()
        b, h, w, c = f.shape
        if (h, w) != tuple(int(v) for v in self.feature_shape_):
            fitted = "x".join(str(int(v)) for v in self.feature_shape_)
            raise InputError(f"images give feature maps {h}x{w}, the detector was fitted on {fitted}: use the training size")
        bank, bank_sq = self._tensors()
        q = ops.reshape(f, (-1, c))
        dist, nn = self._nearest(q)
        dist = ops.reshape(dist, (-1, h * w))
        nn = ops.reshape(nn, (-1, h * w))
        maps = upsample_blur(ops.reshape(dist, (-1, h, w)), size, self.sigma)

        # Paper's reweighting of the most anomalous patch of each image.
        worst = argmax(dist, axis=1)[:, None]
        s_star = ops.take_along_axis(dist, worst, axis=1)[:, 0]
        m_star = ops.take_along_axis(nn, worst, axis=1)[:, 0]
        m_test = ops.take_along_axis(ops.reshape(f, (-1, h * w, c)), worst[:, :, None], axis=1)[:, 0]
        _, neigh = knn(ops.take(bank, m_star, axis=0), bank, int(self.num_neighbors), bank_sq=bank_sq)
        d_neigh = ops.sqrt(ops.sum((ops.take(bank, neigh, axis=0) - m_test[:, None, :]) ** 2, axis=-1))
        weight = 1.0 - ops.softmax(d_neigh, axis=-1)[:, 0]
        return weight * s_star, maps

    # -- persistence -----------------------------------------------------------
    def _save_state(self, dirpath: str) -> None:
        save_arrays(
            os.path.join(dirpath, STATE_FILE),
            memory_bank=self.memory_bank_,
            feature_shape=self.feature_shape_,
            n_train_patches=np.int64(self.n_train_patches_),
            n_sampled_patches=np.int64(self.n_sampled_patches_),
        )
        self._save_extractor(dirpath)

    def _load_state(self, dirpath: str) -> None:
        a = load_arrays(os.path.join(dirpath, STATE_FILE))
        self.memory_bank_ = a["memory_bank"]
        self.memory_bank_size_ = len(self.memory_bank_)
        self.feature_shape_ = a["feature_shape"]
        self.n_train_patches_ = int(a["n_train_patches"])
        # folders saved before the budget existed sampled nothing
        self.n_sampled_patches_ = int(a.get("n_sampled_patches", self.n_train_patches_))
        self._cache = None
        self._load_extractor(dirpath)
        self._warm_up()


class PatchReservoir:
    """At most ``capacity`` rows of a stream: all of them while they fit, in arrival order;
    beyond that a seeded uniform sample (:class:`ReservoirSlots`)."""

    def __init__(self, capacity: int, seed: int = 0):
        self.capacity = int(capacity)
        self._slots = ReservoirSlots(capacity, seed)
        self._rows = None  # [capacity, c], allocated once (pages are touched only as rows arrive)

    @property
    def seen(self) -> int:
        return self._slots.seen

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float32)
        if self._rows is None:
            self._rows = np.empty((self.capacity, rows.shape[-1]), np.float32)
        slots = self._slots.next(len(rows))
        keep = slots >= 0
        self._rows[slots[keep]] = rows[keep]  # repeated slots: the later row wins, as in the loop

    def rows(self) -> np.ndarray:
        """The kept rows (a view, no copy): in arrival order while they fit."""
        if self._rows is None:
            return np.zeros((0, 0), np.float32)
        return self._rows[: min(self.seen, self.capacity)]


def _adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_in, n_out] averaging matrix: bin i covers [floor(i*n/m), ceil((i+1)*n/m))."""
    m = np.zeros((n_in, n_out), np.float32)
    for i in range(n_out):  # n_out bins, built once
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[lo:hi, i] = 1.0 / (hi - lo)
    return m
