"""Nearest neighbours in Keras ops: the bank in chunks to bound memory, and a fused matmul + min for the
nearest distance alone."""

from __future__ import annotations

from typing import Optional

from keras import ops

from ... import backends


def argmin(x, axis: int):
    """``ops.argmin`` (int32) without Keras' negative-zero test on floats.

    That test reads the sign bit with bitwise ops, which LiteRT has no builtin
    for; distances never depend on the sign of zero.
    """
    tf = backends.tensorflow_if_backend()
    if tf is not None:
        return tf.argmin(x, axis=axis, output_type=tf.int32)
    return ops.cast(ops.argmin(x, axis=axis), "int32")


def argmax(x, axis: int):
    """``ops.argmax`` (int32), see :func:`argmin`."""
    tf = backends.tensorflow_if_backend()
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
        tf = backends.tensorflow_if_backend()
        if tf is not None:  # no transposed copy of the block (~15 % faster)
            prod = tf.matmul(q_aug, blk, transpose_b=True)
        else:
            prod = ops.matmul(q_aug, ops.transpose(blk))
        part = ops.min(prod, axis=1)
        best = part if best is None else ops.minimum(best, part)
    return ops.sqrt(ops.maximum(best + ops.sum(queries * queries, axis=1), 0.0))
