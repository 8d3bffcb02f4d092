"""scikit-learn's bundled 8x8 digits as diffusion training data (no download).

Images are scaled from the dataset's 0..16 range to [-1, 1] and shaped [N, 1, 8, 8].
The held-out split is fixed by a seed so the DiT, the classifier and the metrics agree on it.
"""

from __future__ import annotations

import numpy as np
import torch

NUM_CLASSES = 10
IMAGE_SIZE = 8
SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.2


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits: images [1797, 1, 8, 8] float32 in [-1, 1], labels [1797] int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    return images, labels


def train_test_split() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The fixed stratified split used by every reference script: ((x_train, y_train), (x_test, y_test))."""
    from sklearn.model_selection import train_test_split as sk_split

    images, labels = load_digits_tensors()
    idx = np.arange(len(labels))
    tr, te = sk_split(idx, test_size=HELD_OUT_FRACTION, random_state=SPLIT_SEED, stratify=labels.numpy())
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    return (images[tr], labels[tr]), (images[te], labels[te])
