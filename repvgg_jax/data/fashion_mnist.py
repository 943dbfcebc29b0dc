"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` files (IDX format, no network)."""

from __future__ import annotations

import gzip
import os

import numpy as np

from repvgg_jax.data.memory import Images, InMemory

DEBIAN_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'


def read_idx(path: str) -> np.ndarray:
  """An IDX file (MNIST's format): big-endian int32 magic (ubyte data, ndim), then the
  dimensions, then the data."""
  with gzip.open(path, 'rb') as f:
    raw = f.read()
  ndim = raw[3]
  shape = np.frombuffer(raw, '>i4', count=ndim, offset=4)
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def idx_files_present(directory: str = DEBIAN_FASHION_MNIST_DIR) -> bool:
  """Whether ``directory`` holds the four Fashion-MNIST IDX files (Debian's, by default)."""
  return all(os.path.exists(os.path.join(directory, f'{p}-{k}-ubyte.gz'))
             for p in ('train', 't10k') for k in ('images-idx3', 'labels-idx1'))


def debian_fashion_mnist_present() -> bool:
  """Whether Debian's Fashion-MNIST files are installed (else TFDS downloads the dataset)."""
  return idx_files_present(DEBIAN_FASHION_MNIST_DIR)


def load(directory: str = DEBIAN_FASHION_MNIST_DIR) -> InMemory:
  """The train (60000) and test (10000) splits, held in memory."""
  def split(prefix):
    images = read_idx(os.path.join(directory, f'{prefix}-images-idx3-ubyte.gz'))
    labels = read_idx(os.path.join(directory, f'{prefix}-labels-idx1-ubyte.gz'))
    return Images(images[..., None]), labels

  return InMemory.create('fashion_mnist', *split('train'), *split('t10k'), num_classes=10)
