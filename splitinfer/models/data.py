"""The digits data set that ships inside scikit-learn, shaped for a model's input.

scikit-learn bundles 1,797 greyscale 8x8 handwritten digits (``load_digits``;
read from the installed package, never downloaded). Here they are:

* split once, by a fixed rule, into 80 % training and 20 % held-out images,
  stratified by class (per class: a permutation from ``numpy.random.RandomState``
  seeded with ``SPLIT_SEED``; that generator's stream is frozen by numpy's
  compatibility policy, so every machine and version gets the same split);
* scaled from 0..16 to 0..1, resized to the model's H x W by bilinear
  interpolation, replicated to its channel count, and normalised with fixed
  constants (``DIGITS_MEAN``, ``DIGITS_STD``: the pixel statistics of the
  whole 8x8 set), so one image preprocessed alone (``preprocess``) gets
  exactly the values it has inside the data set.

Labels are 0..9. A model with more than 10 outputs (the 1000-class ImageNet
zoo) reads its first 10 logits as the digit classes.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from splitinfer.errors import UserError

__all__ = [
    "DIGITS_MEAN",
    "DIGITS_STD",
    "HELD_OUT_FRACTION",
    "NUM_DIGIT_CLASSES",
    "SPLIT_SEED",
    "DigitsData",
    "digits_dataset",
    "preprocess",
    "split_indices",
]

log = logging.getLogger(__name__)

NUM_DIGIT_CLASSES = 10
SPLIT_SEED = 0  # seeds the per-class permutations of the train/held-out split
HELD_OUT_FRACTION = 0.2  # share of each class kept out of training
# Mean and standard deviation of all 1,797 x 64 pixels after scaling to 0..1 (rounded).
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3760


class DigitsData(NamedTuple):
    """Training and held-out tensors; unpacks as ``x_train, y_train, x_test, y_test``."""

    x_train: torch.Tensor  # (N, C, H, W) float32
    y_train: torch.Tensor  # (N,) int64, 0..9
    x_test: torch.Tensor
    y_test: torch.Tensor


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 images (float32, 0..16) and labels, read once per process."""
    from sklearn.datasets import load_digits  # slow import (~1 s): only when data is needed

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=1)
def split_indices() -> tuple[np.ndarray, np.ndarray]:
    """Indices into the 1,797 digits of the training and held-out images, fixed forever.

    Per class, in class order: permute that class's indices with a RandomState
    seeded with ``SPLIT_SEED`` (one generator for all classes), keep the first
    ``round(HELD_OUT_FRACTION * n)`` as held-out. Both lists are then shuffled
    once more (same generator) so any prefix of either is a mixed sample.
    """
    _, labels = _raw_digits()
    rng = np.random.RandomState(SPLIT_SEED)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for c in range(NUM_DIGIT_CLASSES):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(HELD_OUT_FRACTION * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    train_idx = np.concatenate(train)
    train_idx = train_idx[rng.permutation(len(train_idx))]
    test_idx = np.concatenate(test)
    test_idx = test_idx[rng.permutation(len(test_idx))]
    train_idx.setflags(write=False)
    test_idx.setflags(write=False)
    return train_idx, test_idx


def _check_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3 or any(int(d) < 1 for d in input_shape):
        raise UserError(f"digits need an image input (channels, height, width), got shape {tuple(input_shape)}")
    c, h, w = (int(d) for d in input_shape)
    return c, h, w


def preprocess(images: np.ndarray | torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor:
    """8x8 digit images with values 0..16, shape (N, 8, 8), to model inputs (N, C, H, W).

    Bilinear resize (``align_corners=False``), grey replicated to C channels (as
    an expanded view: no copy, so 224x224x3 costs the memory of one channel),
    then ``(x / 16 - DIGITS_MEAN) / DIGITS_STD``.
    """
    c, h, w = _check_shape(input_shape)
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if x.dim() != 3 or tuple(x.shape[1:]) != (8, 8):
        raise UserError(f"expected 8x8 digit images of shape (N, 8, 8), got {tuple(x.shape)}")
    x = (x / 16.0 - DIGITS_MEAN) / DIGITS_STD
    x = x.unsqueeze(1)
    if (h, w) != (8, 8):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x.expand(-1, c, -1, -1)


def digits_dataset(
    input_shape: tuple[int, ...],
    *,
    max_train: int | None = None,
    max_test: int | None = None,
) -> DigitsData:
    """The fixed digits split, preprocessed for a model taking ``input_shape`` (C, H, W).

    ``max_train`` / ``max_test`` keep a prefix of each split (both are in a fixed
    shuffled order): for the 224x224 models, where the full set is slow to run.
    """
    for name, value in (("max_train", max_train), ("max_test", max_test)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    images, labels = _raw_digits()
    train_idx, test_idx = split_indices()
    train_idx = train_idx[:max_train]
    test_idx = test_idx[:max_test]
    data = DigitsData(
        x_train=preprocess(images[train_idx], input_shape),
        y_train=torch.from_numpy(labels[train_idx].copy()),
        x_test=preprocess(images[test_idx], input_shape),
        y_test=torch.from_numpy(labels[test_idx].copy()),
    )
    log.debug("digits at %s: %d train, %d held out", tuple(input_shape), len(data.y_train), len(data.y_test))
    return data
