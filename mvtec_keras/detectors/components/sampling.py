"""Seeded uniform samples of a stream (reservoir sampling), batch by batch, with bounded memory."""

from __future__ import annotations

import numpy as np


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
