"""Image files to pixels without TensorFlow: whole images with Pillow, for datasets held in
memory; crops for streamed datasets with OpenCV, decoded at the size they need.

``read`` takes a file and the image size from its header (Pillow parses only that), so
that the caller can choose the box; ``decode_crop`` then decodes a JPEG at the smallest DCT
scale (1/2, 1/4, 1/8: OpenCV's ``IMREAD_REDUCED_*``) that keeps the box at least the output
size, and resamples the box by bilinear interpolation at half-pixel centres without
antialiasing, as ``transforms.bilinear`` and tf.image.resize do. Measured per 500x375 JPEG
on this project's 2-core machine (docs/benchmarks.md, "Input pipeline"): Pillow decode +
antialiased resize of a 400x300 box 2.6 ms, OpenCV decode + resize 1.5 ms.

A file that cannot be read is an ``UnreadableImageError`` naming it; the batches that skip
such files (``skip_unreadable_images``) record them in a ``SkippedImages``.
"""

from __future__ import annotations

import functools
import io
import logging
import threading
from typing import Iterable, NamedTuple, Optional

import numpy as np
from PIL import Image

# OpenCV's reduced-decoding flags by DCT scale denominator, for 1 and 3 channels.
_REDUCED = {1: ('IMREAD_GRAYSCALE', 'IMREAD_REDUCED_GRAYSCALE_2', 'IMREAD_REDUCED_GRAYSCALE_4',
                'IMREAD_REDUCED_GRAYSCALE_8'),
            3: ('IMREAD_COLOR', 'IMREAD_REDUCED_COLOR_2', 'IMREAD_REDUCED_COLOR_4',
                'IMREAD_REDUCED_COLOR_8')}


_logger = logging.getLogger(__name__)


class UnreadableImageError(ValueError):
  """An image file that cannot be read or decoded, ``UnreadableImageError(path, reason)``;
  the message names the file. Both arguments are strings: pickling rebuilds the error from
  them when a decoding worker hands it to the trainer's process."""

  @property
  def path(self) -> str:
    return self.args[0]

  def __str__(self) -> str:
    return f'Cannot read image {self.args[0]}: {self.args[1]}'


class SkippedImages:
  """The image files of a dataset that its batches skipped as unreadable, in the order first
  met; each is logged (a warning naming the file and what became of its row) the first time.
  Batches are made in a background thread and counted in the trainer's, hence the lock."""

  def __init__(self):
    self._lock = threading.Lock()
    self._paths: dict[str, None] = {}  # an ordered set

  def add(self, errors: Iterable[UnreadableImageError], training: bool) -> None:
    for error in errors:
      with self._lock:
        first = error.path not in self._paths
        self._paths[error.path] = None
      if first:
        _logger.warning('Skipped an unreadable image (%s): %s', (
            'its training row reads the next readable file of the split' if training
            else 'left out of the evaluation'), error)

  def paths(self) -> list[str]:
    with self._lock:
      return list(self._paths)


def decode(path: str, channels: Optional[int] = None) -> np.ndarray:
  """The whole image, uint8 ``[H, W, C]`` with Pillow: ``channels`` 1 (grayscale) or 3
  (RGB: alpha dropped, palettes expanded); by default 1 for grayscale files, else 3."""
  try:
    with Image.open(path) as image:
      if channels is None:
        channels = 1 if image.mode in ('1', 'L', 'I;16', 'I', 'F') else 3
      pixels = np.asarray(image.convert('L' if channels == 1 else 'RGB'))
  except Exception as error:  # missing, truncated or not an image: say which file
    raise UnreadableImageError(path, str(error)) from error
  return pixels.reshape(pixels.shape[:2] + (-1,))


@functools.lru_cache(maxsize=1)
def _cv2():
  try:
    import cv2  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError('streamed image folders decode their crops with OpenCV: pip install '
                      'opencv-python-headless') from None
  cv2.setNumThreads(1)  # the worker processes are the parallelism
  return cv2


def _resample(pixels: np.ndarray, top: float, left: float, height: float, width: float,
              size: int) -> np.ndarray:
  """The box of ``pixels`` resized to ``size x size`` (bilinear, half-pixel centres)."""
  cv2 = _cv2()
  if all(float(v).is_integer() for v in (top, left, height, width)):
    top, left, height, width = int(top), int(left), int(height), int(width)
    return cv2.resize(pixels[top:top + height, left:left + width], (size, size),
                      interpolation=cv2.INTER_LINEAR)
  # A fractional box (evaluation, reduced decoding): the same sampling as an affine map.
  scale_x, scale_y = width / size, height / size
  to_source = np.array([[scale_x, 0, left + scale_x / 2 - 0.5],
                        [0, scale_y, top + scale_y / 2 - 0.5]])
  return cv2.warpAffine(pixels, to_source, (size, size),
                        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                        borderMode=cv2.BORDER_REPLICATE)


class Encoded(NamedTuple):
  """An image file's bytes and the size its header gives."""
  path: str
  data: bytes
  height: int
  width: int
  jpeg: bool


def read(path: str) -> Encoded:
  """The file at ``path`` and its image size (the header only is parsed)."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
    with Image.open(io.BytesIO(data)) as header:
      return Encoded(path, data, header.size[1], header.size[0], header.format == 'JPEG')
  except Exception as error:  # missing, unreadable or not an image: say which file
    raise UnreadableImageError(path, str(error)) from error


def decode_crop(encoded: Encoded, top: float, left: float, height: float, width: float,
                size: int, channels: int) -> np.ndarray:
  """The box ``(top, left, height, width)`` of the image resized to ``size x size``: uint8
  ``[size, size, channels]`` (1: grayscale, 3: RGB)."""
  reduction = 0
  while (encoded.jpeg and reduction < 3 and
         min(height, width) >= size * 2**(reduction + 1)):
    reduction += 1
  cv2 = _cv2()
  flags = getattr(cv2, _REDUCED[channels][reduction]) | cv2.IMREAD_IGNORE_ORIENTATION
  pixels = cv2.imdecode(np.frombuffer(encoded.data, np.uint8), flags)
  bgr = pixels is not None and channels == 3
  if pixels is None:  # a format OpenCV does not read (e.g. GIF), or a broken file: Pillow
    pixels = decode(encoded.path, channels)
  scale_y, scale_x = pixels.shape[0] / encoded.height, pixels.shape[1] / encoded.width
  crop = _resample(pixels, top * scale_y, left * scale_x, height * scale_y, width * scale_x,
                   size).reshape(size, size, channels)
  return crop[..., ::-1] if bgr else crop
