"""Greedy (farthest-point) coreset selection in a random projection (PatchCore's memory bank)."""

from __future__ import annotations

from typing import Optional

import numpy as np
from threadpoolctl import threadpool_limits


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
