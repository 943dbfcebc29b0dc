"""What the trainer learns about a dataset, and the dataset names this package accepts."""

from __future__ import annotations

import dataclasses

import numpy as np

from repvgg_jax.variants import IMAGENET_MEAN, IMAGENET_STD

ACCEPTED_DATASETS = ("'fashion_mnist', 'imagenet2012', 'tfds:<name>' or the plain name of a "
                     "TFDS image-classification dataset, or 'folder:/path/to/root' (with "
                     "train/<class>/ and val/<class>/ image sub-folders)")

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a dataset."""
  name: str
  num_classes: int
  num_train: int
  num_eval: int
  channels: int
  mean: tuple[float, ...]  # per channel, pixel units [0, 255]
  std: tuple[float, ...]


def imagenet_statistics(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """ImageNet's per-channel mean and std (averaged over RGB for 1 channel): the
  normalization of streamed datasets, too big to scan for their own."""
  if channels == 3:
    return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)
  return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
