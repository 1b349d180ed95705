"""scikit-learn's handwritten digits (1797 images, 8x8, 10 classes), the embedded default.

The split is fixed and stratified: within each class, in the order of
`sklearn.datasets.load_digits`, every fifth image (rank 4, 9, 14, ...) is a test image,
the rest train. That gives 1442 train and 355 test images, each class within one image of 80/20.
Pixel values 0..16 are divided by 16, so images are float32 in [0, 1], shape (N, 1, 8, 8).
"""

from __future__ import annotations

import numpy as np
import torch


def split_indices(y: np.ndarray, split: str) -> np.ndarray:
    """Indices into load_digits() of the train or test split, sorted ascending."""
    rank = np.zeros(len(y), dtype=np.int64)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        rank[members] = np.arange(len(members))
    is_test = rank % 5 == 4
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): float32 (N, 1, 8, 8) in [0, 1] and int64 (N,)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    idx = split_indices(bunch.target, split)
    x = torch.from_numpy(bunch.images[idx].astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(bunch.target[idx].astype(np.int64))
    return x.contiguous(), y
