"""The input pipeline: deterministic training batches, exact evaluation, clear errors."""

import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from repvgg_jax import autoaugment
from repvgg_jax import data
from repvgg_jax.checkpoint import IMAGENET_MEAN
from repvgg_jax.data import (batching, decoding, fashion_mnist, folders, memory, pool,
                             randomness, transforms)
from test_imports import BLOCKER, ROOT

needs_fashion_mnist = pytest.mark.skipif(
    not data.debian_fashion_mnist_present(),
    reason=f'Debian Fashion-MNIST files not in {fashion_mnist.DEBIAN_FASHION_MNIST_DIR}')


def take(batches, count):
  return [next(batches) for _ in range(count)]


def pixels(batch_images, info):
  """Normalized images back in [0, 255] pixel units."""
  return batch_images * np.asarray(info.std) + np.asarray(info.mean)


# ------------------------------------------------------------------------------------------
# Fashion-MNIST (Debian's files): the embedded default.


@needs_fashion_mnist
def test_fashion_mnist_info_matches_the_dataset():
  info = data.dataset_info('fashion_mnist')
  assert (info.num_classes, info.num_train, info.num_eval, info.channels) == (10, 60000, 10000, 1)
  # Fashion-MNIST's well-known pixel statistics: mean 0.2860, std 0.3530 of 255.
  np.testing.assert_allclose(info.mean, [0.2860 * 255], rtol=1e-3)
  np.testing.assert_allclose(info.std, [0.3530 * 255], rtol=1e-3)


@needs_fashion_mnist
@pytest.mark.parametrize('augment', ['simple', 'autoaugment', 'randaugment'])
def test_train_batches_have_the_promised_shapes_and_ranges(augment):
  info = data.dataset_info('fashion_mnist')
  batch = next(data.train_batches('fashion_mnist', global_batch_size=16, image_size=32, seed=0,
                                augment=augment))
  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (16, 32, 32, 1) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (16,) and batch['label'].dtype == np.int32
  assert batch['label'].min() >= 0 and batch['label'].max() < 10
  values = pixels(batch['image'], info)
  assert values.min() >= -1e-3 and values.max() <= 255 + 1e-3
  assert values.std() > 10  # images, not blanks


@needs_fashion_mnist
@pytest.mark.parametrize('augment', ['simple', 'crop'])
def test_whole_image_crops_are_the_shuffled_training_images_mirrored_half_the_time(augment):
  # 'simple' mirrors about half of them; 'crop' none.
  info = data.dataset_info('fashion_mnist')
  source = data.load('fashion_mnist', None)
  batch = next(data.train_batches('fashion_mnist', global_batch_size=64, image_size=28, seed=0,
                                min_crop_scale=1.0, augment=augment))
  examples = randomness.EpochPermutations(0, info.num_train).examples(np.arange(64))
  originals = source.train_images.images[examples]
  images = pixels(batch['image'], info)
  same = np.isclose(images, originals, atol=1e-3).all(axis=(1, 2, 3))
  mirrored = np.isclose(images, originals[:, :, ::-1], atol=1e-3).all(axis=(1, 2, 3))
  assert (same | mirrored).all()
  if augment == 'crop':
    assert same.all()
  else:
    assert 16 < (mirrored & ~same).sum() < 48
  np.testing.assert_array_equal(batch['label'], source.train_labels[examples])


@needs_fashion_mnist
def test_start_step_resumes_exactly_where_stepping_gets():
  kwargs = dict(global_batch_size=8, image_size=24, seed=3, augment='autoaugment')
  stepped = take(data.train_batches('fashion_mnist', **kwargs), 4)
  resumed = take(data.train_batches('fashion_mnist', start_step=2, **kwargs), 2)
  for a, b in zip(stepped[2:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert not np.array_equal(stepped[0]['image'], stepped[1]['image'])
  other_seed = next(data.train_batches('fashion_mnist', **{**kwargs, 'seed': 4}))
  assert not np.array_equal(other_seed['image'], stepped[0]['image'])


@needs_fashion_mnist
def test_processes_receive_their_rows_of_the_global_batch():
  kwargs = dict(global_batch_size=8, image_size=24, seed=0, start_step=5)
  whole = next(data.train_batches('fashion_mnist', **kwargs))
  halves = [next(data.train_batches('fashion_mnist', process_index=p, process_count=2, **kwargs))
            for p in range(2)]
  for key in ('image', 'label'):
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])


@needs_fashion_mnist
def test_batches_do_not_depend_on_the_number_of_augmentation_threads(monkeypatch):
  kwargs = dict(global_batch_size=10, image_size=20, seed=0, augment='autoaugment')
  monkeypatch.setattr(batching, 'AUGMENT_THREADS', 1)
  one = take(data.train_batches('fashion_mnist', **kwargs), 2)
  evaluated_by_one = next(data.eval_batches('fashion_mnist', global_batch_size=10, image_size=20))
  monkeypatch.setattr(batching, 'AUGMENT_THREADS', 3)
  batching.augment_pool.cache_clear()
  three = take(data.train_batches('fashion_mnist', **kwargs), 2)
  evaluated_by_three = next(data.eval_batches('fashion_mnist', global_batch_size=10,
                                            image_size=20))
  batching.augment_pool.cache_clear()
  for a, b in zip(one + [evaluated_by_one], three + [evaluated_by_three]):
    np.testing.assert_array_equal(a['image'], b['image'])


def test_each_epoch_visits_every_training_example_once_in_a_new_order():
  order = randomness.EpochPermutations(seed=0, size=1000)
  stream = order.examples(np.arange(3000))  # what consecutive batches read
  epochs = stream.reshape(3, 1000)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(1000))
  assert not np.array_equal(epochs[0], epochs[1])
  # A batch straddling two epochs reads the end of one and the start of the next.
  np.testing.assert_array_equal(
      randomness.EpochPermutations(0, 1000).examples(np.arange(995, 1005)), stream[995:1005])


@needs_fashion_mnist
def test_eval_with_full_crop_at_native_size_returns_the_test_images():
  info = data.dataset_info('fashion_mnist')
  batches = list(data.eval_batches('fashion_mnist', global_batch_size=4096, image_size=28,
                                 crop_fraction=1.0))
  assert [len(b['label']) for b in batches] == [4096] * 3
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == info.num_eval and mask[:info.num_eval].all()
  source = data.load('fashion_mnist', None)
  images = pixels(np.concatenate([b['image'] for b in batches])[:info.num_eval], info)
  np.testing.assert_allclose(images, source.eval_images.images, atol=1e-3)
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches])[:info.num_eval],
                                source.eval_labels)


@needs_fashion_mnist
def test_eval_resizes_then_centre_crops():
  batch = next(data.eval_batches('fashion_mnist', global_batch_size=2, image_size=14))
  assert batch['image'].shape == (2, 14, 14, 1)
  # 28 -> 16 (= 14 / 0.875) -> centre 14: a 1-pixel border of the resized image goes.
  assert transforms.centre_crop_geometry(28, 28, 14, 0.875) == (16, 16, 1, 1)
  assert transforms.centre_crop_geometry(300, 400, 224, 0.875) == (256, 341, 16, 58)


# ------------------------------------------------------------------------------------------
# A folder of class sub-folders.


def write_image(path, array, **options):
  """``array`` saved to ``path`` (PNG, JPEG, ... by its extension) with Pillow."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path, **options)


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  """train/: 3 classes x 3 RGB images of assorted sizes; val/: 7 flat images whose gray
  level, 10 * k + 5, identifies each example k."""
  root = tmp_path_factory.mktemp('folder')
  rng = np.random.default_rng(0)
  for c, name in enumerate(['cat', 'dog', 'emu']):
    for i, shape in enumerate([(20, 30, 3), (24, 24, 3), (31, 17, 3)]):
      write_image(str(root / 'train' / name / f'{i}.png'),
                  rng.integers(0, 256, shape, dtype=np.uint8))
  for k in range(7):
    write_image(str(root / 'val' / ['cat', 'dog', 'emu'][k % 3] / f'{k}.png'),
                np.full((18 + k, 22, 3), 10 * k + 5, np.uint8))
  return f'folder:{root}'


def test_folder_info(image_folder):
  info = data.dataset_info(image_folder)
  assert (info.num_classes, info.num_train, info.num_eval, info.channels) == (3, 9, 7, 3)


def test_folder_train_batches_are_deterministic_and_split_by_process(image_folder):
  kwargs = dict(global_batch_size=4, image_size=16, seed=1)
  stepped = take(data.train_batches(image_folder, **kwargs), 3)
  resumed = next(data.train_batches(image_folder, start_step=2, **kwargs))
  np.testing.assert_array_equal(stepped[2]['image'], resumed['image'])
  halves = [next(data.train_batches(image_folder, start_step=2, process_index=p,
                                  process_count=2, **kwargs)) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([h['image'] for h in halves]), resumed['image'])
  assert resumed['image'].shape == (4, 16, 16, 3)


def test_folder_eval_covers_every_example_once_across_processes(image_folder):
  info = data.dataset_info(image_folder)
  seen, padding = [], 0
  for process in range(2):
    batches = list(data.eval_batches(image_folder, global_batch_size=4, image_size=8,
                                   process_index=process, process_count=2))
    assert len(batches) == 2  # ceil(7 / 4) on every process
    for batch in batches:
      assert batch['image'].shape == (2, 8, 8, 3) and batch['mask'].shape == (2,)
      real = batch['mask'] == 1
      levels = pixels(batch['image'][real], info).mean(axis=(1, 2, 3))
      seen.extend(np.round((levels - 5) / 10).astype(int))
      np.testing.assert_array_equal(batch['label'][real], np.round((levels - 5) / 10) % 3)
      assert not batch['image'][~real].any()
      padding += int((~real).sum())
  assert sorted(seen) == list(range(7)) and padding == 1


def test_empty_folder_is_a_clear_error(tmp_path):
  for split in ('train', 'val'):
    (tmp_path / split / 'cat').mkdir(parents=True)
  (tmp_path / 'train' / 'cat' / 'notes.txt').write_text('not an image')
  with pytest.raises(ValueError, match='holds no images'):
    data.dataset_info(f'folder:{tmp_path}')


# ------------------------------------------------------------------------------------------
# Image folders streamed from their files by worker processes.


@pytest.fixture(scope='module')
def jpeg_folder(tmp_path_factory):
  """train/: 3 classes x 4 JPEGs of assorted sizes (one grayscale); val/: 5 flat PNGs whose
  gray level, 10 * k + 5, identifies each example k."""
  root = tmp_path_factory.mktemp('jpegs')
  rng = np.random.default_rng(1)
  for c, name in enumerate(['ant', 'bee', 'cow']):
    for i, shape in enumerate([(40, 60, 3), (64, 48, 3), (33, 90, 3), (50, 50, 1)]):
      write_image(str(root / 'train' / name / f'{i}.jpg'),
                  rng.integers(0, 256, shape, dtype=np.uint8), quality=90)
  for k in range(5):
    write_image(str(root / 'val' / ['ant', 'bee', 'cow'][k % 3] / f'{k}.png'),
                np.full((30 + k, 36, 3), 10 * k + 5, np.uint8))
  return f'folder:{root}'


@pytest.fixture
def streamed_folders(monkeypatch):
  """Image folders are streamed, as if too big for memory."""
  data.load.cache_clear()
  monkeypatch.setattr(folders, 'IN_MEMORY_LIMIT_BYTES', 0)
  yield
  data.load.cache_clear()


def test_streamed_folder_batches_are_deterministic_whatever_the_workers(
    jpeg_folder, streamed_folders, monkeypatch):
  info = data.dataset_info(jpeg_folder)
  assert (info.num_classes, info.num_train, info.num_eval, info.channels) == (3, 12, 5, 3)
  kwargs = dict(global_batch_size=4, image_size=16, seed=2, augment='autoaugment')
  monkeypatch.setattr(pool, 'WORKERS', 1)
  stepped = take(data.train_batches(jpeg_folder, **kwargs), 4)  # 3 steps per epoch
  monkeypatch.setattr(pool, 'WORKERS', 2)
  resumed = next(data.train_batches(jpeg_folder, start_step=3, **kwargs))
  halves = [next(data.train_batches(jpeg_folder, start_step=3, process_index=p,
                                    process_count=2, **kwargs)) for p in range(2)]
  for key in ('image', 'label'):
    np.testing.assert_array_equal(stepped[3][key], resumed[key])
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), resumed[key])
  assert resumed['image'].shape == (4, 16, 16, 3) and resumed['image'].dtype == np.float32
  # The epoch visits every training image once, with its label.
  labels = np.concatenate([b['label'] for b in stepped[:3]])
  np.testing.assert_array_equal(np.bincount(labels), [4, 4, 4])
  assert not np.array_equal(stepped[0]['image'], stepped[1]['image'])


def test_streamed_folder_crops_follow_the_in_memory_plan(jpeg_folder, streamed_folders,
                                                         monkeypatch):
  """Whole-image crops of the square grayscale images: the streamed batch holds the same
  examples, mirrored alike, as the in-memory one (decoded and resampled by OpenCV instead
  of Pillow and numpy)."""
  kwargs = dict(global_batch_size=12, image_size=50, seed=0, min_crop_scale=1.0)
  streamed = next(data.train_batches(jpeg_folder, **kwargs))
  streamed_info = data.dataset_info(jpeg_folder)
  monkeypatch.setattr(folders, 'IN_MEMORY_LIMIT_BYTES', 1 << 30)
  data.load.cache_clear()
  in_memory = next(data.train_batches(jpeg_folder, **kwargs))
  in_memory_info = data.dataset_info(jpeg_folder)
  np.testing.assert_array_equal(streamed['label'], in_memory['label'])
  square = np.abs(pixels(in_memory['image'], in_memory_info).std(axis=-1)).max(axis=(1, 2)) < 1
  assert square.sum() == 3
  np.testing.assert_allclose(pixels(streamed['image'][square], streamed_info),
                             pixels(in_memory['image'][square], in_memory_info), atol=2)


def test_streamed_folder_eval_covers_every_example_once_across_processes(jpeg_folder,
                                                                         streamed_folders):
  info = data.dataset_info(jpeg_folder)
  seen, padding = [], 0
  for process in range(2):
    batches = list(data.eval_batches(jpeg_folder, global_batch_size=4, image_size=8,
                                     process_index=process, process_count=2))
    assert len(batches) == 2  # ceil(5 / 4) on every process
    for batch in batches:
      real = batch['mask'] == 1
      levels = pixels(batch['image'][real], info).mean(axis=(1, 2, 3))
      np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
      seen.extend(np.round((levels - 5) / 10).astype(int))
      np.testing.assert_array_equal(batch['label'][real], np.round((levels - 5) / 10) % 3)
      assert not batch['image'][~real].any()
      padding += int((~real).sum())
  assert sorted(seen) == list(range(5)) and padding == 3


# ------------------------------------------------------------------------------------------
# Image files that cannot be read.


@pytest.fixture(scope='module')
def corrupt_folder(tmp_path_factory):
  """train/: 6 flat 8x8 JPEGs, ant/0-2 and bee/3-5, whose gray level, 30 * k + 15,
  identifies file k (the index's order), but ant/1.jpg is not an image and bee/4.jpg is cut
  short (its header reads, its pixels do not); val/: 4 flat PNGs, ant/0-1 and bee/2-3,
  alike, but bee/2.png is not an image."""
  root = tmp_path_factory.mktemp('corrupt')
  for split, extension, count in (('train', 'jpg', 6), ('val', 'png', 4)):
    for k in range(count):
      name = 'ant' if k < count // 2 else 'bee'
      write_image(str(root / split / name / f'{k}.{extension}'),
                  np.full((8, 8, 3), 30 * k + 15, np.uint8))
  for path in (root / 'train' / 'ant' / '1.jpg', root / 'val' / 'bee' / '2.png'):
    path.write_bytes(b'not an image')
  truncated = root / 'train' / 'bee' / '4.jpg'
  truncated.write_bytes(truncated.read_bytes()[:-2])  # without its end-of-image marker
  return f'folder:{root}'


@pytest.fixture(params=['in memory', 'streamed'])
def storage(request, monkeypatch):
  """Image folders held in memory (small ones are), or streamed as if too big."""
  data.load.cache_clear()
  if request.param == 'streamed':
    monkeypatch.setattr(folders, 'IN_MEMORY_LIMIT_BYTES', 0)
  yield request.param
  data.load.cache_clear()


def file_numbers(batch_images, info):
  """The k of each flat image of ``corrupt_folder`` (gray level 30 * k + 15)."""
  return np.round((pixels(batch_images, info).mean(axis=(1, 2, 3)) - 15) / 30).astype(int)


def skip_warnings(caplog, path):
  return [r for r in caplog.records if r.levelno == logging.WARNING and path in r.getMessage()]


def corrupt_files(folder, split):
  root = folder[len('folder:'):]
  names = {'train': [('ant', '1.jpg'), ('bee', '4.jpg')], 'val': [('bee', '2.png')]}[split]
  return [os.path.join(root, split, *name) for name in names]


def test_unreadable_image_is_an_error_naming_the_file(corrupt_folder, storage):
  train = data.train_batches(corrupt_folder, global_batch_size=6, image_size=8, seed=0)
  named = '|'.join(map(re.escape, corrupt_files(corrupt_folder, 'train')))
  with pytest.raises(ValueError, match=f'Cannot read image ({named}): '):
    next(train)  # the whole split
  evaluation = data.eval_batches(corrupt_folder, global_batch_size=4, image_size=8)
  with pytest.raises(ValueError, match=re.escape(
      f'Cannot read image {corrupt_files(corrupt_folder, "val")[0]}: ')):
    next(evaluation)


def test_skipped_training_images_read_the_next_file_whatever_the_workers(
    corrupt_folder, storage, monkeypatch, caplog):
  broken = corrupt_files(corrupt_folder, 'train')
  caplog.set_level(logging.WARNING)
  kwargs = dict(global_batch_size=6, image_size=8, seed=0, skip_unreadable_images=True)
  monkeypatch.setattr(pool, 'WORKERS', 1)
  epochs = take(data.train_batches(corrupt_folder, **kwargs), 2)
  info = data.dataset_info(corrupt_folder)
  assert isinstance(data.load(corrupt_folder, None), memory.InMemory) == (
      storage == 'in memory')
  for batch in epochs:
    # Every file once, but the rows of ant/1.jpg and bee/4.jpg read the next files, ant/2.jpg
    # and bee/5.jpg, with their labels.
    numbers = file_numbers(batch['image'], info)
    assert sorted(numbers) == [0, 2, 2, 3, 5, 5]
    np.testing.assert_array_equal(batch['label'], numbers >= 3)
  # Logged once however often skipped, and counted.
  assert [len(skip_warnings(caplog, path)) for path in broken] == [1, 1]
  assert sorted(data.skipped_images(corrupt_folder)) == broken
  if storage == 'streamed':  # 3 workers (and resuming at step 1): the same batch
    monkeypatch.setattr(pool, 'WORKERS', 3)
    resumed = next(data.train_batches(corrupt_folder, start_step=1, **kwargs))
    for key in ('image', 'label'):
      np.testing.assert_array_equal(resumed[key], epochs[1][key])


def test_skipped_evaluation_images_are_masked_out(corrupt_folder, storage, caplog):
  broken = corrupt_files(corrupt_folder, 'val')
  caplog.set_level(logging.WARNING)
  batches = list(data.eval_batches(corrupt_folder, global_batch_size=4, image_size=8,
                                   skip_unreadable_images=True))
  assert len(batches) == 1
  batch = batches[0]
  np.testing.assert_array_equal(batch['mask'], [1, 1, 0, 1])
  np.testing.assert_array_equal(batch['label'], [0, 0, 0, 1])
  assert not batch['image'][2].any()
  real = batch['mask'] == 1
  np.testing.assert_array_equal(
      file_numbers(batch['image'][real], data.dataset_info(corrupt_folder)), [0, 1, 3])
  assert len(skip_warnings(caplog, broken[0])) == 1
  assert data.skipped_images(corrupt_folder) == broken


def test_big_jpeg_crops_are_decoded_at_a_reduced_scale_and_resampled_like_numpy(
    tmp_path, monkeypatch):
  """A 640x480 smooth JPEG cropped to 32x32: a 320x320 box and the evaluation box (415
  pixels, fractional) are decoded at 1/8 scale (the boxes stay over 32 pixels wide), and
  resampled like transforms.bilinear (no antialiasing; on a smooth image, within a few
  levels)."""
  cv2 = pytest.importorskip('cv2')
  y, x = np.mgrid[0:480, 0:640]
  smooth = np.stack([x * 255 / 639, y * 255 / 479, (x + y) * 255 / 1118], -1).astype(np.uint8)
  path = str(tmp_path / 'big.jpg')
  write_image(path, smooth, quality=95)
  flags = []
  imdecode = cv2.imdecode
  monkeypatch.setattr(cv2, 'imdecode', lambda data, flag: flags.append(flag) or
                      imdecode(data, flag))
  encoded = decoding.read(path)
  assert (encoded.height, encoded.width, encoded.jpeg) == (480, 640, True)
  whole = decoding.decode(path)
  for box in [(80, 100, 320, 320), transforms.eval_box(480, 640, 32, 0.875)]:
    crop = decoding.decode_crop(encoded, *box, 32, 3)
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
    np.testing.assert_allclose(crop, transforms.bilinear(whole, *box, 32), atol=6)
  assert flags == [cv2.IMREAD_REDUCED_COLOR_8 | cv2.IMREAD_IGNORE_ORIENTATION] * 2

def test_folder_index_is_cached_and_refreshed_when_the_folder_changes(tmp_path):
  for split in ('train', 'val'):
    write_image(str(tmp_path / split / 'cat' / '0.png'), np.zeros((8, 8, 3), np.uint8))
  first = folders.index(str(tmp_path))
  assert os.path.exists(tmp_path / folders.INDEX_FILE)
  assert first.splits['train'].paths([0]) == [str(tmp_path / 'train' / 'cat' / '0.png')]
  write_image(str(tmp_path / 'train' / 'dog' / '1.png'), np.zeros((8, 8, 3), np.uint8))
  second = folders.index(str(tmp_path))
  assert second.class_names == ['cat', 'dog'] and len(second.splits['train']) == 2
  np.testing.assert_array_equal(second.splits['train'].labels, [0, 1])


def test_folder_index_goes_to_the_user_cache_when_the_folder_is_not_writable(
    tmp_path, monkeypatch):
  root = tmp_path / 'images'
  for split in ('train', 'val'):
    write_image(str(root / split / 'cat' / '0.png'), np.zeros((8, 8, 3), np.uint8))
  (root / folders.INDEX_FILE).mkdir()  # the index file cannot be written there
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  in_folder, in_cache = folders.index_paths(str(root))
  assert in_cache.startswith(str(tmp_path / 'cache'))
  assert len(folders.index(str(root)).splits['val']) == 1
  assert os.path.isfile(in_cache) and os.path.isdir(in_folder)

def test_fashion_mnist_and_folders_work_without_tensorflow(jpeg_folder):
  script = BLOCKER + f"""
from repvgg_jax import data
from repvgg_jax.data import folders
for dataset in ({jpeg_folder!r}, 'fashion_mnist'):
  for limit in (0, folders.IN_MEMORY_LIMIT_BYTES):
    folders.IN_MEMORY_LIMIT_BYTES = limit
    data.load.cache_clear()
    if dataset != 'fashion_mnist' or data.debian_fashion_mnist_present():
      train = next(data.train_batches(dataset, global_batch_size=4, image_size=8, seed=0))
      evaluation = next(data.eval_batches(dataset, global_batch_size=4, image_size=8))
      assert train['image'].shape[:3] == evaluation['image'].shape[:3] == (4, 8, 8)
assert 'tensorflow' not in sys.modules
"""
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]


# ------------------------------------------------------------------------------------------
# TFDS datasets.


@pytest.fixture(scope='module')
def tiny_tfds(tmp_path_factory):
  """A prepared TFDS dataset of JPEGs of assorted sizes, as ImageNet is: 24 train examples,
  5 test examples labelled 0..4 (one per class)."""
  data.tfds.tensorflow()  # TensorFlow as the pipeline loads it (triton first)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class TinyJpegImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({
              'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
              'label': tfds.features.ClassLabel(num_classes=5)}),
          supervised_keys=('image', 'label'))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(24), 'test': self._generate_examples(5)}

    def _generate_examples(self, count):
      rng = np.random.default_rng(count)
      for i in range(count):
        shape = (16 + i % 5, 20 + i % 3, 3)
        yield i, {'image': rng.integers(0, 256, shape, dtype=np.uint8), 'label': i % 5}

  data_dir = str(tmp_path_factory.mktemp('tfds'))
  # Several files per split, so that the streamed order also shuffles and interleaves files.
  TinyJpegImages(data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(num_shards=3))
  return 'tfds:tiny_jpeg_images', data_dir


@pytest.fixture
def streamed(monkeypatch):
  """TFDS datasets are streamed with tf.data, as if too big for memory."""
  data.load.cache_clear()
  monkeypatch.setattr(data.tfds, 'IN_MEMORY_LIMIT_BYTES', 0)
  yield
  data.load.cache_clear()


def test_small_tfds_dataset_is_held_in_memory(tiny_tfds):
  dataset, data_dir = tiny_tfds
  data.load.cache_clear()
  assert isinstance(data.load(dataset, data_dir), memory.InMemory)
  info = data.dataset_info(dataset, data_dir)
  assert (info.num_classes, info.num_train, info.num_eval, info.channels) == (5, 24, 5, 3)
  batch = next(data.train_batches(dataset, global_batch_size=4, image_size=12, seed=0,
                                data_dir=data_dir))
  assert batch['image'].shape == (4, 12, 12, 3)


def test_streamed_and_in_memory_evaluation_agree(tiny_tfds, monkeypatch):
  """Two implementations of resize-then-centre-crop (tf.image on one image, vectorized numpy
  on a batch) give the same pixels."""
  dataset, data_dir = tiny_tfds
  kwargs = dict(global_batch_size=8, image_size=12, data_dir=data_dir, crop_fraction=0.8)
  evaluations = []
  for limit in (data.tfds.IN_MEMORY_LIMIT_BYTES, 0):
    monkeypatch.setattr(data.tfds, 'IN_MEMORY_LIMIT_BYTES', limit)
    data.load.cache_clear()
    # Each is normalized with its own statistics (streamed: ImageNet's).
    evaluations.append((next(data.eval_batches(dataset, **kwargs)),
                        data.dataset_info(dataset, data_dir)))
  data.load.cache_clear()
  (in_memory, in_memory_info), (streamed, streamed_info) = evaluations
  assert streamed_info.mean == IMAGENET_MEAN != in_memory_info.mean
  np.testing.assert_array_equal(streamed['mask'], in_memory['mask'])
  np.testing.assert_array_equal(streamed['label'], in_memory['label'])
  real = in_memory['mask'] == 1
  np.testing.assert_allclose(pixels(streamed['image'][real], streamed_info),
                             pixels(in_memory['image'][real], in_memory_info), atol=1e-3)


def test_streamed_tfds_dataset_resumes_exactly(tiny_tfds, streamed):
  dataset, data_dir = tiny_tfds
  info = data.dataset_info(dataset, data_dir)
  assert (info.num_classes, info.num_train, info.num_eval, info.channels) == (5, 24, 5, 3)
  kwargs = dict(global_batch_size=4, image_size=12, seed=0, data_dir=data_dir,
                process_count=2, process_index=1)
  stepped = take(data.train_batches(dataset, **kwargs), 8)  # 3 steps per epoch: crosses two
  resumed = take(data.train_batches(dataset, start_step=5, **kwargs), 3)
  for a, b in zip(stepped[5:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert stepped[0]['image'].shape == (2, 12, 12, 3)
  assert not np.array_equal(stepped[0]['image'], stepped[3]['image'])  # epochs reshuffle


def test_streamed_tfds_eval_covers_every_example_once(tiny_tfds, streamed):
  dataset, data_dir = tiny_tfds
  labels = []
  for process in range(2):
    batches = list(data.eval_batches(dataset, global_batch_size=4, image_size=12,
                                   process_index=process, process_count=2,
                                   data_dir=data_dir))
    assert len(batches) == 2  # ceil(ceil(5 / 2) / 2) on every process
    for batch in batches:
      assert batch['image'].shape == (2, 12, 12, 3)
      labels.extend(batch['label'][batch['mask'] == 1])
      assert not batch['image'][batch['mask'] == 0].any()
  assert sorted(labels) == [0, 1, 2, 3, 4]


def test_tensorflow_crop_geometry_equals_numpys():
  """The streamed TFDS path computes crops in TensorFlow ops: the same boxes as numpy's."""
  tf = data.tfds.tensorflow()
  rng = np.random.default_rng(0)
  count = 300
  heights, widths = rng.integers(1, 600, count), rng.integers(1, 600, count)
  draws = randomness.train_draws(0, 7, np.arange(count))
  for min_scale in (0.08, 1.0):
    crop_boxes = tf.function(lambda d, h, w, s=min_scale: tf.map_fn(
        lambda x: data.tfds.random_resized_crop_box(x[0], x[1], x[2], s), (d, h, w),
        fn_output_signature=tf.int32))
    np.testing.assert_array_equal(
        crop_boxes(draws, heights, widths).numpy(),
        np.stack(transforms.random_resized_crop_boxes(draws, heights, widths, min_scale), 1))
  for image_size, crop_fraction in ((224, 0.875), (13, 0.8), (32, 1.0)):
    geometries = tf.function(lambda h, w, size=image_size, fraction=crop_fraction: tf.map_fn(
        lambda x: data.tfds.centre_crop_geometry(x[0], x[1], size, fraction), (h, w),
        fn_output_signature=tf.int32))
    np.testing.assert_array_equal(
        geometries(heights, widths).numpy(),
        [transforms.centre_crop_geometry(h, w, image_size, crop_fraction)
         for h, w in zip(heights, widths)])


def test_imagenet_not_prepared_says_how_to_build_it(tmp_path):
  with pytest.raises(ValueError) as error:
    data.dataset_info('imagenet2012', data_dir=str(tmp_path))
  message = str(error.value)
  assert os.path.join(str(tmp_path), 'downloads', 'manual') in message
  assert 'ILSVRC2012_img_train.tar' in message and 'ILSVRC2012_img_val.tar' in message
  assert f'tfds build imagenet2012 --data_dir {tmp_path}' in message


# ------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize('dataset', ['tfds:no_such_dataset_xyz', 'mnits:typo', ''])
def test_unknown_dataset_lists_what_is_accepted(dataset):
  with pytest.raises(ValueError, match='folder:/path/to/root'):
    data.dataset_info(dataset)


def test_batch_must_divide_among_processes():
  with pytest.raises(ValueError, match='not divisible by the number of processes 3'):
    data.train_batches('fashion_mnist', global_batch_size=8, image_size=8, seed=0,
                     process_count=3)
  with pytest.raises(ValueError, match='not divisible'):
    data.eval_batches('fashion_mnist', global_batch_size=8, image_size=8, process_count=3)


# ------------------------------------------------------------------------------------------
# Augmentation.


def test_random_resized_crops_stay_inside_and_respect_scale_and_ratio():
  draws = randomness.train_draws(0, 0, np.arange(2000))
  heights, widths = np.full(2000, 300), np.full(2000, 200)
  top, left, height, width = transforms.random_resized_crop_boxes(draws, heights, widths, 0.08)
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + height <= 300).all() and (left + width <= 200).all()
  area = height * width / (300 * 200)
  assert area.min() >= 0.08 * 0.95 and area.max() <= 1
  ratio = width / height
  assert ratio.min() >= 0.75 * 0.95 and ratio.max() <= 4 / 3 * 1.05
  # Spread over the range, not stuck on the fallback (torchvision's RandomResizedCrop gives
  # deciles 0.14 and 0.66 here: large areas rarely fit a 3:2 image at these ratios).
  assert np.quantile(area, 0.1) < 0.2 and np.quantile(area, 0.9) > 0.6


def test_autoaugment_changes_images_but_not_their_shape_or_dtype():
  rng = np.random.default_rng(0)
  for channels in (1, 3):
    # Smooth images with structure, so that every operation has something to change.
    base = np.linspace(0, 200, 20 * 20 * channels).reshape(1, 20, 20, channels)
    images = np.clip(base + rng.normal(0, 20, (64, 20, 20, channels)), 0, 255).astype(np.uint8)
    out = autoaugment.autoaugment(images, rng.uniform(size=(64, autoaugment.NUM_DRAWS)))
    assert out.shape == images.shape and out.dtype == np.uint8
    changed = (out != images).any(axis=(1, 2, 3))
    assert changed.mean() > 0.5


def test_autoaugment_operations_at_neutral_magnitudes_are_identities():
  images = np.random.default_rng(1).integers(0, 256, (3, 9, 11, 3), dtype=np.uint8)
  zeros = np.zeros(3)
  np.testing.assert_array_equal(autoaugment.rotate(images, zeros), images)
  np.testing.assert_array_equal(autoaugment.shear_x(images, zeros), images)
  np.testing.assert_array_equal(autoaugment.posterize(images, np.full(3, 8)), images)
  np.testing.assert_array_equal(autoaugment.solarize(images, np.full(3, 256)), images)
  for enhance in (autoaugment.color, autoaugment.contrast, autoaugment.sharpness):
    np.testing.assert_array_equal(enhance(images, np.ones(3)), images)
  np.testing.assert_array_equal(autoaugment.invert(autoaugment.invert(images, zeros), zeros),
                                images)
  # A quarter turn of a square image is a transpose and a flip.
  square = images[:, :9, :9]
  np.testing.assert_array_equal(autoaugment.rotate(square, np.full(3, 90.0)),
                                np.rot90(square, k=1, axes=(1, 2)))


def test_equalize_spreads_a_narrow_histogram():
  images = np.random.default_rng(2).integers(100, 120, (2, 64, 64, 1), dtype=np.uint8)
  out = autoaugment.equalize(images, np.zeros(2))
  assert out.min() < 20 and out.max() > 230
  # Equalization is monotonic: it never swaps the order of two pixels.
  order = np.argsort(images[0].ravel(), kind='stable')
  assert (np.diff(out[0].ravel()[order].astype(int)) >= 0).all()


def test_autoaugment_matches_torchvision():
  """The policy table, the magnitude bins and every operation are torchvision's
  ``AutoAugment(IMAGENET)`` (up to rounding ties: one level for Sharpness's blur, pixels on a
  half-way sampling point for ShearX)."""
  torch = pytest.importorskip('torch')
  autoaugment_tv = pytest.importorskip('torchvision.transforms.autoaugment')
  from torchvision.transforms import InterpolationMode  # pylint: disable=g-import-not-at-top

  reference = autoaugment_tv.AutoAugment(autoaugment_tv.AutoAugmentPolicy.IMAGENET)
  assert tuple(map(tuple, reference.policies)) == autoaugment.IMAGENET_POLICY
  space = reference._augmentation_space(autoaugment.NUM_BINS, (24, 20))
  for name, (bins, signed) in autoaugment.MAGNITUDES.items():
    np.testing.assert_allclose(bins, space[name][0].numpy(), rtol=1e-6)
    assert signed == space[name][1]

  rng = np.random.default_rng(0)
  base = np.linspace(0, 200, 24 * 20 * 3).reshape(1, 24, 20, 3)
  images = np.clip(base + rng.normal(0, 30, (4, 24, 20, 3)), 0, 255).astype(np.uint8)
  cases = {'Posterize': 5, 'Solarize': 113.3, 'AutoContrast': 0, 'Equalize': 0, 'Invert': 0,
           'Color': 0.5, 'Contrast': -0.4, 'Sharpness': 0.7, 'Rotate': -20.0, 'ShearX': 0.2}
  for name, magnitude in cases.items():
    ours = autoaugment.OPERATIONS[name](images, np.full(4, magnitude)).astype(int)
    theirs = np.stack([autoaugment_tv._apply_op(
        torch.from_numpy(image).permute(2, 0, 1).contiguous(), name, magnitude,
        InterpolationMode.NEAREST, None).permute(1, 2, 0).numpy() for image in images])
    differ = ours != theirs
    if name == 'Sharpness':
      assert np.abs(ours - theirs).max() <= 1 and differ.mean() < 0.1
    elif name == 'ShearX':
      assert differ.mean() < 0.03
    else:
      assert not differ.any(), name
