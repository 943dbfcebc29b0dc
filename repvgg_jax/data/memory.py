"""Datasets decoded once into numpy (Fashion-MNIST, small folders and TFDS datasets), and
their batches: crops resampled and augmented with numpy on a few threads.

An image folder's files that cannot be decoded are listed (``InMemory.train_unreadable``,
``eval_unreadable``): a batch that reads one raises its error, or with
``skip_unreadable_images`` records it as skipped (``decoding.SkippedImages``) and reads, in
training, the stand-in that ``folders.load`` put in its place, in evaluation a masked-out
row."""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence, Union

import numpy as np

from repvgg_jax.data import batching, decoding, transforms
from repvgg_jax.data.info import Batch, DatasetInfo


# Pixels per step of the statistics (an int64 copy of 64 MiB).
_STATISTICS_CHUNK = 1 << 23


class Images:
  """Decoded uint8 HWC images: one stacked array when they share a shape, else a list."""

  def __init__(self, images: Union[np.ndarray, Sequence[np.ndarray]]):
    if not isinstance(images, np.ndarray) and len({image.shape for image in images}) == 1:
      images = np.stack(images)
    self.images = images

  def __len__(self) -> int:
    return len(self.images)

  def shapes(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Heights and widths of the images ``index``."""
    if isinstance(self.images, np.ndarray):
      count = len(index)
      return (np.full(count, self.images.shape[1]), np.full(count, self.images.shape[2]))
    return (np.array([self.images[i].shape[0] for i in index]),
            np.array([self.images[i].shape[1] for i in index]))

  def resample(self, index: np.ndarray, top: np.ndarray, left: np.ndarray,
               height: np.ndarray, width: np.ndarray, size: int) -> np.ndarray:
    """Box ``k`` of image ``index[k]`` resampled to ``size x size``: float32 [n, S, S, C]."""
    return np.stack([transforms.bilinear(self.images[i], *box, size)
                     for i, *box in zip(index, top, left, height, width)])

  def statistics(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the pixels, in [0, 255] units."""
    # Integer sums, exact in any order and chunk by chunk: no float64 copy of the dataset.
    if isinstance(self.images, np.ndarray):
      pixels = self.images.reshape(-1, self.images.shape[-1])
      chunks = [pixels[i:i + _STATISTICS_CHUNK]
                for i in range(0, len(pixels), _STATISTICS_CHUNK)]
    else:
      chunks = [image.reshape(-1, image.shape[-1]) for image in self.images]
    total = sum(chunk.sum(0, np.int64) for chunk in chunks)
    total_sq = sum(np.square(chunk, dtype=np.int64).sum(0) for chunk in chunks)
    count = sum(len(chunk) for chunk in chunks)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


@dataclasses.dataclass
class InMemory:
  """A dataset held decoded in memory, normalized by its own pixel statistics."""
  info: DatasetInfo
  train_images: Images
  train_labels: np.ndarray
  eval_images: Images
  eval_labels: np.ndarray
  # An image folder's examples whose file cannot be decoded, and the files batches skipped.
  train_unreadable: dict[int, decoding.UnreadableImageError] = dataclasses.field(
      default_factory=dict)
  eval_unreadable: dict[int, decoding.UnreadableImageError] = dataclasses.field(
      default_factory=dict)
  skipped: decoding.SkippedImages = dataclasses.field(default_factory=decoding.SkippedImages)

  @classmethod
  def create(cls, name: str, train_images: Images, train_labels: np.ndarray,
             eval_images: Images, eval_labels: np.ndarray, num_classes: int) -> 'InMemory':
    mean, std = train_images.statistics()
    info = DatasetInfo(name=name, num_classes=num_classes, num_train=len(train_images),
                       num_eval=len(eval_images), channels=len(mean), mean=mean, std=std)
    return cls(info, train_images, train_labels.astype(np.int32), eval_images,
               eval_labels.astype(np.int32))


def _readable(examples: np.ndarray, unreadable: dict[int, decoding.UnreadableImageError],
              skip_unreadable_images: bool, skipped: decoding.SkippedImages,
              training: bool) -> np.ndarray:
  """Whether each of ``examples`` can be read. An unreadable one raises its error (the
  first's), or with ``skip_unreadable_images`` is recorded in ``skipped``."""
  bad = np.isin(examples, list(unreadable))
  if bad.any():
    errors = [unreadable[example] for example in examples[bad].tolist()]
    if not skip_unreadable_images:
      raise errors[0]
    skipped.add(errors, training)
  return ~bad


def train_batches(source: InMemory, *, global_batch_size: int, local_batch_size: int,
                  image_size: int, seed: int, start_step: int, process_index: int,
                  augment: str, min_crop_scale: float,
                  skip_unreadable_images: bool) -> Iterator[Batch]:
  """Endless training batches of ``batching.train_plan``, augmented on AUGMENT_THREADS."""

  def augment_rows(examples, draws):
    heights, widths = source.train_images.shapes(examples)
    boxes = transforms.random_resized_crop_boxes(draws, heights, widths, min_crop_scale)
    images = source.train_images.resample(examples, *boxes, image_size)
    return transforms.finish_train_images(images, draws, augment, source.info)

  for examples, draws in batching.train_plan(
      len(source.train_images), global_batch_size=global_batch_size,
      local_batch_size=local_batch_size, seed=seed, start_step=start_step,
      process_index=process_index):
    _readable(examples, source.train_unreadable, skip_unreadable_images, source.skipped,
              training=True)
    yield {'image': batching.in_chunks(augment_rows, examples, draws),
           'label': source.train_labels[examples]}


def eval_batches(source: InMemory, *, global_batch_size: int, local_batch_size: int,
                 image_size: int, process_index: int, crop_fraction: float,
                 skip_unreadable_images: bool) -> Iterator[Batch]:
  """The evaluation batches of ``batching.eval_plan``: resized, centre-cropped, masked
  (skipped unreadable files too)."""

  def crop_rows(examples):
    heights, widths = source.eval_images.shapes(examples)
    boxes = [transforms.eval_box(h, w, image_size, crop_fraction)
             for h, w in zip(heights, widths)]
    top, left, height, width = (np.array(column) for column in zip(*boxes))
    images = source.eval_images.resample(examples, top, left, height, width, image_size)
    return transforms.normalize(images, source.info)

  for examples, mask in batching.eval_plan(
      len(source.eval_images), global_batch_size=global_batch_size,
      local_batch_size=local_batch_size, process_index=process_index):
    mask = mask.copy()
    mask[mask] = _readable(examples[mask], source.eval_unreadable, skip_unreadable_images,
                           source.skipped, training=False)
    yield {'image': batching.in_chunks(crop_rows, examples) * mask[:, None, None, None],
           'label': np.where(mask, source.eval_labels[examples], 0).astype(np.int32),
           'mask': mask.astype(np.float32)}
