"""TFDS datasets: held in memory when small, else streamed with tf.data. The only module of
the package that imports TensorFlow (through ``tensorflow()``)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from typing import Any, Iterator, Optional, Union

import numpy as np

from repvgg_jax.data import batching, randomness, transforms
from repvgg_jax.data.info import ACCEPTED_DATASETS, Batch, DatasetInfo, imagenet_statistics
from repvgg_jax.data.memory import Images, InMemory

# TFDS datasets whose decoded images take less than this are held in memory; for images of
# assorted sizes the decoded size is guessed from the encoded one (JPEG compresses ~10x).
IN_MEMORY_LIMIT_BYTES = 4 << 30
ENCODED_TO_DECODED = 10
# Examples a streamed dataset shuffles over, in per-process batches: the Flax ImageNet
# example's 16 (ImageNet's files are shuffled and interleaved too). It bounds the memory
# of the stream: 2048 encoded ImageNet JPEGs at a batch of 128, about 230 MB.
STREAM_SHUFFLE_BATCHES = 16


def tensorflow():
  """TensorFlow for data only: it must not take the accelerators JAX trains on. Every
  TensorFlow (and TFDS) import of this package goes through here first."""
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


@dataclasses.dataclass
class Streamed:
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


def load(name: str, data_dir: Optional[str]) -> Union[InMemory, Streamed]:
  """The TFDS dataset ``name`` (prepared when needed), in memory below
  IN_MEMORY_LIMIT_BYTES of decoded images, else streamed."""
  tensorflow()
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
      return Images(list(images)), np.array(labels)

    return InMemory.create(name, *split_arrays('train'), *split_arrays(eval_split),
                           num_classes=features[label_key].num_classes)
  mean, std = imagenet_statistics(channels)
  info = DatasetInfo(name=name, num_classes=features[label_key].num_classes,
                     num_train=num_train, num_eval=splits[eval_split].num_examples,
                     channels=channels, mean=mean, std=std)
  return Streamed(info, builder, 'train', eval_split, image_key, label_key)


def _encoded_examples(source: Streamed, split: str, shuffle_seed: Optional[int],
                      shuffle_buffer: int = 0):
  """The split's (encoded image, label) pairs; shuffled files and, over ``shuffle_buffer``
  examples, examples when a seed is given (tf.data keeps that order deterministic)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False)
  examples = source.builder.as_dataset(
      split=split, shuffle_files=shuffle_seed is not None, read_config=read_config,
      decoders={source.image_key: tfds.decode.SkipDecoding()})
  examples = examples.map(lambda e: (e[source.image_key], e[source.label_key]))
  if shuffle_seed is not None:
    examples = examples.shuffle(shuffle_buffer, seed=shuffle_seed)
  return examples


def _split_size(source: Streamed, split: str) -> int:
  return source.builder.info.splits[split].num_examples


def random_resized_crop_box(draws, height, width, min_scale: float):
  """``transforms.random_resized_crop_boxes`` of one image in TensorFlow ops (for tf.data
  maps): the same float64 arithmetic on the crop columns of one row of draws; returns int32
  ``[top, left, height, width]``."""
  tf = tensorflow()
  height, width = tf.cast(height, tf.int64), tf.cast(width, tf.int64)
  h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  area = tf.cast(height * width, tf.float64) * (
      min_scale + (1 - min_scale) * draws[randomness.AREA])
  log_lo, log_hi = math.log(transforms.CROP_RATIO[0]), math.log(transforms.CROP_RATIO[1])
  ratio = tf.exp(log_lo + (log_hi - log_lo) * draws[randomness.RATIO])
  crop_w = tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int64)
  crop_h = tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int64)
  fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
  first = tf.argmax(tf.cast(fits, tf.int32))
  found = tf.reduce_any(fits)
  # The fallback: the whole image, cut to the nearest allowed aspect ratio.
  in_ratio = w / h
  fallback_w = tf.where(in_ratio > transforms.CROP_RATIO[1],
                        tf.cast(tf.round(h * transforms.CROP_RATIO[1]), tf.int64), width)
  fallback_h = tf.where(in_ratio < transforms.CROP_RATIO[0],
                        tf.cast(tf.round(w / transforms.CROP_RATIO[0]), tf.int64), height)
  crop_h = tf.where(found, crop_h[first], fallback_h)
  crop_w = tf.where(found, crop_w[first], fallback_w)
  top = tf.where(found, tf.cast(tf.floor(draws[randomness.TOP] * tf.cast(
      height - crop_h + 1, tf.float64)), tf.int64), (height - crop_h) // 2)
  left = tf.where(found, tf.cast(tf.floor(draws[randomness.LEFT] * tf.cast(
      width - crop_w + 1, tf.float64)), tf.int64), (width - crop_w) // 2)
  return tf.cast(tf.stack([top, left, crop_h, crop_w]), tf.int32)


def centre_crop_geometry(height, width, image_size: int, crop_fraction: float):
  """``transforms.centre_crop_geometry`` in TensorFlow ops: int32 ``[resized_h,
  resized_w, top, left]``."""
  tf = tensorflow()
  shorter = int(round(image_size / crop_fraction))
  h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  scale = shorter / tf.minimum(h, w)
  resized_h = tf.maximum(image_size, tf.cast(tf.round(h * scale), tf.int32))
  resized_w = tf.maximum(image_size, tf.cast(tf.round(w * scale), tf.int32))
  return tf.stack([resized_h, resized_w, (resized_h - image_size) // 2,
                   (resized_w - image_size) // 2])


def train_batches(source: Streamed, *, local_batch_size: int, image_size: int, seed: int,
                  start_step: int, process_index: int, process_count: int, augment: str,
                  min_crop_scale: float) -> Iterator[Batch]:
  """Each process reads its shard; epoch ``e`` is the shard in an order seeded by (seed, e),
  cut into ``steps_per_epoch`` full batches (the remainder is skipped). The draws of each
  batch are computed with numpy, once per batch, and flow beside the examples; crops are
  computed in TensorFlow ops (no Python per example)."""
  tf = tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  shard = tfds.even_splits(source.train_split, n=process_count,
                           drop_remainder=True)[process_index]
  steps_per_epoch = _split_size(source, shard) // local_batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'{source.info.name}: the per-process batch {local_batch_size} is larger '
                     f'than the per-process shard of the train split')
  channels = source.info.channels
  jpeg = source.builder.info.features[source.image_key].encoding_format == 'jpeg'
  positions = process_index * local_batch_size + np.arange(local_batch_size)

  def batch_draws(step):
    return randomness.train_draws(seed, int(step), positions)

  def decode_and_crop(draws, encoded, label):
    if jpeg:  # decode only the crop
      shape = tf.image.extract_jpeg_shape(encoded)
    else:
      image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
      shape = tf.shape(image)
    box = random_resized_crop_box(draws, shape[0], shape[1], min_crop_scale)
    if jpeg:
      crop = tf.image.decode_and_crop_jpeg(encoded, box, channels=channels)
    else:
      crop = image[box[0]:box[0] + box[2], box[1]:box[1] + box[3]]
    crop.set_shape([None, None, channels])
    return tf.image.resize(crop, [image_size, image_size], method='bilinear'), label

  def epoch_batches(epoch: int, first_batch: int):
    steps = tf.data.Dataset.range(epoch * steps_per_epoch + first_batch,
                                  (epoch + 1) * steps_per_epoch)
    draws = steps.map(lambda step: tf.numpy_function(batch_draws, [step], tf.float64))
    draws = draws.map(lambda d: tf.ensure_shape(d, [local_batch_size, randomness.NUM_DRAWS]))
    shuffle_seed = int(np.random.default_rng([seed, epoch]).integers(2**31))
    examples = _encoded_examples(source, shard, shuffle_seed,
                                 STREAM_SHUFFLE_BATCHES * local_batch_size)
    examples = examples.take(steps_per_epoch * local_batch_size)
    examples = examples.skip(first_batch * local_batch_size)
    examples = tf.data.Dataset.zip((draws.unbatch(), examples))
    examples = examples.map(lambda row, example: decode_and_crop(row, *example),
                            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return examples.batch(local_batch_size, drop_remainder=True).prefetch(2)

  def finish_rows(images, draws):
    return transforms.finish_train_images(images, draws, augment, source.info)

  step = start_step
  while True:
    epoch, first_batch = divmod(step, steps_per_epoch)
    for images, labels in epoch_batches(epoch, first_batch).as_numpy_iterator():
      yield {'image': batching.in_chunks(finish_rows, images, batch_draws(step)),
             'label': labels.astype(np.int32)}
      step += 1


def eval_batches(source: Streamed, *, local_batch_size: int, image_size: int,
                 process_index: int, process_count: int,
                 crop_fraction: float) -> Iterator[Batch]:
  """Each process evaluates its shard of the split (``tfds.even_splits``), padded to the
  batch count of the largest shard."""
  tf = tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  shard = tfds.even_splits(source.eval_split, n=process_count)[process_index]
  largest_shard = -(-_split_size(source, source.eval_split) // process_count)
  num_batches = -(-largest_shard // local_batch_size)
  channels = source.info.channels

  def decode_resize_crop(encoded, label):
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    shape = tf.shape(image)
    resized_h, resized_w, top, left = tf.unstack(
        centre_crop_geometry(shape[0], shape[1], image_size, crop_fraction), 4)
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
    yield {'image': np.pad(transforms.normalize(images, source.info),
                           [(0, pad), (0, 0), (0, 0), (0, 0)]),
           'label': np.pad(labels.astype(np.int32), (0, pad)),
           'mask': (np.arange(local_batch_size) < count).astype(np.float32)}
