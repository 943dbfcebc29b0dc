"""Training and evaluation batches for RepVGG: Fashion-MNIST, TFDS datasets, image folders.

    from repvgg_jax import data
    info = data.dataset_info('fashion_mnist')
    batches = data.train_batches('fashion_mnist', global_batch_size=256, image_size=32, seed=0)

Datasets (the ``dataset`` argument):

* ``'fashion_mnist'``: read from the IDX files in ``data_dir`` when it holds them (the
  GPU checks carry them so), else from Debian's ``dataset-fashion-mnist`` files in
  ``/usr/share/datasets/fashion-mnist`` when present (no network), else through TFDS;
* ``'imagenet2012'``: the user's TFDS build in ``data_dir`` (a clear error with the steps to
  build it when it is not prepared);
* ``'tfds:<name>'`` or a plain TFDS name: any TFDS image-classification dataset (downloaded and
  prepared by TFDS when needed);
* ``'folder:/path/to/root'``: ``root/train/<class>/*`` and ``root/val/<class>/*`` images.
  A file that cannot be read or decoded is an error naming it when a batch reads it; with
  ``skip_unreadable_images=True`` it is skipped instead: logged the first time (a warning
  naming it), counted (``skipped_images``), masked out of the evaluation, and in training
  its row reads the next readable file of the split (``folders.stand_ins``).

Small datasets (Fashion-MNIST, folders and TFDS datasets under their modules'
``IN_MEMORY_LIMIT_BYTES``) are decoded once into numpy and augmented with numpy in a
background thread (``memory``). Bigger image folders are decoded batch by batch from their
files in worker processes (``folders``, ``pool``); bigger TFDS datasets (ImageNet) are
streamed with tf.data (``tfds``). Only TFDS datasets import TensorFlow.

Modules: ``info`` (DatasetInfo), ``randomness`` (the counter-based hash of every random
choice, the epoch order), ``transforms`` (crop geometry, resampling, flip, normalization),
``batching`` (which examples and draws make each batch of each process), ``memory``,
``fashion_mnist``, ``folders``, ``decoding`` (Pillow, OpenCV), ``pool`` (worker processes),
``tfds``, ``prefetch`` (the background thread).

Determinism. The training batch at step ``s`` is a pure function of (dataset, seed, s,
global batch size): in-memory datasets and image folders walk a seeded permutation per
epoch, and every random choice of the augmentation is a hash of (seed, step, position in
the global batch). Process ``p`` of ``P`` receives rows ``[p*B/P, (p+1)*B/P)`` of that
global batch, so ``start_step`` resumes exactly and any process count sees the same global
batches. Skipping an image folder's unreadable files keeps this: the file a row reads
instead is a function of its example alone (``folders.stand_ins``). Streamed TFDS datasets
are the exception allowed for their size: each process reads its own shard of the split
(``tfds.even_splits``, dropping fewer than P examples) in an order seeded by (seed, epoch),
cut into whole batches (the last partial batch of each epoch is skipped), so their batches
depend on the process count; resuming by step is still exact for the same process count
(resuming mid-epoch re-reads, without decoding, the part of the epoch already done).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Iterator, Optional, Sequence, Union

from repvgg_jax.data import batching, fashion_mnist, folders, memory, tfds, transforms
from repvgg_jax.data.fashion_mnist import debian_fashion_mnist_present
from repvgg_jax.data.info import ACCEPTED_DATASETS, Batch, DatasetInfo
from repvgg_jax.data.prefetch import Prefetcher

__all__ = ['Batch', 'DatasetInfo', 'dataset_info', 'debian_fashion_mnist_present',
           'eval_batches', 'skipped_images', 'train_batches']

Source = Union[memory.InMemory, folders.StreamedFolder, tfds.Streamed]


@functools.lru_cache(maxsize=4)
def load(dataset: str, data_dir: Optional[str]) -> Source:
  """The dataset, loaded once per process (see the package docstring for the names)."""
  if not isinstance(dataset, str) or not dataset.strip():
    raise ValueError(f'dataset must be a non-empty string: {ACCEPTED_DATASETS}')
  if dataset.startswith('folder:'):
    root = os.path.expanduser(dataset[len('folder:'):])
    if not os.path.isdir(root):
      raise ValueError(f'Image folder {root!r} does not exist (dataset {dataset!r})')
    return folders.load(root)
  if dataset == 'fashion_mnist' and data_dir and fashion_mnist.idx_files_present(data_dir):
    return fashion_mnist.load(data_dir)
  if dataset == 'fashion_mnist' and debian_fashion_mnist_present():
    return fashion_mnist.load()
  explicit = dataset.startswith('tfds:')
  name = dataset[len('tfds:'):] if explicit else dataset
  # 'name:version' is TFDS syntax; any other 'prefix:' is a typo.
  if not name or (':' in name and not explicit):
    raise ValueError(f'Unknown dataset {dataset!r}; accepted: {ACCEPTED_DATASETS}.')
  return tfds.load(name, data_dir)


def dataset_info(dataset: str, data_dir: Optional[str] = None) -> DatasetInfo:
  """Classes, sizes, channels and normalization of ``dataset`` (see the package docstring
  for the accepted names)."""
  return load(dataset, data_dir).info


def skipped_images(dataset: str, data_dir: Optional[str] = None) -> list[str]:
  """The image files of ``dataset`` that this process's batches skipped as unreadable
  (``skip_unreadable_images``) so far, in the order first met."""
  source = load(dataset, data_dir)
  if isinstance(source, (memory.InMemory, folders.StreamedFolder)):
    return source.skipped.paths()
  return []  # a TFDS dataset streamed by tf.data: no files of its own


def train_batches(dataset: str, *, global_batch_size: int, image_size: int, seed: int,
                  start_step: int = 0, process_index: int = 0, process_count: int = 1,
                  data_dir: Optional[str] = None, augment: str = 'simple',
                  min_crop_scale: float = 0.08, mean: Optional[Sequence[float]] = None,
                  std: Optional[Sequence[float]] = None,
                  skip_unreadable_images: bool = False) -> Iterator[Batch]:
  """Endless training batches of this process, from step ``start_step`` on.

  Each batch is ``{'image': float32 [B/P, image_size, image_size, C] normalized,
  'label': int32 [B/P]}``: random-resized-crop (area ``min_crop_scale``..1, aspect ratio
  3/4..4/3), horizontal flip (not with ``augment='crop'``), with ``augment='autoaugment'``
  AutoAugment's ImageNet policy,
  then ``(pixel - mean) / std`` (the dataset's own statistics, or ``mean`` and ``std``
  where given, as in ``eval_batches``). Process ``p`` gets rows ``[p*B/P, (p+1)*B/P)`` of
  the global batch of each step (see the package docstring on determinism). An image
  folder's unreadable file is an error, or with ``skip_unreadable_images`` its row reads
  the next readable file of the split, with that file's label (logged, counted by
  ``skipped_images``).
  """
  (global_batch_size, local_batch_size, process_index, process_count,
   image_size) = batching.check_batching(global_batch_size, process_index, process_count,
                                         image_size)
  if augment not in transforms.AUGMENTATIONS:
    raise ValueError(f'augment must be one of {transforms.AUGMENTATIONS}, got {augment!r}')
  if not 0 < min_crop_scale <= 1:
    raise ValueError(f'min_crop_scale must be in (0, 1], got {min_crop_scale!r}')
  start_step = batching.integer('start_step', start_step, 0)
  seed = batching.integer('seed', seed, 0)
  source = _normalized(load(dataset, data_dir), dataset, mean, std)
  common = dict(local_batch_size=local_batch_size, image_size=image_size, seed=seed,
                start_step=start_step, process_index=process_index, augment=augment,
                min_crop_scale=min_crop_scale)
  if isinstance(source, tfds.Streamed):
    return Prefetcher(tfds.train_batches(source, process_count=process_count, **common))
  module = folders if isinstance(source, folders.StreamedFolder) else memory
  return Prefetcher(module.train_batches(source, global_batch_size=global_batch_size,
                                         skip_unreadable_images=skip_unreadable_images,
                                         **common))


def eval_batches(dataset: str, *, global_batch_size: int, image_size: int,
                 process_index: int = 0, process_count: int = 1,
                 data_dir: Optional[str] = None, crop_fraction: float = 0.875,
                 mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None,
                 skip_unreadable_images: bool = False) -> Iterator[Batch]:
  """The evaluation split once, in batches of this process: ``{'image', 'label', 'mask'}``.

  Images are resized (shorter side to ``image_size / crop_fraction``), centre-cropped to
  ``image_size`` and normalized, ``(pixel - mean) / std``: the dataset's own statistics, or
  ``mean`` and ``std`` where given (those the weights were trained with, e.g. ImageNet's
  for published weights). Every example appears exactly once over all processes and
  batches; the last batches are padded to full size with zero images and ``mask`` 0.
  All processes yield the same number of batches. An image folder's unreadable file is an
  error, or with ``skip_unreadable_images`` a zero image with ``mask`` 0 (logged, counted
  by ``skipped_images``).
  """
  (global_batch_size, local_batch_size, process_index, process_count,
   image_size) = batching.check_batching(global_batch_size, process_index, process_count,
                                         image_size)
  if not 0 < crop_fraction <= 1:
    raise ValueError(f'crop_fraction must be in (0, 1], got {crop_fraction!r}')
  source = _normalized(load(dataset, data_dir), dataset, mean, std)
  if isinstance(source, tfds.Streamed):
    return Prefetcher(tfds.eval_batches(
        source, local_batch_size=local_batch_size, image_size=image_size,
        process_index=process_index, process_count=process_count, crop_fraction=crop_fraction))
  module = folders if isinstance(source, folders.StreamedFolder) else memory
  return Prefetcher(module.eval_batches(
      source, global_batch_size=global_batch_size, local_batch_size=local_batch_size,
      image_size=image_size, process_index=process_index, crop_fraction=crop_fraction,
      skip_unreadable_images=skip_unreadable_images))


def _normalized(source: Source, dataset: str, mean: Optional[Sequence[float]],
                std: Optional[Sequence[float]]) -> Source:
  """``source`` normalizing with ``mean`` and ``std`` where given (those the weights were
  trained with, e.g. ImageNet's for published weights), else with its own statistics."""
  if (mean is None) != (std is None):
    raise ValueError('give both mean and std (the normalization of the weights), or neither')
  if mean is None:
    return source
  if len(mean) != source.info.channels or len(std) != source.info.channels:
    raise ValueError(f'mean and std need one value per channel: {dataset} has '
                     f'{source.info.channels}, got {len(mean)} and {len(std)}')
  return dataclasses.replace(source, info=dataclasses.replace(
      source.info, mean=tuple(map(float, mean)), std=tuple(map(float, std))))
