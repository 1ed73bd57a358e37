"""Segment reductions over a flat batch: per-group and per-task sums, means and broadcasts.

A batch of rollouts is flat: element ``i`` carries a label (its group id, or its task). A
:class:`Segments` maps those labels to a dense index ``0..S-1`` once, after which every
reduction is a single ``np.bincount`` and every broadcast a single gather. No Python loop runs
over elements.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

# Non-negative integer labels up to this multiple of the batch size are densified with a
# counting pass (O(N + max label)); anything else (strings, negatives, sparse ids) is sorted.
_COUNTING_SPAN = 4


def dense_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(unique_labels, index, counts)`` with ``unique_labels[index] == labels``.

    Unique labels come out in ascending order, whichever path is taken.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    n = labels.size
    if labels.dtype.kind in "iu" and n:
        lo, hi = int(labels.min()), int(labels.max())
        if lo >= 0 and hi < _COUNTING_SPAN * n + 1024:
            counts_by_label = np.bincount(labels, minlength=hi + 1)
            present = counts_by_label > 0
            unique = np.flatnonzero(present)
            remap = np.cumsum(present) - 1
            return unique.astype(labels.dtype), remap[labels], counts_by_label[unique]
    unique, index, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return unique, index.reshape(-1), counts


@dataclass(frozen=True)
class Segments:
    """A partition of ``n`` elements into ``S`` labelled segments."""

    labels: np.ndarray  # [S] the original label of each segment
    index: np.ndarray  # [N] the segment of each element, in 0..S-1
    counts: np.ndarray  # [S] number of elements in each segment

    @classmethod
    def from_labels(cls, labels) -> Segments:
        unique, index, counts = dense_labels(labels)
        return cls(labels=unique, index=index, counts=counts)

    @property
    def n_segments(self) -> int:
        return int(self.labels.size)

    @property
    def n_elements(self) -> int:
        return int(self.index.size)

    def sum(self, values: np.ndarray) -> np.ndarray:
        """Per-segment sum of a per-element array (float64)."""
        return np.bincount(self.index, weights=values, minlength=self.n_segments)

    def mean(self, values: np.ndarray) -> np.ndarray:
        """Per-segment mean of a per-element array (float64)."""
        return self.sum(values) / self.counts

    def broadcast(self, per_segment: np.ndarray) -> np.ndarray:
        """Per-element view of a per-segment array."""
        return per_segment[self.index]

    @cached_property
    def representative(self) -> np.ndarray:
        """For each segment, the position of one of its elements (which one is unspecified)."""
        rep = np.empty(self.n_segments, dtype=np.int64)
        # With repeated indices numpy keeps one of the written values: always a member.
        rep[self.index] = np.arange(self.n_elements)
        return rep

    def is_constant(self, values: np.ndarray) -> np.ndarray:
        """Per segment: True where every element holds exactly the same value."""
        reference = values[self.representative][self.index]
        differs = np.bincount(self.index, weights=values != reference, minlength=self.n_segments)
        return differs == 0
