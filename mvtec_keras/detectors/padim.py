"""PaDiM: a Gaussian per feature-map position (Defard et al., 2020).

The chosen backbone taps are brought to the finest tap's resolution (nearest
upsampling), concatenated, and a seeded random subset of ``n_features``
channels is kept. At every position a mean and covariance (+ ``eps * I``) are
streamed over the training images; precision matrices come from one batched
inverse. The anomaly map is the per-position Mahalanobis distance, upsampled
bilinearly to the input size and blurred; the image score is its maximum.
"""

from __future__ import annotations

import os

import numpy as np
from keras import ops

from ..errors import InputError
from .base import Detector, load_arrays, register_detector, save_arrays
from .components.backbone import BackboneMixin, iter_images, to_rgb
from .components.feature_maps import resize, upsample_blur
from .components.gaussian import GaussianStats, batched_inverse

STATE_FILE = "padim_state.npz"
#: positions whose covariances are inverted per batched call (bounds the float64 temporaries:
#: 512 x 100 x 100 x 8 B = 41 MB per copy instead of 251 MB for all 3136 positions at once)
INVERSE_BLOCK = 512


def precisions(stats: GaussianStats, eps: float, consume: bool = False) -> np.ndarray:
    """float32 ``inv(cov + eps I)`` per position, a block of positions per batched inverse.

    ``consume=True`` writes the result over ``stats``' own float64 scatter sums (block ``i``'s float32
    bytes only overlap float64 blocks already read) and then shrinks that buffer to it, so the fit never
    holds both (125 MB less peak memory for PaDiM on Lite0); ``stats`` is unusable afterwards.
    """
    n_pos, d = stats.mean.shape
    base = stats.scatter_buffer() if consume else None
    if base is not None:
        out = base.reshape(-1).view(np.float32)[: n_pos * d * d].reshape(n_pos, d, d)
    else:
        out = np.empty((n_pos, d, d), np.float32)
    for lo in range(0, n_pos, INVERSE_BLOCK):
        block = slice(lo, min(lo + INVERSE_BLOCK, n_pos))
        cov = stats.covariance(ddof=1, positions=block)  # a new array: the block is read before it is written
        diag = np.einsum("...ii->...i", cov)  # writable view of the diagonals
        diag += eps
        out[block] = batched_inverse(cov)
    if base is None:
        return out
    stats.invalidate()
    del out
    base.resize(((n_pos * d * d + 1) // 2,), refcheck=False)  # realloc: the float64 tail is given back
    return base.view(np.float32)[: n_pos * d * d].reshape(n_pos, d, d)


@register_detector("padim")
class PadimDetector(BackboneMixin, Detector):
    has_maps = True

    def __init__(
        self,
        backbone="efficientnet-b0",
        weights="imagenet",
        input_size=None,
        levels=(3, 4, 6),
        n_features=100,
        eps=0.01,
        sigma=4.0,
        seed=0,
    ):
        self._init_backbone(backbone, weights, input_size)
        self.levels = levels
        self.n_features = n_features
        self.eps = eps
        self.sigma = sigma
        self.seed = seed

    def _concat(self, images):
        """Taps at the finest tap's resolution, concatenated: [B, h, w, C]."""
        return self.concat_levels(self._features(images, self._needed_levels()))

    @staticmethod
    def concat_levels(level_features):
        """The extractor's level tensors -> one map at the finest level's resolution, [B, h, w, C]."""
        size = max((tuple(f.shape[1:3]) for f in level_features), key=lambda s: s[0] * s[1])
        return ops.concatenate([resize(f, size, "nearest") for f in level_features], axis=-1)

    def _channel_subset(self, channels: int) -> np.ndarray:
        """The seeded random subset of channels (fewer than asked if the taps have fewer)."""
        if int(self.n_features) < 1:
            raise InputError(f"n_features must be >= 1, got {self.n_features}")
        rng = np.random.default_rng(int(self.seed))
        return np.sort(rng.permutation(channels)[: min(int(self.n_features), channels)]).astype(np.int32)

    # -- fitting ---------------------------------------------------------------
    def _fit(self, train, validation=None, batch_size: int = 16, progress: bool = False, **kwargs) -> None:
        # One set of sums per tf.distribute replica (one without a strategy), merged exactly at the end.
        replica_stats: list = []
        for x in iter_images(train, batch_size, progress):
            for r, concat in enumerate(self._per_replica(self._concat, x)):
                while len(replica_stats) <= r:
                    replica_stats.append(self.new_statistics())
                self.accumulate(replica_stats[r], concat)
        # the replicas' sums are this fit's own: combined in place, not copied
        stats = self.merge_statistics(replica_stats, copy=False) if replica_stats else self.new_statistics()
        self.fit_statistics(stats, consume=True)

    # The fit in three steps, so that sums over disjoint parts of the data (replicas, or the
    # classes of a leave-one-class-out benchmark) can be made once and combined exactly.
    def new_statistics(self) -> dict:
        """Empty sums: per-position Gaussian moments and the feature map's shape."""
        # float32 chunk products (float64 sums): fast for [positions, d, d], ~1e-6 relative
        return {"gaussian": GaussianStats(product_dtype="float32"), "shape": None, "idx": None}

    def accumulate(self, stats: dict, concat) -> None:
        """Add a batch of concatenated taps (:meth:`concat_levels`) to ``stats``."""
        b, h, w, c = concat.shape
        if stats["idx"] is None:
            stats["idx"], stats["shape"] = self._channel_subset(int(c)), (int(h), int(w))
        elif (h, w) != stats["shape"]:
            raise InputError(f"training images give feature maps {h}x{w}, earlier ones "
                             f"{stats['shape'][0]}x{stats['shape'][1]}")
        emb = ops.convert_to_numpy(ops.take(concat, stats["idx"], axis=-1))
        stats["gaussian"].update(emb.reshape(b, h * w, -1))

    def merge_statistics(self, parts: list, copy: bool = True) -> dict:
        """Sums of several disjoint parts: a new object, or with ``copy=False`` the first part,
        grown in place (no copy of the [positions, d, d] sums; the other parts are left as they are)."""
        out, rest = (self.new_statistics(), parts) if copy else (parts[0], parts[1:])
        for part in rest:
            if part["idx"] is None:
                continue
            if out["shape"] is not None and part["shape"] != out["shape"]:
                raise InputError(f"cannot merge feature maps {part['shape']} and {out['shape']}")
            out["idx"], out["shape"] = part["idx"], part["shape"]
            out["gaussian"].merge(part["gaussian"])
        return out

    def fit_statistics(self, stats: dict, consume: bool = False) -> "PadimDetector":
        """Finish the fit from summed statistics: per-position mean and precision. ``consume=True`` lets the
        precisions take over the sums' memory (``stats`` is then spent; the fit's own sums are)."""
        if stats["idx"] is None:
            raise InputError("PaDiM got no training images")
        g = stats["gaussian"]
        self._cache = None
        self.channel_idx_ = stats["idx"]
        self.feature_shape_ = np.asarray(stats["shape"], dtype=np.int64)
        self.mean_ = g.mean.astype(np.float32)  # [P, d]
        self.n_train_ = int(g.n)
        self.precision_ = precisions(g, float(self.eps), consume=consume)  # [P, d, d]
        return self

    # -- scoring ---------------------------------------------------------------
    def _tensors(self):
        if getattr(self, "_cache", None) is None:
            self._cache = {
                "idx": ops.convert_to_tensor(self.channel_idx_, dtype="int32"),
                "mean": ops.convert_to_tensor(self.mean_),
                "prec": ops.convert_to_tensor(self.precision_),
            }
        return self._cache

    def distance_map(self, images):
        """Per-position Mahalanobis distance at feature resolution, [B, h, w]."""
        self._check_fitted()
        return self.distance_map_of(self._concat(images))

    def distance_map_of(self, concat):
        """:meth:`distance_map` from concatenated taps (:meth:`concat_levels`)."""
        self._check_fitted()
        emb = ops.take(concat, self._tensors()["idx"], axis=-1)
        b, h, w, d = emb.shape
        if (h, w) != tuple(int(v) for v in self.feature_shape_):
            raise InputError(
                f"images give feature maps {h}x{w} but the detector was fitted on "
                f"{self.feature_shape_[0]}x{self.feature_shape_[1]}: use the training image size"
            )
        t = self._tensors()
        diff = ops.reshape(emb, (-1, h * w, d)) - t["mean"][None]
        d2 = ops.sum(ops.einsum("bpi,pij->bpj", diff, t["prec"]) * diff, axis=-1)
        return ops.reshape(ops.sqrt(ops.maximum(d2, 0.0)), (-1, h, w))

    def score_batch(self, images):
        # Eager: the backbone is already a traced graph; the rest is a handful of
        # large ops, so tracing them would cost more than it saves.
        x = to_rgb(images)
        return self.score_concat(self._concat(x), tuple(x.shape[1:3]))

    def score_concat(self, concat, size):
        """Image scores and anomaly maps at ``size`` from concatenated taps (:meth:`concat_levels`)."""
        maps = upsample_blur(self.distance_map_of(concat), size, self.sigma)
        return ops.max(maps, axis=(1, 2)), maps

    def gaussian_score_model(self):
        # Score = max over positions of the (upsampled, blurred) distance; d2 ~ chi2(d) per position.
        self._check_fitted()
        positions, d = self.mean_.shape
        return {"dofs": [int(d)] * int(positions), "combine": "max"}

    # -- persistence -----------------------------------------------------------
    def _save_state(self, dirpath: str) -> None:
        save_arrays(
            os.path.join(dirpath, STATE_FILE),
            channel_idx=self.channel_idx_,
            feature_shape=self.feature_shape_,
            mean=self.mean_,
            precision=self.precision_,
            n_train=np.int64(self.n_train_),
        )
        self._save_extractor(dirpath)

    def _load_state(self, dirpath: str) -> None:
        a = load_arrays(os.path.join(dirpath, STATE_FILE))
        self.channel_idx_, self.feature_shape_ = a["channel_idx"], a["feature_shape"]
        self.mean_, self.precision_ = a["mean"], a["precision"]
        self.n_train_ = int(a["n_train"])
        self._cache = None
        self._load_extractor(dirpath)
