"""Input-pipeline speed on an ImageNet-like folder of JPEGs: this project's image-folder and
streamed-TFDS pipelines next to a tf.data pipeline and torchvision's ImageFolder + DataLoader.

  python benchmark_input.py --images 2000,20000 --dir /tmp/input_benchmark \\
      [--pipelines folder,tfds,tf.data,torchvision] [--batch-size 128] [--image-size 224] \\
      [--batches 40] [--json results.json]

Writes ``--dir/<N>/{train,val}/<class>/*.jpg`` once (500x375 JPEGs at quality 90, 10
classes; kept for later runs) and, for ``tfds``, the same JPEG files as a prepared TFDS
dataset in ``--dir/<N>/tfds``, streamed as ImageNet is. Then measures each pipeline on each
folder in its own subprocess, one after the other: training batches of random-resized-crop
to ``--image-size``, horizontal flip, normalization. Reports images/s over ``--batches``
batches after the first; the CPU time they took per image (the process and its workers:
what the pipeline costs, whatever else loads the machine); the time to the first batch (for
``folder``, with the folder's index built from scratch); the peak resident memory of the
measuring process and, summed, of its worker processes (``VmHWM``; ``ru_maxrss`` would
count the benchmark's own, inherited through fork). tf.data: ``tf.image.decode_and_crop_jpeg``
of a ``sample_distorted_bounding_box``, bilinear resize, flip, normalize, parallel maps
(AUTOTUNE); torchvision: ``RandomResizedCrop`` + ``RandomHorizontalFlip`` + ``ToTensor`` +
``Normalize`` with ``--torch-workers`` workers (skipped with a note when torch is missing).
Prints a Markdown table (stdout; progress on stderr).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from typing import Iterator, Optional, Sequence

import numpy as np

PIPELINES = ('folder', 'tfds', 'tf.data', 'torchvision')
CLASSES = 10
VAL_IMAGES = 20
IMAGE_SHAPE = (375, 500)


# The value parsers of repvgg_jax.cli, restated: importing anything of the package loads
# JAX, and the measuring processes of the anchors (tf.data, torchvision) must not carry it
# (their peak memory is measured).
def _positive_ints(text: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(',') if v]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f'{text!r}: expected comma-separated positive '
                                     'integers, e.g. 2000,20000')
  return values


def _pipelines(text: str) -> list[str]:
  values = [v for v in text.split(',') if v]
  unknown = [v for v in values if v not in PIPELINES]
  if unknown or not values:
    raise argparse.ArgumentTypeError(f'{text!r}: accepted are {", ".join(PIPELINES)}')
  return values


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('--images', type=_positive_ints, default=[2000],
                      help='training images per folder, comma-separated (default: 2000)')
  parser.add_argument('--dir', default='/tmp/input_benchmark',
                      help='where the folders are written (default: /tmp/input_benchmark)')
  parser.add_argument('--pipelines', type=_pipelines, default=list(PIPELINES),
                      help=f'comma-separated, from: {", ".join(PIPELINES)}')
  parser.add_argument('--batch-size', type=int, default=128)
  parser.add_argument('--image-size', type=int, default=224)
  parser.add_argument('--batches', type=int, default=40,
                      help='timed batches after the first (default: 40)')
  parser.add_argument('--torch-workers', type=int, default=2,
                      help='DataLoader worker processes (default: 2)')
  parser.add_argument('--json', metavar='FILE', help='write the records as JSON')
  parser.add_argument('--measure', metavar='PIPELINE', help=argparse.SUPPRESS)
  parser.add_argument('--root', help=argparse.SUPPRESS)
  parser.add_argument('--result', help=argparse.SUPPRESS)
  parser.add_argument('--build-tfds', metavar='ROOT', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if min(args.batch_size, args.image_size, args.batches, args.torch_workers) < 1:
    parser.error('--batch-size, --image-size, --batches and --torch-workers must be >= 1')
  return args


def _noise_tiles(rng: np.random.Generator) -> list[np.ndarray]:
  return [rng.normal(0, 14, IMAGE_SHAPE + (3,)).astype(np.int16) for _ in range(8)]


def _jpeg(rng: np.random.Generator, tiles: list[np.ndarray]) -> bytes:
  """A 500x375 photo-like JPEG (smooth colour fields plus grain; about 75 KB at quality 90,
  ImageNet's average is about 110 KB)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  coarse = rng.integers(0, 256, (rng.integers(3, 16), rng.integers(3, 16), 3), np.uint8)
  smooth = np.asarray(Image.fromarray(coarse).resize(IMAGE_SHAPE[::-1], Image.BICUBIC))
  tile = np.roll(tiles[rng.integers(len(tiles))], rng.integers(IMAGE_SHAPE[1]), axis=1)
  buffer = io.BytesIO()
  Image.fromarray(np.clip(smooth + tile, 0, 255).astype(np.uint8)).save(buffer, 'JPEG',
                                                                         quality=90)
  return buffer.getvalue()


def make_folder(root: str, count: int) -> None:
  """``root/train/<class>/*.jpg`` (``count`` images) and ``root/val/<class>/*.jpg``, unless
  a previous run completed them."""
  done = os.path.join(root, 'complete')
  if os.path.exists(done):
    return
  rng = np.random.default_rng(count)
  tiles = _noise_tiles(rng)
  for split, images in (('train', count), ('val', VAL_IMAGES)):
    for i in range(images):
      directory = os.path.join(root, split, f'class_{i % CLASSES:02d}')
      os.makedirs(directory, exist_ok=True)
      with open(os.path.join(directory, f'{i:07d}.jpg'), 'wb') as f:
        f.write(_jpeg(rng, tiles))
  with open(done, 'w') as f:
    f.write(f'{count}\n')


def build_tfds(root: str) -> str:
  """The folder's train and val images as a prepared TFDS dataset (the JPEG files stored as
  they are) in ``root/tfds``, built unless a previous run did; returns its name."""
  from repvgg_jax.data import tfds  # pylint: disable=import-outside-toplevel
  tfds.tensorflow()
  import tensorflow_datasets  # pylint: disable=import-outside-toplevel

  class InputBenchmarkJpegs(tensorflow_datasets.core.GeneratorBasedBuilder):
    VERSION = tensorflow_datasets.core.Version('1.0.0')

    def _info(self):
      return tensorflow_datasets.core.DatasetInfo(
          builder=self, features=tensorflow_datasets.features.FeaturesDict({
              'image': tensorflow_datasets.features.Image(encoding_format='jpeg'),
              'label': tensorflow_datasets.features.ClassLabel(num_classes=CLASSES)}),
          supervised_keys=('image', 'label'))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples('train'),
              'validation': self._generate_examples('val')}

    def _generate_examples(self, split):
      directory = os.path.join(root, split)
      for label, name in enumerate(sorted(os.listdir(directory))):
        for file in sorted(os.listdir(os.path.join(directory, name))):
          yield f'{name}/{file}', {'image': os.path.join(directory, name, file),
                                   'label': label}

  InputBenchmarkJpegs(data_dir=os.path.join(root, 'tfds')).download_and_prepare()
  return 'tfds:input_benchmark_jpegs'


def _tf_batches(root: str, batch_size: int, image_size: int) -> Iterator:
  """The Flax ImageNet example's training input, reading the folder's files."""
  # pylint: disable=import-outside-toplevel
  from repvgg_jax.checkpoint import IMAGENET_MEAN, IMAGENET_STD
  from repvgg_jax.data import tfds
  tf = tfds.tensorflow()
  train = os.path.join(root, 'train')
  classes = sorted(os.listdir(train))
  paths, labels = [], []
  for label, name in enumerate(classes):
    for file in sorted(os.listdir(os.path.join(train, name))):
      paths.append(os.path.join(train, name, file))
      labels.append(label)

  def crop_flip_normalize(path, label):
    encoded = tf.io.read_file(path)
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        tf.image.extract_jpeg_shape(encoded), tf.zeros([0, 0, 4]), min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
    image = tf.image.resize(image, [image_size, image_size], method='bilinear')
    image = tf.image.random_flip_left_right(image)
    return (image - IMAGENET_MEAN) / IMAGENET_STD, label

  dataset = tf.data.Dataset.from_tensor_slices((paths, labels)).repeat()
  dataset = dataset.shuffle(10_000, seed=0)
  dataset = dataset.map(crop_flip_normalize, num_parallel_calls=tf.data.AUTOTUNE)
  return dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)\
      .as_numpy_iterator()


def _torch_batches(root: str, batch_size: int, image_size: int, workers: int) -> Iterator:
  from torch.utils import data as torch_data  # pylint: disable=import-outside-toplevel
  from torchvision import datasets, transforms  # pylint: disable=import-outside-toplevel
  transform = transforms.Compose([
      transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
      transforms.ToTensor(),
      transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
  loader = torch_data.DataLoader(
      datasets.ImageFolder(os.path.join(root, 'train'), transform), batch_size=batch_size,
      shuffle=True, num_workers=workers, drop_last=True, persistent_workers=True)

  def endless():
    while True:
      yield from loader
  return endless()


def _peak_rss_mb(pid: int) -> float:
  """Peak resident memory of a process (``VmHWM``: unlike ``ru_maxrss``, not inherited
  from the process that forked it), 0 when it has gone."""
  try:
    with open(f'/proc/{pid}/status') as f:
      return next(int(line.split()[1]) for line in f if line.startswith('VmHWM')) / 1024
  except (OSError, StopIteration):
    return 0.0


def _family() -> list[int]:
  """This process and its living descendants."""
  parents = {}
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      try:
        with open(f'/proc/{entry}/stat') as f:
          parents[int(entry)] = int(f.read().rsplit(')', 1)[1].split()[1])
      except OSError:
        continue
  family = {os.getpid()}
  for _ in range(4):  # children, grandchildren (the fork server's workers), ...
    family |= {pid for pid, parent in parents.items() if parent in family}
  return sorted(family)


def _cpu_seconds(pids: Sequence[int]) -> dict[int, float]:
  """User + system CPU time of each process (those still there)."""
  ticks = os.sysconf('SC_CLK_TCK')
  seconds = {}
  for pid in pids:
    try:
      with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
      seconds[pid] = (int(fields[11]) + int(fields[12])) / ticks
    except OSError:
      continue
  return seconds


def measure(pipeline: str, root: str, args: argparse.Namespace) -> dict:
  """Runs one pipeline (in this process) and returns its record."""
  start = time.perf_counter()
  if pipeline == 'folder':
    from repvgg_jax import data  # pylint: disable=import-outside-toplevel
    from repvgg_jax.data import folders  # pylint: disable=import-outside-toplevel
    for path in folders.index_paths(root):  # the first batch includes indexing
      if os.path.exists(path):
        os.unlink(path)
    batches = data.train_batches(f'folder:{root}', global_batch_size=args.batch_size,
                                 image_size=args.image_size, seed=0)
  elif pipeline == 'tfds':
    from repvgg_jax import data  # pylint: disable=import-outside-toplevel
    from repvgg_jax.data import tfds  # pylint: disable=import-outside-toplevel
    tfds.IN_MEMORY_LIMIT_BYTES = 0  # streamed, as ImageNet is
    batches = data.train_batches(build_tfds(root), global_batch_size=args.batch_size,
                                 image_size=args.image_size, seed=0,
                                 data_dir=os.path.join(root, 'tfds'))
  elif pipeline == 'tf.data':
    batches = _tf_batches(root, args.batch_size, args.image_size)
  else:
    batches = _torch_batches(root, args.batch_size, args.image_size, args.torch_workers)
  next(batches)
  first = time.perf_counter() - start
  cpu_before = _cpu_seconds(_family())
  start = time.perf_counter()
  for _ in range(args.batches):
    next(batches)
  seconds = time.perf_counter() - start
  family = _family()
  cpu_after = _cpu_seconds(family)
  cpu = sum(after - cpu_before.get(pid, 0.0) for pid, after in cpu_after.items())
  workers_rss = sum(_peak_rss_mb(pid) for pid in family if pid != os.getpid())
  close = getattr(batches, 'close', None)
  if close is not None:
    close()
  return {'pipeline': pipeline, 'images': int(open(os.path.join(root, 'complete')).read()),
          'images_per_second': args.batches * args.batch_size / seconds,
          'cpu_ms_per_image': cpu * 1000 / (args.batches * args.batch_size),
          'first_batch_seconds': first,
          'peak_rss_mb': _peak_rss_mb(os.getpid()),
          'workers_peak_rss_mb': workers_rss}


def _versions() -> str:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  found = []
  for package in ('numpy', 'pillow', 'opencv-python-headless', 'tensorflow-cpu',
                  'tensorflow-datasets', 'torch', 'torchvision'):
    try:
      found.append(f'{package} {metadata.version(package)}')
    except metadata.PackageNotFoundError:
      continue
  return ', '.join(found)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  if args.build_tfds:
    build_tfds(args.build_tfds)
    return 0
  if args.measure:
    record = measure(args.measure, args.root, args)
    with open(args.result, 'w') as f:
      json.dump(record, f)
    return 0
  pipelines = list(args.pipelines)
  if 'torchvision' in pipelines:
    try:
      import torchvision  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError as error:
      print(f'benchmark_input.py: note: torchvision skipped ({error})', file=sys.stderr)
      pipelines.remove('torchvision')
  records = []
  for count in args.images:
    root = os.path.join(args.dir, str(count))
    start = time.perf_counter()
    make_folder(root, count)
    if 'tfds' in pipelines:  # prepared in its own process, like the folder: not timed
      subprocess.run([sys.executable, os.path.abspath(__file__), '--build-tfds', root],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    print(f'{root}: ready in {time.perf_counter() - start:.0f} s', file=sys.stderr)
    for pipeline in pipelines:
      result, log = (os.path.join(root, f'{pipeline}.{kind}') for kind in ('json', 'log'))
      command = [sys.executable, os.path.abspath(__file__), '--measure', pipeline, '--root',
                 root, '--result', result, '--batch-size', str(args.batch_size),
                 '--image-size', str(args.image_size), '--batches', str(args.batches),
                 '--torch-workers', str(args.torch_workers)]
      # Output to a file, not a pipe: a pipe would also wait for any process left behind.
      with open(log, 'w') as output:
        returncode = subprocess.run(command, stdout=output, stderr=output,
                                    check=False).returncode
      if returncode:
        with open(log) as output:
          print(f'benchmark_input.py: error: {pipeline} on {root} failed:\n'
                f'{output.read()[-3000:]}', file=sys.stderr)
        return 1
      with open(result) as f:
        records.append(json.load(f))
      print(records[-1], file=sys.stderr)
  print(f'{os.cpu_count()} CPUs; {_versions()}; batch {args.batch_size}, '
        f'{args.image_size}x{args.image_size}', file=sys.stderr)
  print('| pipeline | images | images/s | CPU ms/image | first batch (s) | peak RSS (MB) | '
        'workers\' peak RSS (MB) |')
  print('|---|---:|---:|---:|---:|---:|---:|')
  for r in records:
    print(f'| {r["pipeline"]} | {r["images"]} | {r["images_per_second"]:.0f} | '
          f'{r["cpu_ms_per_image"]:.2f} | {r["first_batch_seconds"]:.1f} | '
          f'{r["peak_rss_mb"]:.0f} | '
          f'{r["workers_peak_rss_mb"]:.0f} |')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(records, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
