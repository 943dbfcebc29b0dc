"""Image geometry and pixel transforms shared by every dataset source: random-resized-crop
boxes, the evaluation centre crop, bilinear resampling, flip, AutoAugment, normalization."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from repvgg_jax import autoaugment, randaugment
from repvgg_jax.data import randomness
from repvgg_jax.data.info import DatasetInfo

# Random-resized-crop aspect ratios (torchvision's RandomResizedCrop).
CROP_RATIO = (3 / 4, 4 / 3)
# 'crop': random-resized-crop only; 'simple': and flip; 'autoaugment': and AutoAugment;
# 'randaugment': and the RepVGG authors' RandAugment, raug15 (magnitude 15, two operations).
AUGMENTATIONS = ('crop', 'simple', 'autoaugment', 'randaugment')


def random_resized_crop_boxes(draws: np.ndarray, heights: np.ndarray, widths: np.ndarray,
                              min_scale: float) -> tuple[np.ndarray, ...]:
  """Integer crop boxes ``(top, left, height, width)`` of torchvision's RandomResizedCrop:
  area a uniform fraction in [min_scale, 1] of the image, aspect ratio log-uniform in
  CROP_RATIO; the first of CROP_ATTEMPTS tries that fits, else a centre crop of the whole
  image clamped to CROP_RATIO."""
  heights = np.asarray(heights, np.int64)[:, None]
  widths = np.asarray(widths, np.int64)[:, None]
  area = heights * widths * (min_scale + (1 - min_scale) * draws[:, randomness.AREA])
  log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
  ratio = np.exp(log_lo + (log_hi - log_lo) * draws[:, randomness.RATIO])
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
  top = np.where(found, np.floor(draws[:, randomness.TOP] * (heights - crop_h + 1)),
                 (heights - crop_h) // 2).astype(np.int64)
  left = np.where(found, np.floor(draws[:, randomness.LEFT] * (widths - crop_w + 1)),
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


def eval_box(height: int, width: int, image_size: int,
             crop_fraction: float) -> tuple[float, float, float, float]:
  """The centre crop of ``centre_crop_geometry`` as a box ``(top, left, height, width)`` of
  the original image, so that resampling that box equals resizing then cropping."""
  resized_h, resized_w, top, left = centre_crop_geometry(height, width, image_size,
                                                         crop_fraction)
  scale_y, scale_x = height / resized_h, width / resized_w
  return top * scale_y, left * scale_x, image_size * scale_y, image_size * scale_x


def bilinear(image: np.ndarray, top: float, left: float, height: float, width: float,
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


def writable_float32(images: np.ndarray) -> np.ndarray:
  """``images`` as a C-contiguous float32 array that may be changed in place (copied only if
  needed)."""
  images = np.ascontiguousarray(images, np.float32)
  return images if images.flags.writeable else images.copy()


def normalize(images: np.ndarray, info: DatasetInfo,
              out: Optional[np.ndarray] = None) -> np.ndarray:
  """``(pixel - mean) / std`` as float32: into ``out`` when given, else in place on float32
  ``images`` where possible (uint8 ones are converted in the same pass)."""
  width, channels = images.shape[-2:]
  # On rows of W*C values numpy's inner loops are long; on the C-long channel axis they crawl.
  row_shape = images.shape[:-2] + (width * channels,)
  mean = np.tile(np.asarray(info.mean, np.float32), width)
  if out is not None:
    normalized = np.subtract(images.reshape(row_shape), mean, dtype=np.float32,
                             out=out.reshape(row_shape))
  elif images.dtype == np.uint8:
    normalized = np.subtract(images.reshape(row_shape), mean, dtype=np.float32)
  else:
    normalized = writable_float32(images).reshape(row_shape)
    normalized -= mean
  normalized *= np.tile(1 / np.asarray(info.std, np.float32), width)
  return normalized.reshape(images.shape)


def finish_train_images(images: np.ndarray, draws: np.ndarray, augment: str,
                        info: DatasetInfo, out: Optional[np.ndarray] = None) -> np.ndarray:
  """Cropped images in pixel units -> flipped (not with 'crop'), optionally Auto- or
  RandAugmented, normalized float32. Float images are copied; uint8 ones (flipped in place)
  stay uint8 until normalized, which is cheaper, into ``out`` when given."""
  images = images if images.dtype == np.uint8 else writable_float32(images)
  if augment != 'crop':
    flip = draws[:, randomness.FLIP] < 0.5
    images[flip] = images[flip, :, ::-1]
  if augment in ('autoaugment', 'randaugment'):
    if images.dtype != np.uint8:
      images = np.clip(np.round(images), 0, 255).astype(np.uint8)
    if augment == 'autoaugment':
      images = autoaugment.autoaugment(images, draws[:, randomness.AUTOAUGMENT])
    else:
      images = randaugment.randaugment(images, draws[:, randomness.RANDAUGMENT])
  return normalize(images, info, out)
