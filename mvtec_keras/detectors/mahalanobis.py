"""Gaussian fit on pooled pretrained features (Rippel et al., 2020).

Per backbone level, a multivariate Gaussian is fitted to the globally
average-pooled features of the normal images; its covariance is Ledoit-Wolf
shrunk (computed from streamed moments, so the training set never sits in
memory). The anomaly score of an image is the sum over levels of the
Mahalanobis distance ``sqrt((x - mu)^T S^-1 (x - mu))`` -- the paper's score
uses the (unsquared) distance. Optional NPCA keeps only the principal
components of *low* variance: the leading components that explain
``npca_variance`` of the variance are dropped.
"""

from __future__ import annotations

import os

import numpy as np
from keras import ops

from ..errors import InputError
from .base import Detector, load_arrays, register_detector, save_arrays
from .components.backbone import BackboneMixin, iter_images
from .components.feature_maps import pooled
from .components.gaussian import GaussianStats, ledoit_wolf

STATE_FILE = "mahalanobis_state.npz"


@register_detector("mahalanobis")
class MahalanobisDetector(BackboneMixin, Detector):
    """Image-level detector; ``has_maps`` is False."""

    has_maps = False
    score_is_map_summary = False

    def __init__(
        self,
        backbone="efficientnet-b0",
        weights="imagenet",
        input_size=None,
        levels=(1, 2, 3, 4, 5, 6, 7, 8, 9),
        npca_variance=None,
    ):
        self._init_backbone(backbone, weights, input_size)
        self.levels = levels
        self.npca_variance = npca_variance

    # -- fitting ---------------------------------------------------------------
    def _fit(self, train, validation=None, batch_size: int = 16, progress: bool = False, **kwargs) -> None:
        self._check_npca()  # before the long pass over the data
        levels = self._needed_levels()
        # Per tf.distribute replica (one without a strategy), one set of sums per level; merged exactly.
        replica_stats: list = []
        pooled_levels = lambda images: self.pooled_features(self._features(images, levels))  # noqa: E731
        for x in iter_images(train, batch_size, progress):
            for r, feats in enumerate(self._per_replica(pooled_levels, x)):
                while len(replica_stats) <= r:
                    replica_stats.append(self.new_statistics())
                self.accumulate(replica_stats[r], feats)
        stats = self.merge_statistics(replica_stats, copy=False) if replica_stats else self.new_statistics()
        self.fit_statistics(stats)

    def _check_npca(self):
        if self.npca_variance is not None and not 0.0 < float(self.npca_variance) < 1.0:
            raise InputError(f"npca_variance must be in (0, 1), got {self.npca_variance}")

    # The fit in three steps, so that sums over disjoint parts of the data (replicas, or the
    # classes of a leave-one-class-out benchmark) can be made once and combined exactly.
    def pooled_features(self, level_features) -> list:
        """The extractor's level tensors (in ``levels`` order) -> their global average pools."""
        return [pooled(f) for f in level_features]

    def new_statistics(self) -> list:
        """Empty sums, one :class:`GaussianStats` per level."""
        return [GaussianStats(fourth=True) for _ in self._needed_levels()]

    def accumulate(self, stats: list, pooled_levels) -> None:
        """Add a batch of pooled features (:meth:`pooled_features`) to ``stats``."""
        for st, f in zip(stats, pooled_levels):
            st.update(ops.convert_to_numpy(f))

    def merge_statistics(self, parts: list, copy: bool = True) -> list:
        """Sums of several disjoint parts: new objects, or with ``copy=False`` the first part,
        grown in place (no copy of the sums; the other parts are left as they are)."""
        out, rest = (self.new_statistics(), parts) if copy else (parts[0], parts[1:])
        for part in rest:
            for st, p in zip(out, part):
                st.merge(p)
        return out

    def fit_statistics(self, stats: list) -> "MahalanobisDetector":
        """Finish the fit from summed statistics: Ledoit-Wolf covariance and precision per level."""
        self._check_npca()
        if stats[0].n < 2:
            raise InputError(f"Mahalanobis needs at least 2 training images, got {stats[0].n}")
        self._cache = None
        self.means_, self.precisions_, self.shrinkage_, self.n_components_ = [], [], [], []
        for st in stats:
            cov, shrink = ledoit_wolf(st)
            prec, k = _precision(cov, self.npca_variance)
            self.means_.append(st.mean.astype(np.float32))
            self.precisions_.append(prec.astype(np.float32))
            self.shrinkage_.append(shrink)
            self.n_components_.append(k)
        self.shrinkage_ = np.asarray(self.shrinkage_)
        self.n_components_ = np.asarray(self.n_components_)
        self.n_train_ = int(stats[0].n)
        return self

    # -- scoring ---------------------------------------------------------------
    def _tensors(self):
        if getattr(self, "_cache", None) is None:
            self._cache = [
                (ops.convert_to_tensor(m), ops.convert_to_tensor(p)) for m, p in zip(self.means_, self.precisions_)
            ]
        return self._cache

    def score_levels(self, images):
        """Per-level Mahalanobis distances, ``[B, L]`` in the order of ``levels``."""
        self._check_fitted()
        return self.score_pooled(self.pooled_features(self._features(images, self._needed_levels())))

    def score_pooled(self, pooled_levels):
        """Per-level distances ``[B, L]`` of pooled features (:meth:`pooled_features`)."""
        self._check_fitted()
        cols = []
        for f, (mean, prec) in zip(pooled_levels, self._tensors()):
            diff = f - mean[None, :]
            d2 = ops.sum(ops.matmul(diff, prec) * diff, axis=-1)
            cols.append(ops.sqrt(ops.maximum(d2, 0.0)))
        return ops.stack(cols, axis=1)

    def score_batch(self, images):
        return ops.sum(self.score_levels(images), axis=1), None

    def gaussian_score_model(self):
        # Score = sum over levels of sqrt(d2); d2 ~ chi2(components kept) under each level's Gaussian.
        self._check_fitted()
        return {"dofs": [int(k) for k in self.n_components_], "combine": "sum"}

    # -- persistence -----------------------------------------------------------
    def _save_state(self, dirpath: str) -> None:
        arrays = {"shrinkage": self.shrinkage_, "n_components": self.n_components_, "n_train": np.int64(self.n_train_)}
        for i, (m, p) in enumerate(zip(self.means_, self.precisions_)):
            arrays[f"mean_{i}"], arrays[f"precision_{i}"] = m, p
        save_arrays(os.path.join(dirpath, STATE_FILE), **arrays)
        self._save_extractor(dirpath)

    def _load_state(self, dirpath: str) -> None:
        a = load_arrays(os.path.join(dirpath, STATE_FILE))
        n = len(self.levels)
        self.means_ = [a[f"mean_{i}"] for i in range(n)]
        self.precisions_ = [a[f"precision_{i}"] for i in range(n)]
        self.shrinkage_, self.n_components_ = a["shrinkage"], a["n_components"]
        self.n_train_ = int(a["n_train"])
        self._cache = None
        self._load_extractor(dirpath)


def _precision(cov: np.ndarray, npca_variance):
    """Inverse covariance; with NPCA, the pseudo-inverse restricted to the low-variance components."""
    if npca_variance is None:
        return np.linalg.inv(cov), cov.shape[0]
    vals, vecs = np.linalg.eigh(cov)  # ascending
    desc = vals[::-1]
    # variance explained by the components strictly larger than each one
    above = np.concatenate([[0.0], np.cumsum(desc)[:-1]]) / desc.sum()
    keep = (above >= float(npca_variance))[::-1]  # back to ascending order
    if not keep.any():
        keep[0] = True
    v = vecs[:, keep]
    return (v / vals[keep]) @ v.T, int(keep.sum())
