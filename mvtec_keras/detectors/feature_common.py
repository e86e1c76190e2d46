"""Shared pieces of the pretrained-feature detectors (Mahalanobis, SPADE, PaDiM, PatchCore).

- backbone handling: build from a name or accept an injected ``keras.Model``;
  save / load the extractor inside the detector folder (self-contained, offline);
- streaming Gaussian statistics (shifted running sums in float64, batched
  Cholesky inverse) and Ledoit-Wolf shrinkage from those streamed moments;
- nearest neighbours in Keras ops (bank chunked to bound memory; a fused
  matmul + min for the nearest distance alone);
- bilinear upsampling + Gaussian blur of anomaly maps;
- greedy (farthest-point) coreset selection.
"""

from __future__ import annotations

import copy
import os
from typing import Iterator, Optional

import numpy as np

import keras
from keras import ops
from threadpoolctl import threadpool_limits

from .. import backends
from ..errors import InputError
from .base import _iterate_batches, reading_state

EXTRACTOR_WEIGHTS = "extractor.weights.h5"
EXTRACTOR_MODEL = "extractor.keras"


# --------------------------------------------------------------------------- backbone
class BackboneMixin:
    """Backbone handling shared by the feature detectors.

    ``backbone`` is either a name for :func:`build_feature_extractor` or a
    ``keras.Model`` returning ``{"level<i>": [B, h, w, c]}`` (tests, custom
    nets). A Model is not part of the config; it is saved whole with the detector.
    """

    def _init_backbone(self, backbone, weights, input_size):
        if isinstance(backbone, keras.Model):
            self._extractor = backbone
            self.backbone = None
        else:
            self._extractor = None
            self.backbone = backbone
        self.weights = weights
        self.input_size = input_size

    def _needed_levels(self) -> tuple:
        """The extractor taps this detector reads (default: its ``levels``)."""
        return tuple(int(v) for v in self.levels)

    @property
    def extractor(self) -> keras.Model:
        if self._extractor is None:
            if self.backbone is None:
                raise InputError("no backbone: pass a backbone name or a keras.Model")
            from ..features.extractor import build_feature_extractor

            self._extractor = build_feature_extractor(
                self.backbone, weights=self.weights, levels=tuple(self._needed_levels()), input_size=self.input_size
            )
        return self._extractor

    def _save_extractor(self, dirpath: str) -> None:
        if self.backbone is None:  # injected model: keep architecture and weights
            self.extractor.save(os.path.join(dirpath, EXTRACTOR_MODEL))
        else:
            self.extractor.save_weights(os.path.join(dirpath, EXTRACTOR_WEIGHTS))

    def _load_extractor(self, dirpath: str) -> None:
        full = os.path.join(dirpath, EXTRACTOR_MODEL)
        if os.path.isfile(full):
            with reading_state(full):
                self._extractor = keras.saving.load_model(full, compile=False)
            return
        path = os.path.join(dirpath, EXTRACTOR_WEIGHTS)
        if not os.path.isfile(path):
            raise InputError(f"{dirpath}: saved detector lacks {EXTRACTOR_WEIGHTS}")
        from ..features.extractor import build_feature_extractor

        # Rebuild without downloading anything, then restore the saved weights.
        self._extractor = build_feature_extractor(
            self.backbone, weights=None, levels=tuple(self._needed_levels()), input_size=self.input_size
        )
        with reading_state(path):
            self._extractor.load_weights(path)

    def _features(self, images, levels) -> list:
        """Run the extractor; returns the requested levels as a list of tensors."""
        ext, x = self.extractor, to_rgb(images)
        if not backends.is_tensorflow():
            if getattr(self, "_extract_for", None) != id(ext):
                self._extract_fn = backends.jit(lambda t: ext(t, training=False), ext.variables)
                self._extract_for = id(ext)
            out = self._extract_fn(x)
        else:
            out = self._tf_features(ext, x, images)
        try:
            return [out[f"level{int(lv)}"] for lv in levels]
        except KeyError as e:
            raise InputError(f"backbone output lacks {e.args[0]}; it has {sorted(out)}") from None

    def _tf_features(self, ext, x, images):
        import tensorflow as tf

        source = getattr(self, "_feature_source", None)
        if source is not None and tf.executing_eagerly():
            # another implementation of the same backbone (export: the int8 model's features), used for
            # fitting and scoring eagerly; traced graphs always read the Keras backbone
            return source(images)
        if not tf.executing_eagerly():
            # Inside a trace (an export graph): call the model directly so static shapes,
            # the batch size included, survive into the graph.
            return ext(x, training=False)
        if getattr(self, "_extract_for", None) != (id(ext), tuple(x.shape[1:])):
            # A traced graph runs the backbone ~2x faster than eager dispatch; any batch size, one trace.
            self._extract_fn = batch_function(lambda t: ext(t, training=False), x)
            self._extract_for = (id(ext), tuple(x.shape[1:]))
        return self._extract_fn(x)

    def _per_replica(self, fn, images) -> list:
        """``fn(images)`` with the batch split over the replicas of the current ``tf.distribute``
        strategy: one result per replica, in replica order (replica r holds the r-th contiguous
        part of the batch, so concatenating the results gives the one-device stream). Without a
        multi-replica strategy: ``[fn(images)]``. The extractor must have been built in the
        strategy's scope (it is, when ``fit`` runs there).

        Under ``MultiWorkerMirroredStrategy`` every worker passes the same batch; each runs only its own
        replicas' parts, and the parts are gathered over the workers in replica order, so every worker
        gets ``[fn(images)]`` as one device would (and its statistics or bank end up the same)."""
        if not backends.is_tensorflow():
            return [fn(images)]  # tf.distribute is TensorFlow's; other backends fit on one device
        import tensorflow as tf

        strategy = tf.distribute.get_strategy()
        n = strategy.num_replicas_in_sync
        if n == 1:
            return [fn(images)]
        multi_worker = strategy.extended._in_multi_worker_mode()
        # Build (and load the weights of) the backbone here, in the strategy's scope: built lazily inside
        # the replicas' traced function, loading a weights file fails (its tensors would be out of scope).
        self.extractor  # noqa: B018
        x = tf.convert_to_tensor(images, tf.float32)
        if int(x.shape[0]) < n:
            # A replica would get no image, and backbone layers fail on an empty batch: a batch this
            # small (a last one) runs whole on this device (on every worker alike: no exchange needed).
            return [fn(x)]
        parts = np.array_split(np.arange(int(x.shape[0])), n)
        bounds = [(int(p[0]), int(p[-1]) + 1) if len(p) else (0, 0) for p in parts]
        dist_x = strategy.experimental_distribute_values_from_function(
            lambda ctx: x[slice(*bounds[ctx.replica_id_in_sync_group])])
        key = (fn, tuple(x.shape[1:]))
        if getattr(self, "_replica_key", None) != key:
            # One trace per function and image shape; replicas run the traced fn on their own devices.
            def run(t):
                out = strategy.run(fn, args=(t,))
                if multi_worker:  # the other workers' replicas are not local: gather them (in replica order)
                    out = tf.nest.map_structure(lambda v: strategy.gather(v, axis=0), out)
                return out

            self._replica_fn = tf.function(run, reduce_retracing=True)
            self._replica_key = key
        out = self._replica_fn(dist_x)
        if multi_worker:
            return [out]
        leaves = [strategy.experimental_local_results(v) for v in tf.nest.flatten(out)]
        return [tf.nest.pack_sequence_as(out, [leaf[r] for leaf in leaves]) for r in range(n)]


def batch_function(fn, example):
    """``tf.function`` of ``fn`` traced once for ``example``'s shape with any batch size (TF backend)."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, *example.shape[1:]], tf.float32)
    return tf.function(fn, input_signature=[spec], autograph=False)


def to_rgb(images):
    """float32 [B, H, W, C] with C in {1, 3} -> [B, H, W, 3] (grey tiled)."""
    x = ops.convert_to_tensor(images, dtype="float32")
    if len(x.shape) != 4 or x.shape[-1] not in (1, 3):
        raise InputError(f"images must be [B, H, W, 1|3], got shape {tuple(x.shape)}")
    if x.shape[-1] == 1:
        x = ops.tile(x, (1, 1, 1, 3))
    return x


def iter_images(data, batch_size: int, progress: bool = False) -> Iterator[np.ndarray]:
    """Image batches (float32 numpy) of a dataset of dicts or an image array (``progress``: a bar)."""
    for batch in _iterate_batches(data, batch_size, progress=progress, desc="fitting"):
        if "image" not in batch:
            raise InputError("training data has no 'image' entry")
        yield np.asarray(batch["image"], dtype=np.float32)


class ReservoirSlots:
    """Where each item of a stream goes in a seeded uniform sample of at most ``capacity`` items
    (reservoir sampling, Algorithm R, one batch at a time).

    Item ``t`` (0-based) takes slot ``t`` while ``t < capacity``; after that it replaces a random slot
    ``j <= t``, kept only when ``j < capacity``. Only the stream's length and the seed decide, not how
    it is batched (numpy draws one bounded integer per item; tested), so a sample can be drawn again from
    indices alone or from differently batched data (bench/cifar10.py's shared pass does both).
    """

    def __init__(self, capacity: int, seed: int = 0):
        self.capacity = int(capacity)
        self.seen = 0
        self._rng = np.random.default_rng(seed)

    def next(self, n: int) -> np.ndarray:
        """Slots of the next ``n`` items, ``-1`` for the dropped ones (a repeated slot: the later item wins)."""
        t = self.seen + np.arange(int(n))
        slots = t.copy()
        over = t >= self.capacity
        if over.any():
            j = self._rng.integers(0, t[over] + 1)
            slots[over] = np.where(j < self.capacity, j, -1)
        self.seen += int(n)
        return slots

    def place(self, kept: list, n: int, item=lambda i: i) -> None:
        """Put the next ``n`` items into ``kept`` (the sample so far, a list): ``item(i)`` is made only for
        the ``i``-th item of these ``n`` that is kept (by default its index)."""
        for i, slot in enumerate(self.next(n)):
            if slot == len(kept):
                kept.append(item(i))
            elif slot >= 0:
                kept[slot] = item(i)


def pooled(feature):
    """Global average pooling of [B, h, w, c] (a [B, c] input passes through).

    Rows first, then columns: LiteRT's and onnxruntime's MEAN sum sequentially in float32, and one
    mean over all 112 x 112 stem positions drifted enough that exported Mahalanobis scores on bottle
    differed from TF's by 4e-4 relative; over h, then w, they agree within 1e-5."""
    if len(feature.shape) != 4:
        return feature
    return ops.mean(ops.mean(feature, axis=1), axis=1)


def resize(x, size, method="bilinear"):
    """Resize [B, h, w, c] to ``size``; a no-op when already there."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    return ops.image.resize(x, size, interpolation=method, antialias=False)


# --------------------------------------------------------------------------- Gaussian statistics
#: samples buffered before a fold into the running sums (bounded memory, few large matmuls)
STATS_CHUNK = 128
#: at most this many bytes of buffered samples, and of each fold's temporaries (PaDiM's
#: [images, 3136, 100] rows are 1.2 MB per image: 128 of them would be 160 MB, copied thrice)
STATS_CHUNK_BYTES = 32 << 20


class GaussianStats:
    """Streaming mean and scatter matrix over the leading axis, float64.

    ``update(x)`` takes ``[n, ..., d]``: one Gaussian per trailing position
    (``...``). Memory does not grow with the number of samples: samples are
    buffered up to ``chunk`` rows (or :data:`STATS_CHUNK_BYTES`), then folded
    into running sums of ``y = x - shift`` and ``y y^T`` (float64), with
    ``shift`` the first batch mean. Shifting keeps the sums well conditioned
    (the shifted-data algorithm; equal to Chan's pairwise merge up to rounding)
    and makes each fold a batched matmul over blocks of positions (float64 by
    default, ``product_dtype`` to trade precision for speed). With
    ``fourth=True`` it also keeps the fourth-order moments that Ledoit-Wolf needs.

    The sums are plain sums, so two instances fed disjoint parts of the data
    merge exactly (:meth:`merge`, used to combine replicas or workers).
    """

    def __init__(self, fourth: bool = False, chunk: Optional[int] = None, product_dtype: str = "float64"):
        self.fourth = fourth
        self.product_dtype = product_dtype
        self.chunk = STATS_CHUNK if chunk is None else chunk
        self._n = 0
        self._buf, self._nbuf, self._buf_bytes = [], 0, 0
        self._shift = self._s1 = self._s2 = None
        self._s4 = None  # sum ||y||^4
        self._s3 = None  # sum ||y||^2 y

    def update(self, x) -> None:
        x = np.asarray(x)
        if x.shape[0] == 0:
            return
        self._buf.append(x)
        self._nbuf += x.shape[0]
        self._buf_bytes += x.nbytes
        if self._nbuf >= self.chunk or self._buf_bytes >= STATS_CHUNK_BYTES:
            self._flush()

    def _flush(self) -> None:
        if getattr(self, "_spent", False):
            raise RuntimeError("these statistics were consumed by a fit (consume=True) and hold no sums")
        if not self._buf:
            return
        x = np.concatenate(self._buf) if len(self._buf) > 1 else self._buf[0]
        self._buf, self._nbuf, self._buf_bytes = [], 0, 0
        if self._shift is None:
            self._shift = x.mean(axis=0, dtype=np.float64)
            self._s1 = np.zeros_like(self._shift)
            self._s2 = np.zeros(self._shift.shape + self._shift.shape[-1:])
            if self.fourth:
                self._s4, self._s3 = np.zeros(self._shift.shape[:-1]), np.zeros_like(self._shift)
        self._n += x.shape[0]
        n, d = x.shape[0], x.shape[-1]
        xs = x.reshape(n, -1, d)  # [n, P, d] (P = 1 for a single Gaussian)
        shift = self._shift.reshape(-1, d)
        s1, s2 = self._s1.reshape(-1, d), self._s2.reshape(-1, d, d)
        s3 = self._s3.reshape(-1, d) if self.fourth else None
        s4 = self._s4.reshape(-1) if self.fourth else None
        # Blocks of positions keep each fold's temporaries (the shifted block, its transpose,
        # the [block, d, d] product) near STATS_CHUNK_BYTES whatever the number of positions.
        per_pos = 8 * (2 * n * d + d * d)
        block = max(1, min(xs.shape[1], STATS_CHUNK_BYTES // per_pos))
        tf = _tf_if_backend()
        for lo in range(0, xs.shape[1], block):
            hi = min(lo + block, xs.shape[1])
            if tf is not None:
                # Products in one batched TF matmul (numpy's stacked small-matrix path is ~10x
                # slower); ``product_dtype="float32"`` is another ~8x faster for PaDiM's
                # [positions, d, d]. The running sums are float64 either way.
                dt = tf.as_dtype(self.product_dtype)
                y = tf.cast(tf.convert_to_tensor(xs[:, lo:hi]), dt) - tf.constant(shift[lo:hi], dt)
                yt = tf.transpose(y, [1, 2, 0])  # [block, d, n]
                s2[lo:hi] += tf.matmul(yt, yt, transpose_b=True).numpy()
            else:
                # Other backends: numpy, as JAX computes in float32 unless x64 is switched on globally.
                dt = np.dtype(self.product_dtype)
                y = xs[:, lo:hi].astype(dt) - shift[lo:hi].astype(dt)
                yt = y.transpose(1, 2, 0)
                s2[lo:hi] += np.matmul(yt, yt.transpose(0, 2, 1))
            if self.fourth:
                y = np.asarray(y).astype(np.float64)
                s1[lo:hi] += np.sum(y, axis=0)
                a = np.sum(y * y, axis=-1)
                s4[lo:hi] += np.sum(a * a, axis=0)
                s3[lo:hi] += np.sum(a[..., None] * y, axis=0)
            elif tf is not None:
                s1[lo:hi] += tf.reduce_sum(tf.cast(y, tf.float64), axis=0).numpy()
            else:
                s1[lo:hi] += np.sum(y.astype(np.float64), axis=0)

    def merge(self, other: "GaussianStats") -> "GaussianStats":
        """Add ``other``'s samples to these sums (exact: the sums are re-shifted to one origin)."""
        other._flush()
        self._flush()
        if other._shift is None:
            return self
        if self._shift is None:
            for k in ("_n", "_shift", "_s1", "_s2", "_s3", "_s4"):
                setattr(self, k, copy.deepcopy(getattr(other, k)))
            return self
        if self.fourth != other.fourth:
            raise ValueError("cannot merge statistics with and without fourth moments")
        # other's sums are about its shift b; move them to ours, a: y' = y + (b - a) = y + c
        c = other._shift - self._shift
        m = other._n
        s1o = other._s1 + m * c
        cross = np.multiply(other._s1[..., :, None], c[..., None, :])
        s2o = other._s2 + cross + np.swapaxes(cross, -1, -2) + m * np.multiply(c[..., :, None], c[..., None, :])
        if self.fourth:
            # ||y + c||^2 = ||y||^2 + 2 y.c + ||c||^2, expanded term by term
            cc = np.sum(c * c, axis=-1)
            s2c = np.einsum("...ij,...j->...i", other._s2, c)
            y_c = np.sum(other._s1 * c, axis=-1)  # sum y.c
            tr = np.trace(other._s2, axis1=-2, axis2=-1)  # sum ||y||^2
            s3c = np.sum(other._s3 * c, axis=-1)  # sum ||y||^2 y.c
            cs2c = np.sum(c * s2c, axis=-1)  # sum (y.c)^2
            s4o = other._s4 + 4 * s3c + 2 * cc * tr + 4 * cs2c + 4 * cc * y_c + m * cc * cc
            s3o = other._s3 + 2 * s2c + cc[..., None] * other._s1 + tr[..., None] * c \
                + 2 * y_c[..., None] * c + m * cc[..., None] * c
            self._s4 = self._s4 + s4o
            self._s3 = self._s3 + s3o
        self._s1 = self._s1 + s1o
        self._s2 = self._s2 + s2o
        self._n += m
        return self

    @property
    def n(self) -> int:
        return self._n + self._nbuf

    @property
    def mean(self) -> np.ndarray:
        self._flush()
        return self._shift + self._s1 / self.n

    @property
    def scatter(self) -> np.ndarray:
        """Sum of outer products of deviations from the mean."""
        return self.scatter_of()

    def scatter_buffer(self):
        """The float64 array holding the summed outer products, for a caller that finishes with these sums
        and reuses their memory (then calls :meth:`invalidate`); None when it is not a plain owned array."""
        self._flush()
        s2 = self._s2
        return s2 if isinstance(s2, np.ndarray) and s2.flags.owndata and s2.flags.c_contiguous else None

    def invalidate(self) -> None:
        """Forget the sums (their memory was reused): later use fails loudly instead of reading garbage."""
        self._s2 = self._s1 = self._shift = self._s3 = self._s4 = None
        self._spent = True

    def scatter_of(self, positions=slice(None)) -> np.ndarray:
        """:attr:`scatter` of some positions only (a slice of the first position axis)."""
        self._flush()
        if self._s2.ndim == 2:
            positions = slice(None)
        d = self._s1[positions] / self.n
        out = np.multiply(d[..., :, None], d[..., None, :])
        out *= -self.n
        out += self._s2[positions]  # in place: these can be [positions, d, d]
        return out

    def covariance(self, ddof: int = 1, positions=slice(None)) -> np.ndarray:
        """Covariance (of ``positions`` only, to finish a large stack block by block)."""
        self._flush()
        if self.n - ddof <= 0:
            raise InputError(f"need more than {ddof} training sample(s) to estimate a covariance, got {self.n}")
        cov = self.scatter_of(positions)
        cov /= self.n - ddof
        return cov

    def sum_fourth(self) -> np.ndarray:
        """``sum_k ||x_k - mean||^4`` from the shifted moments (exact algebra)."""
        if not self.fourth:
            raise RuntimeError("GaussianStats(fourth=True) is needed for Ledoit-Wolf")
        self._flush()
        n, d = self.n, self._s1 / self.n  # d = mean - shift
        c = np.sum(d * d, axis=-1)
        # expand ||y - d||^4 with y = x - shift
        syy_d = np.einsum("...ij,...j->...i", self._s2, d)
        return (
            self._s4
            - 4.0 * np.sum(d * self._s3, axis=-1)
            + 4.0 * np.sum(d * syy_d, axis=-1)
            + 2.0 * c * np.trace(self._s2, axis1=-2, axis2=-1)
            - 4.0 * c * np.sum(d * self._s1, axis=-1)
            + n * c * c
        )


def batched_inverse(spd) -> np.ndarray:
    """Inverse of a stack of SPD matrices [..., d, d] (float64) in one batched Cholesky solve.

    TF's batched kernels are multithreaded; numpy's stacked ``inv`` runs one
    small LAPACK call per matrix and is an order of magnitude slower here (it
    is the fallback on the other Keras backends).
    """
    tf = _tf_if_backend()
    if tf is None:
        return np.linalg.inv(np.asarray(spd, np.float64))
    a = tf.convert_to_tensor(spd, tf.float64)
    eye = tf.eye(a.shape[-1], batch_shape=a.shape[:-2], dtype=tf.float64)
    return tf.linalg.cholesky_solve(tf.linalg.cholesky(a), eye).numpy()


def _tf_if_backend():
    """TensorFlow when it is the Keras backend (its fast batched kernels), else None (numpy)."""
    if not backends.is_tensorflow():
        return None
    import tensorflow as tf

    return tf


def ledoit_wolf(stats: GaussianStats):
    """Ledoit-Wolf shrunk covariance from streamed moments.

    Same estimator as ``sklearn.covariance.LedoitWolf`` (biased empirical
    covariance shrunk towards ``mu * I``) without holding the samples.
    Returns ``(covariance, shrinkage)`` for a single Gaussian.
    """
    emp = stats.scatter / stats.n
    n, p = stats.n, emp.shape[-1]
    if p == 1:
        return emp, 0.0
    mu = np.trace(emp) / p
    delta_ = np.sum(emp * emp)  # = sum((X^T X)^2) / n^2
    beta_ = stats.sum_fourth()  # = sum((X^2)^T X^2)
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2.0 * mu * np.trace(emp) + p * mu * mu) / p
    beta = min(beta, delta)
    shrinkage = 0.0 if beta == 0 else float(beta / delta)
    return (1.0 - shrinkage) * emp + shrinkage * mu * np.eye(p), shrinkage


# --------------------------------------------------------------------------- maps
def gaussian_kernel1d(sigma: float) -> np.ndarray:
    radius = int(4.0 * sigma + 0.5)  # same truncation as scipy.ndimage
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def gaussian_blur(maps, sigma: float):
    """Separable Gaussian blur of [B, H, W] maps, reflect padding (scipy's 'reflect')."""
    if not sigma or sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma)
    r = len(k) // 2
    x = ops.convert_to_tensor(maps, dtype="float32")[..., None]
    h, w = x.shape[1], x.shape[2]
    if r >= min(h, w):  # reflect padding needs r < size; small maps take a shorter kernel
        k = gaussian_kernel1d(min(sigma, (min(h, w) - 1) / 4.0)) if min(h, w) > 1 else np.ones(1, np.float32)
        r = len(k) // 2
    # 'symmetric' mirrors the edge pixel too, which is scipy.ndimage's 'reflect'.
    x = ops.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="symmetric")
    x = ops.conv(x, ops.convert_to_tensor(k.reshape(-1, 1, 1, 1)), padding="valid")
    x = ops.conv(x, ops.convert_to_tensor(k.reshape(1, -1, 1, 1)), padding="valid")
    return x[..., 0]


def upsample_blur(maps, size, sigma: float):
    """[B, h, w] -> [B, H, W]: bilinear upsampling then Gaussian blur."""
    x = resize(ops.convert_to_tensor(maps, dtype="float32")[..., None], size, "bilinear")[..., 0]
    return gaussian_blur(x, sigma)


# --------------------------------------------------------------------------- nearest neighbours
def argmin(x, axis: int):
    """``ops.argmin`` (int32) without Keras' negative-zero test on floats.

    That test reads the sign bit with bitwise ops, which LiteRT has no builtin
    for; distances never depend on the sign of zero.
    """
    tf = _tf_if_backend()
    if tf is not None:
        return tf.argmin(x, axis=axis, output_type=tf.int32)
    return ops.cast(ops.argmin(x, axis=axis), "int32")


def argmax(x, axis: int):
    """``ops.argmax`` (int32), see :func:`argmin`."""
    tf = _tf_if_backend()
    if tf is not None:
        return tf.argmax(x, axis=axis, output_type=tf.int32)
    return ops.cast(ops.argmax(x, axis=axis), "int32")


def squared_distances(a, b, b_sq=None):
    """Pairwise squared Euclidean distances [M, N] via one matmul (clipped at 0)."""
    a_sq = ops.sum(a * a, axis=-1, keepdims=True)
    if b_sq is None:
        b_sq = ops.sum(b * b, axis=-1)
    return ops.maximum(a_sq - 2.0 * ops.matmul(a, ops.transpose(b)) + b_sq[None, :], 0.0)


def knn(queries, bank, k: int = 1, bank_sq=None, max_elements: int = 1 << 24):
    """k nearest rows of ``bank`` for each query: ``(distances [M, k], indices [M, k])``.

    The bank is processed in chunks so the distance block stays below
    ``max_elements`` floats (64 MB by default: on the 2-core CPU, blocks of 1 << 24 scored
    PatchCore about 1.4x faster than 1 << 22; larger ones were not reliably faster end to
    end); a running top-k is merged chunk by chunk.
    ``bank_sq`` (squared row norms) can be passed when the bank is reused.
    """
    queries = ops.convert_to_tensor(queries, dtype="float32")
    bank = ops.convert_to_tensor(bank, dtype="float32")
    if bank_sq is None:
        bank_sq = ops.sum(bank * bank, axis=-1)
    m, n = queries.shape[0] or 16384, int(bank.shape[0])  # m is unknown inside a relaxed trace
    k = min(int(k), n)
    chunk = max(k, min(n, max_elements // max(m, 1)))
    # |q - b|^2 = |q|^2 + (|b|^2 - 2 q.b); the bracket is one matmul of [q, 1] with
    # [-2 b, |b|^2], so ranking a chunk costs the matmul plus a single pass.
    q_aug = ops.concatenate([queries, ops.ones_like(queries[:, :1])], axis=1)
    q_sq = ops.sum(queries * queries, axis=1, keepdims=True)
    best_d = best_i = None
    for start in range(0, n, chunk):
        b_aug = ops.concatenate([-2.0 * bank[start : start + chunk], bank_sq[start : start + chunk, None]], axis=1)
        part = ops.matmul(q_aug, ops.transpose(b_aug))  # squared distance minus |q|^2
        if k == 1:  # argmin + gather is cheaper than top_k
            ci = argmin(part, axis=1)[:, None]
            cd = ops.take_along_axis(part, ci, axis=1)
        else:
            neg, ci = ops.top_k(-part, min(k, int(part.shape[1])))
            cd, ci = -neg, ops.cast(ci, "int32")
        ci = ci + start
        if best_d is None:
            best_d, best_i = cd, ci
        elif k == 1:
            better = cd < best_d
            best_d, best_i = ops.where(better, cd, best_d), ops.where(better, ci, best_i)
        else:
            d_all = ops.concatenate([best_d, cd], axis=1)
            i_all = ops.concatenate([best_i, ci], axis=1)
            neg, pos = ops.top_k(-d_all, k)
            best_d, best_i = -neg, ops.take_along_axis(i_all, pos, axis=1)
    return ops.sqrt(ops.maximum(best_d + q_sq, 0.0)), best_i


#: gallery block of :func:`min_distances`: at most this many distances exist at a time
#: (8 MB: SPADE's 3136 level-3 queries x 668 gallery rows stay in this CPU's L3 cache)
MIN_BLOCK_ELEMENTS = 1 << 21


def augment_bank(bank):
    """``[..., c] -> [..., c + 1]``: rows ``[-2 b, |b|^2]``, so that ``[q, 1] . row = |q - b|^2 - |q|^2``.

    Computed once per bank (at fit or load), not once per query block.
    """
    bank = ops.convert_to_tensor(bank, dtype="float32")
    return ops.concatenate([-2.0 * bank, ops.sum(bank * bank, axis=-1, keepdims=True)], axis=-1)


def min_distances(queries, gallery_aug, max_elements: Optional[int] = None):
    """Euclidean distance from each query ``[M, c]`` to its nearest gallery row -> ``[M]``.

    ``gallery_aug`` ``[N, c + 1]`` comes from :func:`augment_bank`. Exact: every
    distance is computed (``|q|^2 + |b|^2 - 2 q.b`` in float32, so the last digits
    differ from a direct difference), but the min over the gallery is reduced block
    by block right after each block's matmul, so the ``[M, N]`` matrix never exists
    and no index is tracked. With few channels (SPADE's level 3 has 24) a block is
    cheap to compute but costly to move, so it is kept cache-sized (SPADE's search +
    maps: 0.85 -> 0.53 CPU s per image against :func:`knn`'s 64 MB blocks with argmin
    and gathers, bench/spade_speed.py).
    """
    queries = ops.convert_to_tensor(queries, dtype="float32")
    m, n = int(queries.shape[0]), int(gallery_aug.shape[0])
    max_elements = MIN_BLOCK_ELEMENTS if max_elements is None else int(max_elements)
    block = max(1, min(n, max_elements // max(m, 1)))
    q_aug = ops.concatenate([queries, ops.ones_like(queries[:, :1])], axis=1)
    best = None
    for start in range(0, n, block):
        blk = gallery_aug[start : start + block]
        tf = _tf_if_backend()
        if tf is not None:  # no transposed copy of the block (~15 % faster)
            prod = tf.matmul(q_aug, blk, transpose_b=True)
        else:
            prod = ops.matmul(q_aug, ops.transpose(blk))
        part = ops.min(prod, axis=1)
        best = part if best is None else ops.minimum(best, part)
    return ops.sqrt(ops.maximum(best + ops.sum(queries * queries, axis=1), 0.0))


# --------------------------------------------------------------------------- coreset
def greedy_coreset(
    features, n_select: int, proj_dim: Optional[int] = 128, seed: int = 0, start: Optional[int] = None,
    active_size: int = 1 << 13,
):
    """Greedy farthest-point (k-center) selection; returns indices in selection order.

    Points are first projected to ``proj_dim`` dimensions with a seeded Gaussian
    matrix (Johnson-Lindenstrauss). The first point is ``start`` (or a seeded
    random one); each next one is the point farthest from those chosen so far.

    Exact, but each step only touches an *active set*: the ``active_size``
    points with the largest (possibly stale) distance bound. Distances only
    shrink, so a point outside the set whose bound is below the threshold
    ``tau`` cannot be the farthest while the best active point is >= ``tau``.
    When that fails, the next candidates are brought up to date with one
    matmul per lag group and a new round starts. The per-step matvec then runs
    on a cache-sized block instead of the whole point cloud.
    """
    # Thousands of small BLAS calls: one thread avoids the per-call thread hand-off,
    # which costs >10x (matvecs and the refresh matmuls alike) when cores are shared.
    with threadpool_limits(limits=1, user_api="blas"):
        return _greedy_coreset(features, n_select, proj_dim, seed, start, active_size)


def _greedy_coreset(features, n_select, proj_dim, seed, start, active_size):
    x = np.asarray(features, dtype=np.float32)
    n = x.shape[0]
    n_select = int(min(max(n_select, 1), n))
    rng = np.random.default_rng(seed)
    if proj_dim is not None and proj_dim < x.shape[1]:
        proj = rng.standard_normal((x.shape[1], proj_dim)).astype(np.float32) / np.sqrt(proj_dim)
        x = x @ proj  # the one working copy (PatchCore's memory budget counts it)
    else:
        x = np.array(x, dtype=np.float32, order="C")  # a copy: the caller's rows are not centred
    x -= x.mean(axis=0)  # in place; centred: less cancellation in |x|^2 - 2x.c + |c|^2
    x_sq = np.einsum("ij,ij->i", x, x)
    first = int(rng.integers(n)) if start is None else int(start)

    chosen = np.empty(n_select, dtype=np.int64)
    chosen[0] = first
    mind = np.maximum(x_sq - 2.0 * (x @ x[first]) + x_sq[first], 0.0)  # squared distance to the chosen set
    done = np.ones(n, dtype=np.int64)  # how many chosen points each bound accounts for
    target = int(min(n, max(active_size, 1)))
    k = 1
    while k < n_select:
        # New round: threshold = target-th largest bound; refresh those candidates.
        tau = np.partition(mind, n - target)[n - target]
        if tau <= 0 and mind.max() <= 0:  # only duplicates of chosen points remain
            break
        cand = np.flatnonzero(mind >= tau)
        lag = done[cand]
        for v in np.unique(lag[lag < k]):
            sub = cand[lag == v]
            cen = chosen[v:k]
            c2, c_sq = -2.0 * x[cen].T, x_sq[cen]
            rows = max(1, (1 << 24) // len(cen))
            for i in range(0, len(sub), rows):  # blocks of at most 16M distances
                s = sub[i : i + rows]
                d2 = x[s] @ c2
                d2 += c_sq
                mind[s] = np.minimum(mind[s], np.maximum(d2.min(axis=1) + x_sq[s], 0.0))
        done[cand] = k
        xa, xa_sq, ma = x[cand], x_sq[cand], mind[cand]
        k = _farthest_steps(x, x_sq, cand, xa, xa_sq, ma, tau, chosen, k, n_select)
        mind[cand] = ma
        done[cand] = k
    return chosen[:k]


def _farthest_steps(x, x_sq, cand, xa, xa_sq, ma, tau, chosen, k, n_select):
    """Greedy steps inside the active set while its best point beats ``tau``; returns k."""
    while k < n_select:
        j = int(np.argmax(ma))
        if ma[j] < tau or ma[j] <= 0:  # an outside point may now be farther: next round
            break
        p = cand[j]
        chosen[k] = p
        k += 1
        np.minimum(ma, np.maximum(xa_sq - 2.0 * (xa @ x[p]) + x_sq[p], 0.0), out=ma)
    return k
