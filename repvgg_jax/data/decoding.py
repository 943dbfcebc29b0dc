"""Image files to pixels with Pillow (no TensorFlow): whole images for datasets held in
memory, and crops decoded at the size they need (JPEG's DCT-domain downscaling through
``Image.draft``, then one resampling of the crop box) for streamed ones."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from PIL import Image

# Mode of the decoded pixels for each channel count.
_MODES = {1: 'L', 3: 'RGB'}


class UnreadableImageError(ValueError):
  """An image file that cannot be read or decoded; the message names the file."""


def _open(path: str) -> Image.Image:
  try:
    return Image.open(path)
  except Exception as error:  # missing, truncated or not an image: say which file
    raise UnreadableImageError(f'Cannot read image {path}: {error}') from error


def decode(path: str) -> np.ndarray:
  """The whole image, uint8 ``[H, W, C]``: 1 channel for grayscale files, else RGB (alpha
  dropped, palettes expanded)."""
  with _open(path) as image:
    try:
      image = image.convert('L' if image.mode in ('1', 'L', 'I;16', 'I', 'F') else 'RGB')
      pixels = np.asarray(image)
    except Exception as error:
      raise UnreadableImageError(f'Cannot decode image {path}: {error}') from error
  return pixels.reshape(pixels.shape[:2] + (-1,))


def decode_crop(path: str, box: Callable[[int, int], tuple[float, float, float, float]],
                size: int, channels: int) -> np.ndarray:
  """The crop ``box(height, width) -> (top, left, box_height, box_width)`` of the image at
  ``path`` resized to ``size x size`` (Pillow's antialiased bilinear), uint8
  ``[size, size, channels]``. Only the header is read before the box is known; a JPEG is
  then decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps the box at least
  ``size`` pixels high and wide."""
  with _open(path) as image:
    width, height = image.size
    top, left, box_h, box_w = box(height, width)
    try:
      # draft() keeps the whole image at least this size, so the box at least size x size.
      image.draft(_MODES[channels], (math.ceil(width * size / box_w),
                                    math.ceil(height * size / box_h)))
      scale_x, scale_y = image.size[0] / width, image.size[1] / height
      if image.mode != _MODES[channels]:
        image = image.convert(_MODES[channels])
      crop = image.resize((size, size), Image.Resampling.BILINEAR,
                          box=(left * scale_x, top * scale_y, (left + box_w) * scale_x,
                               (top + box_h) * scale_y))
    except Exception as error:
      raise UnreadableImageError(f'Cannot decode image {path}: {error}') from error
  return np.asarray(crop).reshape(size, size, channels)
