"""`SeenIds`: the sample ids met so far, for the duplicate-id check over millions of samples in little memory."""

from __future__ import annotations

from typing import Hashable

import numpy as np


class SeenIds:
    """key -> index of the first sample with that key.

    The last `FOLD` keys added live in a dict; older ones are folded into two sorted numpy arrays (the key's
    64-bit ``hash`` and the index: 16 bytes a key, instead of a Python string, tuple and dict entry). A key
    is looked up exactly among the recent ones and by its hash among the older ones, so two different ids
    could be taken for duplicates only if their 64-bit hashes collide (about 3e-8 for 1M ids). Hashes are
    Python's, so a `SeenIds` is only meaningful within one process."""

    FOLD = 1 << 16

    def __init__(self):
        self.recent: dict[Hashable, int] = {}
        self.hashes = np.zeros(0, dtype=np.int64)  # sorted
        self.first = np.zeros(0, dtype=np.int64)  # index of the first sample, beside its hash

    def __len__(self) -> int:
        return len(self.recent) + len(self.hashes)

    def get(self, key: Hashable) -> int | None:
        """The index of the first sample with `key`, or None."""
        found = self.recent.get(key)
        if found is not None or not len(self.hashes):
            return found
        h = hash(key)
        k = int(np.searchsorted(self.hashes, h))
        if k < len(self.hashes) and self.hashes[k] == h:
            return int(self.first[k])
        return None

    def add(self, key: Hashable, index: int) -> None:
        """Record `key` (not seen before: `get` returned None) for the sample at `index`."""
        self.recent[key] = index
        if len(self.recent) >= self.FOLD:
            self.fold()

    def fold(self) -> None:
        """Move the recent keys into the sorted arrays."""
        if not self.recent:
            return
        n = len(self.recent)
        hashes = np.concatenate([self.hashes, np.fromiter((hash(k) for k in self.recent), np.int64, n)])
        first = np.concatenate([self.first, np.fromiter(self.recent.values(), np.int64, n)])
        order = np.argsort(hashes, kind="stable")
        self.hashes, self.first, self.recent = hashes[order], first[order], {}
