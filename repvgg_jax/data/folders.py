"""Image folders: ``root/train/<class>/*`` and ``root/val/<class>/*`` (ImageNet's layout),
decoded without TensorFlow (``decoding``: Pillow, OpenCV).

The file list and labels are indexed once and cached in ``root/INDEX_FILE`` (or, when the
folder is read-only, in ``$XDG_CACHE_HOME/repvgg_jax/``); the cache is rebuilt when the
modification time of any of its directories changes (a file added, removed or renamed).
Folders whose files take less than IN_MEMORY_LIMIT_BYTES are decoded into memory once, and
normalized by their own pixel statistics; bigger ones are streamed: each batch is decoded
from the files in worker processes (``pool``: a script must run under
``if __name__ == '__main__':``), crops decoded at the size they need, with the same plans
of examples and random draws as in memory (``batching``), and ImageNet's normalization.
Streamed images are RGB; their memory does not grow with the number of images (the
index: about 50 bytes per file).

A file that cannot be read or decoded is an ``UnreadableImageError`` naming it when a batch
reads it; with ``skip_unreadable_images`` it is skipped instead, logged the first time and
counted (``decoding.SkippedImages``, ``repvgg_jax.data.skipped_images``): in evaluation its
row is masked out of the metrics, in training the row reads the next readable file of the
split (``stand_ins``), held in memory and streamed alike.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import itertools
import os
import tempfile
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from repvgg_jax.data import batching, decoding, pool, transforms
from repvgg_jax.data.info import Batch, DatasetInfo, imagenet_statistics
from repvgg_jax.data.memory import Images, InMemory

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
SPLITS = ('train', 'val')
# Folders whose image files take less than this are decoded into memory (about 10x that).
IN_MEMORY_LIMIT_BYTES = 64 << 20
INDEX_FILE = '.repvgg_jax_index.npz'
_INDEX_VERSION = 1


@dataclasses.dataclass
class SplitIndex:
  """The images of one split: paths relative to ``directory`` (one UTF-8 blob cut at
  ``offsets``, compact for millions of files), class labels, total size of the files."""
  directory: str
  blob: np.ndarray
  offsets: np.ndarray
  labels: np.ndarray
  file_bytes: int

  def __len__(self) -> int:
    return len(self.labels)

  def paths(self, index: Sequence[int]) -> list[str]:
    """The absolute paths of the images ``index``."""
    return [os.path.join(self.directory,
                         self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode())
            for i in index]


@dataclasses.dataclass
class FolderIndex:
  """Both splits of an image folder and its class names (the train sub-folders, sorted)."""
  root: str
  class_names: list[str]
  splits: dict[str, SplitIndex]


def _join(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  encoded = [s.encode() for s in strings]
  offsets = np.zeros(len(encoded) + 1, np.int64)
  np.cumsum([len(e) for e in encoded], out=offsets[1:])
  return np.frombuffer(b''.join(encoded), np.uint8), offsets


def _split(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
  raw = blob.tobytes()
  return [raw[offsets[i]:offsets[i + 1]].decode() for i in range(len(offsets) - 1)]


def _scan(root: str) -> dict[str, np.ndarray]:
  """Walks both splits: the arrays of the index file."""
  for split in SPLITS:
    if not os.path.isdir(os.path.join(root, split)):
      raise ValueError(f"Image folder {root!r} has no '{split}' sub-folder: expected "
                       f"{root}/train/<class>/<image> and {root}/val/<class>/<image>")
  directories, mtimes, arrays, classes = [], [], {}, {}
  for split in SPLITS:
    split_dir = os.path.join(root, split)
    directories.append(split)
    mtimes.append(os.stat(split_dir).st_mtime_ns)
    found = []  # (class, directory relative to the split, file name, size)
    for class_name in sorted(os.listdir(split_dir)):
      if not os.path.isdir(os.path.join(split_dir, class_name)):
        continue
      pending = [class_name]
      while pending:
        relative = pending.pop()
        directories.append(os.path.join(split, relative))
        mtimes.append(os.stat(os.path.join(split_dir, relative)).st_mtime_ns)
        with os.scandir(os.path.join(split_dir, relative)) as entries:
          for entry in entries:
            if entry.is_dir():
              pending.append(os.path.join(relative, entry.name))
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
              found.append((class_name, relative, entry.name, entry.stat().st_size))
    if not found:
      raise ValueError(f'Image folder {split_dir!r} holds no images (expected '
                       f'{split_dir}/<class>/<image>, extensions '
                       f'{", ".join(IMAGE_EXTENSIONS)})')
    found.sort()  # by class, directory, file name: not the file system's order
    arrays[f'{split}_blob'], arrays[f'{split}_offsets'] = _join(
        [os.path.join(relative, name) for _, relative, name, _ in found])
    arrays[f'{split}_bytes'] = np.int64(sum(size for *_, size in found))
    classes[split] = [class_name for class_name, *_ in found]
  class_names = sorted(set(classes['train']))
  unknown = sorted(set(classes['val']) - set(class_names))
  if unknown:
    raise ValueError(f'Image folder {root!r}: val classes {unknown} have no train images')
  class_index = {name: i for i, name in enumerate(class_names)}
  for split in SPLITS:
    arrays[f'{split}_labels'] = np.array([class_index[c] for c in classes[split]], np.int32)
  arrays['classes_blob'], arrays['classes_offsets'] = _join(class_names)
  arrays['directories_blob'], arrays['directories_offsets'] = _join(directories)
  arrays['mtimes'] = np.array(mtimes, np.int64)
  arrays['version'] = np.int64(_INDEX_VERSION)
  return arrays


def _is_current(root: str, arrays) -> bool:
  """Whether every directory of a cached index still has its modification time."""
  if int(arrays['version']) != _INDEX_VERSION:
    return False
  directories = _split(arrays['directories_blob'], arrays['directories_offsets'])
  try:
    return all(os.stat(os.path.join(root, d)).st_mtime_ns == m
               for d, m in zip(directories, arrays['mtimes']))
  except OSError:  # a directory went away
    return False


def index_paths(root: str) -> list[str]:
  """Where the index of ``root`` is cached: in the folder, else in the user's cache."""
  cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  digest = hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:20]
  return [os.path.join(root, INDEX_FILE),
          os.path.join(cache, 'repvgg_jax', f'folder_index_{digest}.npz')]


def _write(path: str, arrays: dict[str, np.ndarray]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # Written aside and renamed: another process never reads half an index.
  descriptor, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix='.npz')
  try:
    with os.fdopen(descriptor, 'wb') as f:
      np.savez(f, **arrays)
    os.replace(temporary, path)
  except BaseException:
    os.unlink(temporary)
    raise


def index(root: str) -> FolderIndex:
  """The images and classes of the folder ``root``, from its cached index when current."""
  arrays = None
  for path in index_paths(root):
    try:
      with np.load(path) as cached:
        candidate = dict(cached)
    except (OSError, ValueError, KeyError):
      continue
    if _is_current(root, candidate):
      arrays = candidate
      break
  if arrays is None:
    arrays = _scan(root)
    for path in index_paths(root):
      try:
        _write(path, arrays)
        break
      except OSError:  # read-only: try the next place; without one, index every time
        continue
  splits = {split: SplitIndex(os.path.join(root, split), arrays[f'{split}_blob'],
                              arrays[f'{split}_offsets'], arrays[f'{split}_labels'],
                              int(arrays[f'{split}_bytes']))
            for split in SPLITS}
  class_names = _split(arrays['classes_blob'], arrays['classes_offsets'])
  return FolderIndex(root, class_names, splits)


@dataclasses.dataclass
class StreamedFolder:
  """An image folder decoded batch by batch from its files."""
  info: DatasetInfo
  train: SplitIndex
  eval: SplitIndex
  skipped: decoding.SkippedImages = dataclasses.field(default_factory=decoding.SkippedImages)


def stand_ins(example: int, num_examples: int) -> Iterator[int]:
  """The examples a training row of ``example`` tries in turn, with
  ``skip_unreadable_images``, until one's file can be read: ``example`` itself, then the
  next files of the split in its (sorted) order, cyclically."""
  # Why the next file: it is a function of the example alone, so the worker that holds the
  # row finds it by itself and the batch of a step stays a function of (dataset, seed, step,
  # batch size) whatever the workers and processes; sorted by class, it is almost always of
  # the same class, which keeps the class balance; and the batch stays full of real images
  # (a zero image would need a mask that the train step, BatchNorm's statistics and mixup
  # would all have to honour). The row keeps its own random draws.
  return itertools.chain(range(example, num_examples), range(example))


def _decoded(path: str) -> Union[np.ndarray, decoding.UnreadableImageError]:
  """The image at ``path``, or the error that says why it cannot be read."""
  try:
    return decoding.decode(path)
  except decoding.UnreadableImageError as error:
    return error


def load(root: str) -> Union[InMemory, StreamedFolder]:
  """The folder ``root``: in memory below IN_MEMORY_LIMIT_BYTES of files, else streamed.
  In memory, images stay 1-channel when all of them are grayscale, else become RGB, and an
  unreadable file's place holds the image and label of its stand-in (``stand_ins``), read
  by training batches that skip it (evaluation masks it out)."""
  folder = index(root)
  train, val = folder.splits['train'], folder.splits['val']
  name, num_classes = f'folder:{root}', len(folder.class_names)
  if train.file_bytes + val.file_bytes > IN_MEMORY_LIMIT_BYTES:
    mean, std = imagenet_statistics(3)
    info = DatasetInfo(name=name, num_classes=num_classes, num_train=len(train),
                       num_eval=len(val), channels=3, mean=mean, std=std)
    return StreamedFolder(info, train, val)
  images, labels, unreadable = {}, {}, {}
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as threads:
    for split, files in folder.splits.items():
      # Pillow releases the GIL while it decodes.
      images[split] = list(threads.map(_decoded, files.paths(range(len(files)))))
      unreadable[split] = {i: image for i, image in enumerate(images[split])
                           if isinstance(image, decoding.UnreadableImageError)}
      if len(unreadable[split]) == len(files):
        raise ValueError(f'Image folder {files.directory!r}: none of its {len(files)} '
                         f'images can be read ({unreadable[split][0]})')
      labels[split] = files.labels.copy()
      for i in unreadable[split]:
        stand_in = next(j for j in stand_ins(i, len(files)) if j not in unreadable[split])
        images[split][i], labels[split][i] = images[split][stand_in], labels[split][stand_in]
  channels = 1 if all(image.shape[-1] == 1 for split in SPLITS
                      for image in images[split]) else 3
  train_images, val_images = (
      Images([image if image.shape[-1] == channels else np.repeat(image, channels, axis=-1)
              for image in images[split]]) for split in SPLITS)
  return dataclasses.replace(
      InMemory.create(name, train_images, labels['train'], val_images, labels['val'],
                      num_classes=num_classes),
      train_unreadable=unreadable['train'], eval_unreadable=unreadable['val'])


def _skip(error: decoding.UnreadableImageError, skip_unreadable_images: bool,
          skipped: list[decoding.UnreadableImageError]) -> None:
  """Raises ``error``, or with ``skip_unreadable_images`` appends it to ``skipped``."""
  if not skip_unreadable_images:
    raise error
  skipped.append(error)


def _read(split: SplitIndex, candidates: Iterator[int], skip_unreadable_images: bool,
          skipped: list[decoding.UnreadableImageError]) -> tuple[int, decoding.Encoded]:
  """The next of ``candidates`` whose file can be read, and that file (see ``_skip`` for
  those that cannot)."""
  for example in candidates:
    try:
      return example, decoding.read(split.paths([example])[0])
    except decoding.UnreadableImageError as error:
      _skip(error, skip_unreadable_images, skipped)
  raise ValueError(f'Image folder {split.directory!r}: none of its {len(split)} images can '
                   f'be read ({skipped[0]})')


def train_rows(split: SplitIndex, examples: np.ndarray, draws: np.ndarray, *,
               image_size: int, augment: str, min_crop_scale: float, info: DatasetInfo,
               skip_unreadable_images: bool,
               out: np.ndarray) -> tuple[np.ndarray, list[decoding.UnreadableImageError]]:
  """Training rows of a streamed folder (in a worker), into ``out``: random-resized crops
  of the images ``examples`` (with ``skip_unreadable_images``, of their ``stand_ins`` where
  unreadable), flipped, augmented and normalized like in memory. Returns the rows' labels
  and the errors of the files skipped."""
  candidates = [stand_ins(example, len(split)) for example in examples.tolist()]
  read, images, skipped = examples.copy(), [None] * len(examples), []
  # Rounds over the rows still without an image: all of them, then those whose file had a
  # readable header but pixels that do not decode, on their next stand-in. A round's boxes
  # are computed together: about 1 us a row, against 0.1 ms for one row alone.
  pending = np.arange(len(examples))
  while len(pending):
    opened = [_read(split, candidates[row], skip_unreadable_images, skipped)
              for row in pending]
    read[pending] = [example for example, _ in opened]
    encoded = [file for _, file in opened]
    boxes = transforms.random_resized_crop_boxes(
        draws[pending], np.array([e.height for e in encoded]),
        np.array([e.width for e in encoded]), min_crop_scale)
    undecodable = []
    for row, file, *box in zip(pending, encoded, *boxes):
      try:
        images[row] = decoding.decode_crop(file, *box, image_size, info.channels)
      except decoding.UnreadableImageError as error:
        _skip(error, skip_unreadable_images, skipped)
        undecodable.append(row)
    pending = np.array(undecodable, np.int64)
  transforms.finish_train_images(np.stack(images), draws, augment, info, out)
  return split.labels[read], skipped


def eval_rows(split: SplitIndex, examples: np.ndarray, mask: np.ndarray, *, image_size: int,
              crop_fraction: float, info: DatasetInfo, skip_unreadable_images: bool,
              out: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, list[decoding.UnreadableImageError]]:
  """Evaluation rows of a streamed folder (in a worker), into ``out``: resized,
  centre-cropped and normalized. Returns the rows' labels and mask (False, with zero images
  and labels, for the padding rows and the unreadable files skipped) and the errors of
  those files."""
  mask, skipped = mask.copy(), []
  for row, path in zip(np.flatnonzero(mask), split.paths(examples[mask])):
    try:
      encoded = decoding.read(path)
      box = transforms.eval_box(encoded.height, encoded.width, image_size, crop_fraction)
      transforms.normalize(decoding.decode_crop(encoded, *box, image_size, info.channels),
                           info, out[row])
    except decoding.UnreadableImageError as error:
      _skip(error, skip_unreadable_images, skipped)
      mask[row] = False
  out[~mask] = 0
  return np.where(mask, split.labels[examples], 0).astype(np.int32), mask, skipped


def train_batches(source: StreamedFolder, *, global_batch_size: int, local_batch_size: int,
                  image_size: int, seed: int, start_step: int, process_index: int,
                  augment: str, min_crop_scale: float,
                  skip_unreadable_images: bool) -> Iterator[Batch]:
  """Endless training batches of ``batching.train_plan``, decoded by ``pool`` (which
  receives the file index once, then example numbers and draws)."""
  rows = functools.partial(train_rows, image_size=image_size, augment=augment,
                           min_crop_scale=min_crop_scale, info=source.info,
                           skip_unreadable_images=skip_unreadable_images)
  plan = batching.train_plan(len(source.train), global_batch_size=global_batch_size,
                             local_batch_size=local_batch_size, seed=seed,
                             start_step=start_step, process_index=process_index)
  for images, chunks in pool.map_batches(
      ((rows, columns) for columns in plan), rows=local_batch_size, context=source.train,
      row_shape=(image_size, image_size, source.info.channels)):
    labels, skipped = zip(*chunks)
    source.skipped.add(itertools.chain(*skipped), training=True)
    yield {'image': images, 'label': np.concatenate(labels)}


def eval_batches(source: StreamedFolder, *, global_batch_size: int, local_batch_size: int,
                 image_size: int, process_index: int, crop_fraction: float,
                 skip_unreadable_images: bool) -> Iterator[Batch]:
  """The evaluation batches of ``batching.eval_plan``, decoded by ``pool``."""
  rows = functools.partial(eval_rows, image_size=image_size, crop_fraction=crop_fraction,
                           info=source.info, skip_unreadable_images=skip_unreadable_images)
  plan = batching.eval_plan(len(source.eval), global_batch_size=global_batch_size,
                            local_batch_size=local_batch_size, process_index=process_index)
  for images, chunks in pool.map_batches(
      ((rows, columns) for columns in plan), rows=local_batch_size, context=source.eval,
      row_shape=(image_size, image_size, source.info.channels)):
    labels, masks, skipped = zip(*chunks)
    source.skipped.add(itertools.chain(*skipped), training=False)
    yield {'image': images, 'label': np.concatenate(labels),
           'mask': np.concatenate(masks).astype(np.float32)}
