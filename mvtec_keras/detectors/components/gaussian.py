"""Streaming Gaussian statistics (shifted running sums in float64), batched Cholesky inverse, and
Ledoit-Wolf shrinkage from the streamed moments."""

from __future__ import annotations

import copy
from typing import Optional

import numpy as np

from ... import backends
from ...errors import InputError


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
        tf = backends.tensorflow_if_backend()
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
    tf = backends.tensorflow_if_backend()
    if tf is None:
        return np.linalg.inv(np.asarray(spd, np.float64))
    a = tf.convert_to_tensor(spd, tf.float64)
    eye = tf.eye(a.shape[-1], batch_shape=a.shape[:-2], dtype=tf.float64)
    return tf.linalg.cholesky_solve(tf.linalg.cholesky(a), eye).numpy()


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
