"""Training and evaluation batches for RepVGG: Fashion-MNIST, TFDS datasets, image folders.

Datasets (the ``dataset`` argument):

* ``'fashion_mnist'``: read from Debian's ``dataset-fashion-mnist`` files in
  ``/usr/share/datasets/fashion-mnist`` when present (no network), else through TFDS;
* ``'imagenet2012'``: the user's TFDS build in ``data_dir`` (a clear error with the steps to
  build it when it is not prepared);
* ``'tfds:<name>'`` or a plain TFDS name: any TFDS image-classification dataset (downloaded and
  prepared by TFDS when needed);
* ``'folder:/path/to/root'``: ``root/train/<class>/*`` and ``root/val/<class>/*`` images.

Small datasets (Fashion-MNIST, folders, TFDS datasets whose decoded images take less than
``IN_MEMORY_LIMIT_BYTES``) are decoded once into numpy and augmented with numpy in a
background thread (the rows of a batch on up to half the cores). Bigger TFDS datasets
(ImageNet) are streamed with tf.data: decoding and cropping in parallel tf.data maps, flip,
AutoAugment and normalization with the same numpy code as in memory.

Determinism. The training batch at step ``s`` is a pure function of (dataset, seed, s,
global batch size): in-memory datasets walk a seeded permutation per epoch, and every random
choice of the augmentation is a hash of (seed, step, position in the global batch). Process
``p`` of ``P`` receives rows ``[p*B/P, (p+1)*B/P)`` of that global batch, so ``start_step``
resumes exactly and any process count sees the same global batches. Streamed datasets are
the exception allowed for their size: each process reads its own shard of the split
(``tfds.even_splits``, dropping fewer than P examples) in an order seeded by (seed, epoch),
cut into whole batches (the last partial batch of each epoch is skipped), so their batches
depend on the process count; resuming by step is still exact for the same process count
(resuming mid-epoch re-reads, without decoding, the part of the epoch already done).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import dataclasses
import functools
import gzip
import math
import operator
import os
import queue
import sys
import threading
import weakref
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from repvgg_jax import autoaugment
from repvgg_jax.checkpoint import IMAGENET_MEAN, IMAGENET_STD

DEBIAN_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
# TFDS datasets whose decoded images take less than this are held in memory; for images of
# assorted sizes the decoded size is guessed from the encoded one (JPEG compresses ~10x).
IN_MEMORY_LIMIT_BYTES = 4 << 30
ENCODED_TO_DECODED = 10
# Examples a streamed dataset shuffles over (encoded ImageNet JPEGs: about 1 GiB).
STREAM_SHUFFLE_BUFFER = 10_000
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
# 'crop': random-resized-crop only; 'simple': and flip; 'autoaugment': and AutoAugment.
AUGMENTATIONS = ('crop', 'simple', 'autoaugment')
ACCEPTED_DATASETS = ("'fashion_mnist', 'imagenet2012', 'tfds:<name>' or the plain name of a "
                     "TFDS image-classification dataset, or 'folder:/path/to/root' (with "
                     "train/<class>/ and val/<class>/ image sub-folders)")
# Random-resized-crop aspect ratios, and how many crops are tried before the centre fallback
# (torchvision's RandomResizedCrop).
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10

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


# ------------------------------------------------------------------------------------------
# Randomness: a counter-based hash, so that every draw is a pure function of its key.


def _mix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finalizer: a bijective scrambling of uint64 values."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def uniforms(seed: int, step: int, positions: np.ndarray, count: int) -> np.ndarray:
  """``count`` uniform floats in [0, 1) for each position of the global batch of ``step``:
  shape ``[len(positions), count]``, a pure function of (seed, step, position, column)."""
  golden = np.uint64(0x9E3779B97F4A7C15)
  key = _mix64(np.asarray([seed & (2**64 - 1)], np.uint64) + golden)
  key = _mix64(key ^ np.uint64(step & (2**64 - 1)))
  key = _mix64(key + np.asarray(positions, np.uint64) * golden)
  counters = key[:, None] + (np.arange(1, count + 1, dtype=np.uint64) * golden)[None, :]
  # The top 53 bits make an exactly representable double in [0, 1).
  return (_mix64(counters) >> np.uint64(11)).astype(np.float64) * 2.0**-53


# Columns of the per-position draws: crop areas, crop log-ratios, crop offsets, flip,
# then AutoAugment's own.
_AREA = slice(0, CROP_ATTEMPTS)
_RATIO = slice(CROP_ATTEMPTS, 2 * CROP_ATTEMPTS)
_TOP, _LEFT, _FLIP = 2 * CROP_ATTEMPTS, 2 * CROP_ATTEMPTS + 1, 2 * CROP_ATTEMPTS + 2
_AUTOAUGMENT = slice(2 * CROP_ATTEMPTS + 3, 2 * CROP_ATTEMPTS + 3 + autoaugment.NUM_DRAWS)
NUM_DRAWS = 2 * CROP_ATTEMPTS + 3 + autoaugment.NUM_DRAWS


def train_draws(seed: int, step: int, positions: np.ndarray) -> np.ndarray:
  """All random numbers that augment the given positions of the global batch of ``step``."""
  return uniforms(seed, step, positions, NUM_DRAWS)


# ------------------------------------------------------------------------------------------
# Geometry, shared by the in-memory and the streamed paths.


def random_resized_crop_boxes(draws: np.ndarray, heights: np.ndarray, widths: np.ndarray,
                              min_scale: float) -> tuple[np.ndarray, ...]:
  """Integer crop boxes ``(top, left, height, width)`` of torchvision's RandomResizedCrop:
  area a uniform fraction in [min_scale, 1] of the image, aspect ratio log-uniform in
  CROP_RATIO; the first of CROP_ATTEMPTS tries that fits, else a centre crop of the whole
  image clamped to CROP_RATIO."""
  heights = np.asarray(heights, np.int64)[:, None]
  widths = np.asarray(widths, np.int64)[:, None]
  area = heights * widths * (min_scale + (1 - min_scale) * draws[:, _AREA])
  log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
  ratio = np.exp(log_lo + (log_hi - log_lo) * draws[:, _RATIO])
  crop_w = np.round(np.sqrt(area * ratio)).astype(np.int64)
  crop_h = np.round(np.sqrt(area / ratio)).astype(np.int64)
  fits = (crop_w > 0) & (crop_w <= widths) & (crop_h > 0) & (crop_h <= heights)
  first = np.argmax(fits, axis=1)
  rows = np.arange(len(draws))
  found = fits[rows, first]
  heights, widths = heights[:, 0], widths[:, 0]
  # The fallback: the whole image, cut to the nearest allowed aspect ratio.
  in_ratio = widths / heights
  fallback_w = np.where(in_ratio > CROP_RATIO[1],
                        np.round(heights * CROP_RATIO[1]).astype(np.int64), widths)
  fallback_h = np.where(in_ratio < CROP_RATIO[0],
                        np.round(widths / CROP_RATIO[0]).astype(np.int64), heights)
  crop_h = np.where(found, crop_h[rows, first], fallback_h)
  crop_w = np.where(found, crop_w[rows, first], fallback_w)
  top = np.where(found, np.floor(draws[:, _TOP] * (heights - crop_h + 1)),
                 (heights - crop_h) // 2).astype(np.int64)
  left = np.where(found, np.floor(draws[:, _LEFT] * (widths - crop_w + 1)),
                  (widths - crop_w) // 2).astype(np.int64)
  return top, left, crop_h, crop_w


def centre_crop_geometry(height: int, width: int, image_size: int,
                         crop_fraction: float) -> tuple[int, int, int, int]:
  """Evaluation: the shorter side is resized to ``image_size / crop_fraction`` and the
  centre ``image_size`` square is cut. Returns ``(resized_h, resized_w, top, left)``."""
  shorter = int(round(image_size / crop_fraction))
  scale = shorter / min(height, width)
  resized_h = max(image_size, int(round(height * scale)))
  resized_w = max(image_size, int(round(width * scale)))
  return resized_h, resized_w, (resized_h - image_size) // 2, (resized_w - image_size) // 2


def _bilinear(image: np.ndarray, top: float, left: float, height: float, width: float,
              size: int) -> np.ndarray:
  """The box ``(top, left, height, width)`` of ``image`` (HWC, coordinates may be
  fractional) resampled to ``size x size`` by bilinear interpolation at half-pixel centres,
  which is what tf.image.resize does to a cropped image; float32 ``[size, size, C]``."""
  steps = (np.arange(size) + 0.5) / size

  def coordinates(start, extent, limit):
    position = np.clip(start + steps * extent - 0.5, 0, limit - 1)
    low = np.floor(position).astype(np.intp)
    return low, np.minimum(low + 1, limit - 1), (position - low).astype(np.float32)

  y0, y1, wy = coordinates(top, height, image.shape[0])
  x0, x1, wx = coordinates(left, width, image.shape[1])
  # Rows first, on the band of columns the box needs, then columns: separable and cheap.
  band = image[:, x0[0]:x1[-1] + 1]
  rows = band[y0].astype(np.float32)
  rows += (band[y1] - rows) * wy[:, None, None]
  left_columns = np.take(rows, x0 - x0[0], axis=1)
  right_columns = np.take(rows, x1 - x0[0], axis=1)
  return left_columns + (right_columns - left_columns) * wx[None, :, None]


class _Images:
  """Decoded uint8 HWC images: one stacked array when they share a shape, else a list."""

  def __init__(self, images: Union[np.ndarray, Sequence[np.ndarray]]):
    if not isinstance(images, np.ndarray) and len({image.shape for image in images}) == 1:
      images = np.stack(images)
    self.images = images

  def __len__(self) -> int:
    return len(self.images)

  def shapes(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(self.images, np.ndarray):
      count = len(index)
      return (np.full(count, self.images.shape[1]), np.full(count, self.images.shape[2]))
    return (np.array([self.images[i].shape[0] for i in index]),
            np.array([self.images[i].shape[1] for i in index]))

  def resample(self, index: np.ndarray, top: np.ndarray, left: np.ndarray,
               height: np.ndarray, width: np.ndarray, size: int) -> np.ndarray:
    """Box ``k`` of image ``index[k]`` resampled to ``size x size``: float32 [n, S, S, C]."""
    return np.stack([_bilinear(self.images[i], *box, size)
                     for i, *box in zip(index, top, left, height, width)])


# ------------------------------------------------------------------------------------------
# Dataset sources.


@dataclasses.dataclass
class _InMemory:
  info: DatasetInfo
  train_images: _Images
  train_labels: np.ndarray
  eval_images: _Images
  eval_labels: np.ndarray


def _pixel_statistics(images: _Images) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and standard deviation of the pixels, in [0, 255] units."""
  if isinstance(images.images, np.ndarray):
    channels = images.images.shape[-1]
    pixels = images.images.reshape(-1, channels)
    total, total_sq, count = (pixels.sum(0, np.float64),
                              np.square(pixels, dtype=np.float64).sum(0), len(pixels))
  else:
    total = sum(image.reshape(-1, image.shape[-1]).sum(0, np.float64) for image in images.images)
    total_sq = sum(np.square(image.reshape(-1, image.shape[-1]), dtype=np.float64).sum(0)
                   for image in images.images)
    count = sum(image.shape[0] * image.shape[1] for image in images.images)
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean**2, 1e-12))
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _in_memory(name: str, train_images: _Images, train_labels: np.ndarray,
               eval_images: _Images, eval_labels: np.ndarray, num_classes: int) -> _InMemory:
  mean, std = _pixel_statistics(train_images)
  channels = len(mean)
  info = DatasetInfo(name=name, num_classes=num_classes, num_train=len(train_images),
                     num_eval=len(eval_images), channels=channels, mean=mean, std=std)
  return _InMemory(info, train_images, train_labels.astype(np.int32), eval_images,
                   eval_labels.astype(np.int32))


def _read_idx(path: str) -> np.ndarray:
  """An IDX file (MNIST's format): big-endian int32 magic (ubyte data, ndim), then the
  dimensions, then the data."""
  with gzip.open(path, 'rb') as f:
    raw = f.read()
  ndim = raw[3]
  shape = np.frombuffer(raw, '>i4', count=ndim, offset=4)
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _debian_fashion_mnist(directory: str) -> _InMemory:
  def split(prefix):
    images = _read_idx(os.path.join(directory, f'{prefix}-images-idx3-ubyte.gz'))
    labels = _read_idx(os.path.join(directory, f'{prefix}-labels-idx1-ubyte.gz'))
    return _Images(images[..., None]), labels

  return _in_memory('fashion_mnist', *split('train'), *split('t10k'), num_classes=10)


def debian_fashion_mnist_present() -> bool:
  return all(os.path.exists(os.path.join(DEBIAN_FASHION_MNIST_DIR, f'{p}-{k}-ubyte.gz'))
             for p in ('train', 't10k') for k in ('images-idx3', 'labels-idx1'))


def _tensorflow():
  """TensorFlow for data only: it must not take the accelerators JAX trains on. Every
  TensorFlow (and TFDS) import of this module goes through here first."""
  if 'tensorflow' not in sys.modules:
    # TensorFlow >= 2.20 wheels load their LLVM with RTLD_GLOBAL, after which importing
    # triton (torchvision and timm do, e.g. in a benchmark next to training) segfaults
    # (tensorflow/tensorflow#124205). Loaded first, triton is safe.
    with contextlib.suppress(ImportError):
      import triton  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TensorFlow was already initialized; its devices are set.
    pass
  return tf


def _image_files(directory: str) -> tuple[list[str], list[str]]:
  """Image paths below ``directory/<class>/`` (recursively) and their class names."""
  paths, classes = [], []
  for class_name in sorted(os.listdir(directory)):
    class_dir = os.path.join(directory, class_name)
    if not os.path.isdir(class_dir):
      continue
    for parent, subdirs, files in sorted(os.walk(class_dir)):
      subdirs.sort()
      for name in sorted(files):
        if name.lower().endswith(IMAGE_EXTENSIONS):
          paths.append(os.path.join(parent, name))
          classes.append(class_name)
  return paths, classes


def _decode_files(paths: Sequence[str]) -> list[np.ndarray]:
  """Decodes image files in parallel with tf.data, in order, each with its own channels."""
  tf = _tensorflow()
  files = tf.data.Dataset.from_tensor_slices(list(paths))
  decoded = files.map(
      lambda path: tf.io.decode_image(tf.io.read_file(path), expand_animations=False),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return [image for image in decoded.as_numpy_iterator()]


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """Grayscale (1), gray+alpha (2), RGB (3) or RGBA (4) -> ``channels`` (1 or 3)."""
  if channels == 1 or image.shape[-1] == 3:
    return image[..., :channels]
  if image.shape[-1] == 4:
    return image[..., :3]
  return np.repeat(image[..., :1], 3, axis=-1)


def _folder(root: str) -> _InMemory:
  """``root/train/<class>/*`` and ``root/val/<class>/*``; classes are the train sub-folders
  in sorted order. Images stay 1-channel when all of them are grayscale, else become RGB."""
  splits = {}
  for split in ('train', 'val'):
    directory = os.path.join(root, split)
    if not os.path.isdir(directory):
      raise ValueError(f"Image folder {root!r} has no '{split}' sub-folder: expected "
                       f"{root}/train/<class>/<image> and {root}/val/<class>/<image>")
    paths, classes = _image_files(directory)
    if not paths:
      raise ValueError(f'Image folder {directory!r} holds no images (expected '
                       f'{directory}/<class>/<image>, extensions '
                       f'{", ".join(IMAGE_EXTENSIONS)})')
    splits[split] = (paths, classes)
  class_names = sorted(set(splits['train'][1]))
  unknown = sorted(set(splits['val'][1]) - set(class_names))
  if unknown:
    raise ValueError(f'Image folder {root!r}: val classes {unknown} have no train images')
  class_index = {name: i for i, name in enumerate(class_names)}
  decoded = {split: _decode_files(paths) for split, (paths, _) in splits.items()}
  channels = 1 if all(image.shape[-1] == 1 for images in decoded.values()
                      for image in images) else 3
  train_images, val_images = (
      _Images([_to_channels(image, channels) for image in decoded[split]])
      for split in ('train', 'val'))
  train_labels, val_labels = (np.array([class_index[c] for c in splits[split][1]])
                              for split in ('train', 'val'))
  return _in_memory(f'folder:{root}', train_images, train_labels, val_images, val_labels,
                    num_classes=len(class_names))


@dataclasses.dataclass
class _Streamed:
  """A TFDS dataset too big for memory, read with tf.data."""
  info: DatasetInfo
  builder: Any
  train_split: str
  eval_split: str
  image_key: str
  label_key: str


def _imagenet_not_prepared(data_dir: Optional[str]) -> ValueError:
  from tensorflow_datasets.core import constants  # pylint: disable=g-import-not-at-top
  root = os.path.expanduser(data_dir or constants.DATA_DIR)
  manual = os.path.join(root, 'downloads', 'manual')
  return ValueError(
      f'imagenet2012 is not prepared in the TFDS data dir {root!r}. To build it: (1) download '
      f'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org (an '
      f'account is needed) into {manual}/ ; (2) run: tfds build imagenet2012 --data_dir '
      f'{root} (about 150 GB of disk; then pass --config.data_dir={root} if it is not the '
      f'default).')


def _tfds(name: str, data_dir: Optional[str]) -> Union[_InMemory, _Streamed]:
  _tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f'Unknown dataset {name!r} (no such TFDS dataset); accepted: '
                     f'{ACCEPTED_DATASETS}.') from None
  features, keys = builder.info.features, builder.info.supervised_keys
  if (not keys or len(keys) != 2 or
      not isinstance(features[keys[0]], tfds.features.Image) or
      not isinstance(features[keys[1]], tfds.features.ClassLabel)):
    raise ValueError(f'TFDS dataset {name!r} is not an image-classification dataset '
                     f'(supervised keys {keys!r}, need an Image and a ClassLabel)')
  image_key, label_key = keys
  if not builder.is_prepared():
    if builder.info.name == 'imagenet2012':
      raise _imagenet_not_prepared(data_dir)
    try:
      builder.download_and_prepare()
    except Exception as error:  # network, manual downloads, disk: TFDS says which
      raise ValueError(f'TFDS could not prepare {name!r} in {builder.data_dir}: '
                       f'{error}') from error
  splits = builder.info.splits
  eval_split = next((split for split in ('validation', 'test') if split in splits), None)
  if 'train' not in splits or eval_split is None:
    raise ValueError(f'TFDS dataset {name!r} needs a train split and a validation or test '
                     f'split; it has {sorted(splits)}')
  shape = features[image_key].shape
  channels = shape[-1] or 3
  num_train = splits['train'].num_examples
  if None in shape:  # images of assorted sizes: judge by the size of the encoded files
    decoded_bytes = int(builder.info.dataset_size) * ENCODED_TO_DECODED
  else:
    decoded_bytes = (num_train + splits[eval_split].num_examples) * math.prod(shape)
  if decoded_bytes <= IN_MEMORY_LIMIT_BYTES:
    def split_arrays(split):
      examples = tfds.as_numpy(builder.as_dataset(split=split, as_supervised=True))
      images, labels = zip(*examples)
      return _Images(list(images)), np.array(labels)

    return _in_memory(name, *split_arrays('train'), *split_arrays(eval_split),
                      num_classes=features[label_key].num_classes)
  # Too big to hold or to scan for statistics: ImageNet's.
  mean, std = ((IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else
               ((sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)))
  info = DatasetInfo(name=name, num_classes=features[label_key].num_classes,
                     num_train=num_train, num_eval=splits[eval_split].num_examples,
                     channels=channels, mean=tuple(mean), std=tuple(std))
  return _Streamed(info, builder, 'train', eval_split, image_key, label_key)


@functools.lru_cache(maxsize=4)
def _load(dataset: str, data_dir: Optional[str]) -> Union[_InMemory, _Streamed]:
  """The dataset, loaded once per process (see the module docstring for the names)."""
  if not isinstance(dataset, str) or not dataset.strip():
    raise ValueError(f'dataset must be a non-empty string: {ACCEPTED_DATASETS}')
  if dataset.startswith('folder:'):
    root = os.path.expanduser(dataset[len('folder:'):])
    if not os.path.isdir(root):
      raise ValueError(f'Image folder {root!r} does not exist (dataset {dataset!r})')
    return _folder(root)
  if dataset == 'fashion_mnist' and debian_fashion_mnist_present():
    return _debian_fashion_mnist(DEBIAN_FASHION_MNIST_DIR)
  explicit = dataset.startswith('tfds:')
  name = dataset[len('tfds:'):] if explicit else dataset
  # 'name:version' is TFDS syntax; any other 'prefix:' is a typo.
  if not name or (':' in name and not explicit):
    raise ValueError(f'Unknown dataset {dataset!r}; accepted: {ACCEPTED_DATASETS}.')
  return _tfds(name, data_dir)


def dataset_info(dataset: str, data_dir: Optional[str] = None) -> DatasetInfo:
  """Classes, sizes, channels and normalization of ``dataset`` (see the module docstring
  for the accepted names)."""
  return _load(dataset, data_dir).info


# ------------------------------------------------------------------------------------------
# Batches.


def _writable_float32(images: np.ndarray) -> np.ndarray:
  """``images`` as a C-contiguous float32 array that may be changed in place (copied only if
  needed)."""
  images = np.ascontiguousarray(images, np.float32)
  return images if images.flags.writeable else images.copy()


def _normalize(images: np.ndarray, info: DatasetInfo) -> np.ndarray:
  """``(pixel - mean) / std``, in place on a float32 copy of ``images`` where possible."""
  images = _writable_float32(images)
  # On rows of W*C values numpy's inner loops are long; on the C-long channel axis they crawl.
  width, channels = images.shape[-2:]
  rows = images.reshape(images.shape[:-2] + (width * channels,))
  rows -= np.tile(np.asarray(info.mean, np.float32), width)
  rows *= np.tile(1 / np.asarray(info.std, np.float32), width)
  return images


def _finish_train_images(images: np.ndarray, draws: np.ndarray, augment: str,
                         info: DatasetInfo) -> np.ndarray:
  """Cropped float images in pixel units -> flipped (not with 'crop'), optionally
  AutoAugmented, normalized."""
  images = _writable_float32(images)
  if augment != 'crop':
    flip = draws[:, _FLIP] < 0.5
    images[flip] = images[flip, :, ::-1]
  if augment == 'autoaugment':
    pixels = np.clip(np.round(images), 0, 255).astype(np.uint8)
    images = autoaugment.autoaugment(pixels, draws[:, _AUTOAUGMENT])
  return _normalize(images, info)


def _integer(name: str, value: Any, minimum: int) -> int:
  """``value`` as a Python int (numpy and JAX integers included), at least ``minimum``."""
  try:
    number = operator.index(value)
  except TypeError:
    number = None
  if number is None or number < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}')
  return number


def _check_batching(global_batch_size: Any, process_index: Any, process_count: Any,
                    image_size: Any) -> tuple[int, int, int, int, int]:
  """Validated ``(global_batch_size, local_batch_size, process_index, process_count,
  image_size)``."""
  process_count = _integer('process_count', process_count, 1)
  process_index = _integer('process_index', process_index, 0)
  if process_index >= process_count:
    raise ValueError(f'process_index must be in [0, {process_count}), got {process_index}')
  global_batch_size = _integer('global_batch_size', global_batch_size, 1)
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} is not divisible by the number '
                     f'of processes {process_count}')
  image_size = _integer('image_size', image_size, 1)
  return (global_batch_size, global_batch_size // process_count, process_index,
          process_count, image_size)


# Threads that augment the rows of a batch in parallel (numpy releases the GIL in its loops);
# half the cores at most, the rest are the trainer's (and tf.data's).
AUGMENT_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))


@functools.lru_cache(maxsize=1)
def _augment_pool() -> concurrent.futures.ThreadPoolExecutor:
  return concurrent.futures.ThreadPoolExecutor(AUGMENT_THREADS,
                                               thread_name_prefix='input-pipeline-rows')


def _in_chunks(function, *arrays: np.ndarray) -> np.ndarray:
  """``function(*arrays)`` for row-wise functions, computed on AUGMENT_THREADS slices of the
  rows in parallel and concatenated (the same result as one call)."""
  chunks = min(AUGMENT_THREADS, len(arrays[0]))
  if chunks <= 1:
    return function(*arrays)
  bounds = np.linspace(0, len(arrays[0]), chunks + 1).astype(int)
  parts = _augment_pool().map(lambda lo, hi: function(*(a[lo:hi] for a in arrays)),
                              bounds[:-1], bounds[1:])
  return np.concatenate(list(parts))


class _EpochPermutations:
  """The training order of an in-memory dataset: epoch ``e`` visits the examples in a
  permutation seeded by (seed, e). Keeps the two latest epochs (a batch spans at most two)."""

  def __init__(self, seed: int, size: int):
    self.seed, self.size, self.cache = seed, size, {}

  def examples(self, stream_positions: np.ndarray) -> np.ndarray:
    epochs = stream_positions // self.size
    out = np.empty_like(stream_positions)
    for epoch in np.unique(epochs):
      if epoch not in self.cache:
        if len(self.cache) >= 2:
          del self.cache[min(self.cache)]
        self.cache[epoch] = np.random.default_rng([self.seed, int(epoch)]).permutation(
            self.size)
      selected = epochs == epoch
      out[selected] = self.cache[epoch][stream_positions[selected] % self.size]
    return out


def _in_memory_train(source: _InMemory, *, global_batch_size: int, local_batch_size: int,
                     image_size: int, seed: int, start_step: int, process_index: int,
                     augment: str, min_crop_scale: float) -> Iterator[Batch]:
  order = _EpochPermutations(seed, len(source.train_images))
  positions = process_index * local_batch_size + np.arange(local_batch_size)

  def augment_rows(examples, draws):
    heights, widths = source.train_images.shapes(examples)
    boxes = random_resized_crop_boxes(draws, heights, widths, min_crop_scale)
    images = source.train_images.resample(examples, *boxes, image_size)
    return _finish_train_images(images, draws, augment, source.info)

  step = start_step
  while True:
    examples = order.examples(step * global_batch_size + positions)
    draws = train_draws(seed, step, positions)
    yield {'image': _in_chunks(augment_rows, examples, draws),
           'label': source.train_labels[examples]}
    step += 1


def _in_memory_eval(source: _InMemory, *, global_batch_size: int, local_batch_size: int,
                    image_size: int, process_index: int,
                    crop_fraction: float) -> Iterator[Batch]:
  count = len(source.eval_images)
  rows = process_index * local_batch_size + np.arange(local_batch_size)

  def crop_rows(examples):
    heights, widths = source.eval_images.shapes(examples)
    boxes = [_eval_box(h, w, image_size, crop_fraction) for h, w in zip(heights, widths)]
    top, left, height, width = (np.array(column) for column in zip(*boxes))
    images = source.eval_images.resample(examples, top, left, height, width, image_size)
    return _normalize(images, source.info)

  for start in range(0, count, global_batch_size):
    positions = start + rows
    mask = positions < count
    examples = np.where(mask, positions, 0)
    yield {'image': _in_chunks(crop_rows, examples) * mask[:, None, None, None],
           'label': np.where(mask, source.eval_labels[examples], 0).astype(np.int32),
           'mask': mask.astype(np.float32)}


def _eval_box(height: int, width: int, image_size: int,
              crop_fraction: float) -> tuple[float, float, float, float]:
  """The centre crop of ``centre_crop_geometry`` as a box of the original image, so that
  resampling that box equals resizing then cropping."""
  resized_h, resized_w, top, left = centre_crop_geometry(height, width, image_size,
                                                         crop_fraction)
  scale_y, scale_x = height / resized_h, width / resized_w
  return top * scale_y, left * scale_x, image_size * scale_y, image_size * scale_x


def _encoded_examples(source: _Streamed, split: str, shuffle_seed: Optional[int]):
  """The split's (encoded image, label) pairs; shuffled files and examples when a seed is
  given (tf.data keeps that order deterministic)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False)
  examples = source.builder.as_dataset(
      split=split, shuffle_files=shuffle_seed is not None, read_config=read_config,
      decoders={source.image_key: tfds.decode.SkipDecoding()})
  examples = examples.map(lambda e: (e[source.image_key], e[source.label_key]))
  if shuffle_seed is not None:
    examples = examples.shuffle(STREAM_SHUFFLE_BUFFER, seed=shuffle_seed)
  return examples


def _split_size(source: _Streamed, split: str) -> int:
  return source.builder.info.splits[split].num_examples


def _streamed_train(source: _Streamed, *, local_batch_size: int,
                    image_size: int, seed: int, start_step: int, process_index: int,
                    process_count: int, augment: str, min_crop_scale: float) -> Iterator[Batch]:
  """Each process reads its shard; epoch ``e`` is the shard in an order seeded by (seed, e),
  cut into ``steps_per_epoch`` full batches (the remainder is skipped)."""
  tf = _tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  shard = tfds.even_splits(source.train_split, n=process_count,
                           drop_remainder=True)[process_index]
  steps_per_epoch = _split_size(source, shard) // local_batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'{source.info.name}: the per-process batch {local_batch_size} is larger '
                     f'than the per-process shard of the train split')
  channels = source.info.channels
  jpeg = source.builder.info.features[source.image_key].encoding_format == 'jpeg'

  def crop_box(step, position, height, width):
    draws = train_draws(seed, int(step), np.array([position]))
    box = random_resized_crop_boxes(draws, np.array([height]), np.array([width]),
                                    min_crop_scale)
    return np.array([value[0] for value in box], np.int32)

  def epoch_batches(epoch: int, first_batch: int):
    def decode_and_crop(index, encoded, label):
      step = epoch * steps_per_epoch + index // local_batch_size
      position = process_index * local_batch_size + index % local_batch_size
      if jpeg:  # decode only the crop
        shape = tf.image.extract_jpeg_shape(encoded)
      else:
        image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
        shape = tf.shape(image)
      box = tf.numpy_function(crop_box, [step, position, shape[0], shape[1]], tf.int32)
      box.set_shape([4])
      if jpeg:
        crop = tf.image.decode_and_crop_jpeg(encoded, box, channels=channels)
      else:
        crop = image[box[0]:box[0] + box[2], box[1]:box[1] + box[3]]
      crop.set_shape([None, None, channels])
      return tf.image.resize(crop, [image_size, image_size], method='bilinear'), label

    shuffle_seed = int(np.random.default_rng([seed, epoch]).integers(2**31))
    examples = _encoded_examples(source, shard, shuffle_seed)
    examples = examples.take(steps_per_epoch * local_batch_size)
    examples = examples.skip(first_batch * local_batch_size)
    examples = examples.enumerate(first_batch * local_batch_size)
    examples = examples.map(lambda index, example: decode_and_crop(index, *example),
                            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return examples.batch(local_batch_size, drop_remainder=True).prefetch(2)

  def finish_rows(images, draws):
    return _finish_train_images(images, draws, augment, source.info)

  positions = process_index * local_batch_size + np.arange(local_batch_size)
  step = start_step
  while True:
    epoch, first_batch = divmod(step, steps_per_epoch)
    for images, labels in epoch_batches(epoch, first_batch).as_numpy_iterator():
      draws = train_draws(seed, step, positions)
      yield {'image': _in_chunks(finish_rows, images, draws), 'label': labels.astype(np.int32)}
      step += 1


def _streamed_eval(source: _Streamed, *, local_batch_size: int, image_size: int,
                   process_index: int, process_count: int,
                   crop_fraction: float) -> Iterator[Batch]:
  """Each process evaluates its shard of the split (``tfds.even_splits``), padded to the
  batch count of the largest shard."""
  tf = _tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  shard = tfds.even_splits(source.eval_split, n=process_count)[process_index]
  largest_shard = -(-_split_size(source, source.eval_split) // process_count)
  num_batches = -(-largest_shard // local_batch_size)
  channels = source.info.channels

  def geometry(height, width):
    return np.array(centre_crop_geometry(int(height), int(width), image_size, crop_fraction),
                    np.int32)

  def decode_resize_crop(encoded, label):
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    shape = tf.shape(image)
    resized_h, resized_w, top, left = tf.unstack(
        tf.numpy_function(geometry, [shape[0], shape[1]], tf.int32), 4)
    image.set_shape([None, None, channels])
    resized = tf.image.resize(image, tf.stack([resized_h, resized_w]), method='bilinear')
    return resized[top:top + image_size, left:left + image_size], label

  examples = _encoded_examples(source, shard, shuffle_seed=None).map(
      decode_resize_crop, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  batches = examples.batch(local_batch_size).prefetch(2).as_numpy_iterator()
  empty = np.zeros((0, image_size, image_size, channels), np.float32), np.zeros(0, np.int64)
  for _ in range(num_batches):
    images, labels = next(batches, empty)
    count = len(labels)
    pad = local_batch_size - count
    yield {'image': np.pad(_normalize(images, source.info), [(0, pad), (0, 0), (0, 0), (0, 0)]),
           'label': np.pad(labels.astype(np.int32), (0, pad)),
           'mask': (np.arange(local_batch_size) < count).astype(np.float32)}


class _Prefetcher:
  """Iterates ``batches`` in a background thread, up to ``size`` batches ahead, from the
  moment it is created (so the first batches are ready when the trainer has compiled).
  ``close()``, or dropping the iterator, stops the thread."""

  _END = object()

  def __init__(self, batches: Iterator[Batch], size: int = 3):
    self._ready: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(target=self._work, args=(batches, self._ready, self._stop),
                                    daemon=True, name='input-pipeline')
    self._thread.start()
    _LIVE_PREFETCHERS.add(self)

  @classmethod
  def _work(cls, batches: Iterator[Batch], ready: queue.Queue, stop: threading.Event):
    # A classmethod: the thread must not hold the iterator, or dropping it would not stop it.
    def put(item) -> bool:
      while not stop.is_set():
        try:
          ready.put(item, timeout=0.1)
          return True
        except queue.Full:
          continue
      return False

    try:
      for batch in batches:
        if not put(batch):
          return
      put(cls._END)
    except BaseException as error:  # handed to the consumer, who re-raises it
      put(error)

  def __iter__(self) -> '_Prefetcher':
    return self

  def __next__(self) -> Batch:
    if self._done:
      raise StopIteration
    item = self._ready.get()
    if item is self._END or isinstance(item, BaseException):
      self.close()
      if item is self._END:
        raise StopIteration
      raise item
    return item

  def close(self) -> None:
    self._done = True
    self._stop.set()

  def __del__(self):
    self._stop.set()


_LIVE_PREFETCHERS: 'weakref.WeakSet[_Prefetcher]' = weakref.WeakSet()


@atexit.register
def _stop_prefetchers() -> None:
  """Lets the batch threads finish their batch before the interpreter tears down: a daemon
  thread still inside numpy or TensorFlow at exit can abort the process."""
  for prefetcher in list(_LIVE_PREFETCHERS):
    prefetcher.close()
    prefetcher._thread.join(timeout=10)  # pylint: disable=protected-access


def train_batches(dataset: str, *, global_batch_size: int, image_size: int, seed: int,
                  start_step: int = 0, process_index: int = 0, process_count: int = 1,
                  data_dir: Optional[str] = None, augment: str = 'simple',
                  min_crop_scale: float = 0.08) -> Iterator[Batch]:
  """Endless training batches of this process, from step ``start_step`` on.

  Each batch is ``{'image': float32 [B/P, image_size, image_size, C] normalized,
  'label': int32 [B/P]}``: random-resized-crop (area ``min_crop_scale``..1, aspect ratio
  3/4..4/3), horizontal flip (not with ``augment='crop'``), with ``augment='autoaugment'``
  AutoAugment's ImageNet policy,
  then ``(pixel - mean) / std``. Process ``p`` gets rows ``[p*B/P, (p+1)*B/P)`` of the
  global batch of each step (see the module docstring on determinism).
  """
  (global_batch_size, local_batch_size, process_index, process_count,
   image_size) = _check_batching(global_batch_size, process_index, process_count, image_size)
  if augment not in AUGMENTATIONS:
    raise ValueError(f'augment must be one of {AUGMENTATIONS}, got {augment!r}')
  if not 0 < min_crop_scale <= 1:
    raise ValueError(f'min_crop_scale must be in (0, 1], got {min_crop_scale!r}')
  start_step = _integer('start_step', start_step, 0)
  seed = _integer('seed', seed, 0)
  source = _load(dataset, data_dir)
  common = dict(local_batch_size=local_batch_size, image_size=image_size, seed=seed,
                start_step=start_step, process_index=process_index, augment=augment,
                min_crop_scale=min_crop_scale)
  if isinstance(source, _Streamed):
    return _Prefetcher(_streamed_train(source, process_count=process_count, **common))
  return _Prefetcher(_in_memory_train(source, global_batch_size=global_batch_size, **common))


def eval_batches(dataset: str, *, global_batch_size: int, image_size: int,
                 process_index: int = 0, process_count: int = 1,
                 data_dir: Optional[str] = None,
                 crop_fraction: float = 0.875) -> Iterator[Batch]:
  """The evaluation split once, in batches of this process: ``{'image', 'label', 'mask'}``.

  Images are resized (shorter side to ``image_size / crop_fraction``), centre-cropped to
  ``image_size`` and normalized. Every example appears exactly once over all processes and
  batches; the last batches are padded to full size with zero images and ``mask`` 0.
  All processes yield the same number of batches.
  """
  (global_batch_size, local_batch_size, process_index, process_count,
   image_size) = _check_batching(global_batch_size, process_index, process_count, image_size)
  if not 0 < crop_fraction <= 1:
    raise ValueError(f'crop_fraction must be in (0, 1], got {crop_fraction!r}')
  source = _load(dataset, data_dir)
  if isinstance(source, _Streamed):
    return _Prefetcher(_streamed_eval(
        source, local_batch_size=local_batch_size, image_size=image_size,
        process_index=process_index, process_count=process_count, crop_fraction=crop_fraction))
  return _Prefetcher(_in_memory_eval(
      source, global_batch_size=global_batch_size, local_batch_size=local_batch_size,
      image_size=image_size, process_index=process_index, crop_fraction=crop_fraction))
