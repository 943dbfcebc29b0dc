"""AutoAugment's ImageNet policy (Cubuk et al. 2019) on batches of uint8 images, in numpy.

The policy table, magnitude bins and operations are torchvision's ``AutoAugment(IMAGENET)``
(tests/test_input_pipeline.py checks them against it): each image draws one of 25
sub-policies, and each of its two operations is applied with the sub-policy's probability
(signed magnitudes flip sign with probability 1/2). Geometric operations use
nearest-neighbour sampling and fill with 0, as torchvision does by default (``affine`` also
offers PIL's bilinear and bicubic filters and another fill, for ``randaugment``).
The operations are vectorized over the images that apply them, and all randomness comes
from the caller's ``draws`` so that augmentation stays a pure function of its key.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

# (operation, probability, magnitude bin or None) pairs.
IMAGENET_POLICY = (
    (('Posterize', 0.4, 8), ('Rotate', 0.6, 9)),
    (('Solarize', 0.6, 5), ('AutoContrast', 0.6, None)),
    (('Equalize', 0.8, None), ('Equalize', 0.6, None)),
    (('Posterize', 0.6, 7), ('Posterize', 0.6, 6)),
    (('Equalize', 0.4, None), ('Solarize', 0.2, 4)),
    (('Equalize', 0.4, None), ('Rotate', 0.8, 8)),
    (('Solarize', 0.6, 3), ('Equalize', 0.6, None)),
    (('Posterize', 0.8, 5), ('Equalize', 1.0, None)),
    (('Rotate', 0.2, 3), ('Solarize', 0.6, 8)),
    (('Equalize', 0.6, None), ('Posterize', 0.4, 6)),
    (('Rotate', 0.8, 8), ('Color', 0.4, 0)),
    (('Rotate', 0.4, 9), ('Equalize', 0.6, None)),
    (('Equalize', 0.0, None), ('Equalize', 0.8, None)),
    (('Invert', 0.6, None), ('Equalize', 1.0, None)),
    (('Color', 0.6, 4), ('Contrast', 1.0, 8)),
    (('Rotate', 0.8, 8), ('Color', 1.0, 2)),
    (('Color', 0.8, 8), ('Solarize', 0.8, 7)),
    (('Sharpness', 0.4, 7), ('Invert', 0.6, None)),
    (('ShearX', 0.6, 5), ('Equalize', 1.0, None)),
    (('Color', 0.4, 0), ('Equalize', 0.6, None)),
    (('Equalize', 0.4, None), ('Solarize', 0.2, 4)),
    (('Solarize', 0.6, 5), ('AutoContrast', 0.6, None)),
    (('Invert', 0.6, None), ('Equalize', 1.0, None)),
    (('Color', 0.6, 4), ('Contrast', 1.0, 8)),
    (('Equalize', 0.8, None), ('Equalize', 0.6, None)),
)

NUM_BINS = 10
# Magnitude of each bin, and whether the operation takes a random sign.
MAGNITUDES = {
    'ShearX': (np.linspace(0.0, 0.3, NUM_BINS), True),
    'Rotate': (np.linspace(0.0, 30.0, NUM_BINS), True),
    'Color': (np.linspace(0.0, 0.9, NUM_BINS), True),
    'Contrast': (np.linspace(0.0, 0.9, NUM_BINS), True),
    'Sharpness': (np.linspace(0.0, 0.9, NUM_BINS), True),
    'Posterize': (8 - np.round(np.arange(NUM_BINS) / ((NUM_BINS - 1) / 4)), False),
    'Solarize': (np.linspace(255.0, 0.0, NUM_BINS), False),
}

# Random numbers per image: the sub-policy, then per operation its coin and its sign.
NUM_DRAWS = 5


def _grayscale(images: np.ndarray) -> np.ndarray:
  """ITU-R 601 luma ``[n, H, W, 1]`` of RGB or grayscale images, truncated to whole levels
  as torchvision does for uint8 images (float32)."""
  if images.shape[-1] == 1:
    return images.astype(np.float32)
  luma = images.astype(np.float32) @ np.array([[0.2989], [0.587], [0.114]], np.float32)
  return np.floor(luma)


def blend(images: np.ndarray, degenerate: np.ndarray, factors: np.ndarray) -> np.ndarray:
  """``factor * image + (1 - factor) * degenerate`` clipped and truncated to uint8 (PIL's
  ImageEnhance, in torchvision's arithmetic)."""
  factors = factors.reshape(-1, 1, 1, 1).astype(np.float32)
  out = factors * images.astype(np.float32) + (1 - factors) * degenerate
  return np.clip(out, 0, 255).astype(np.uint8)


def posterize(images: np.ndarray, bits: np.ndarray) -> np.ndarray:
  masks = (0xFF << (8 - bits.astype(np.int64))) & 0xFF
  return images & masks.astype(np.uint8).reshape(-1, 1, 1, 1)


def solarize(images: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  return np.where(images >= thresholds.reshape(-1, 1, 1, 1), 255 - images, images)


def invert(images: np.ndarray, _: np.ndarray) -> np.ndarray:
  return 255 - images


def autocontrast(images: np.ndarray, _: np.ndarray) -> np.ndarray:
  """Stretches each channel of each image to the full [0, 255] range."""
  low = images.min(axis=(1, 2), keepdims=True).astype(np.float32)
  high = images.max(axis=(1, 2), keepdims=True).astype(np.float32)
  flat = high == low
  scale = np.where(flat, 1.0, 255.0 / np.where(flat, 1.0, high - low))
  low = np.where(flat, 0.0, low)
  return np.clip((images - low) * scale, 0, 255).astype(np.uint8)


def equalize(images: np.ndarray, _: np.ndarray) -> np.ndarray:
  """Histogram equalization of each channel of each image (PIL's ImageOps.equalize)."""
  n, height, width, channels = images.shape
  planes = images.transpose(0, 3, 1, 2).reshape(n * channels, height * width)
  offsets = np.arange(n * channels)[:, None] * 256
  histograms = np.bincount((planes + offsets).ravel(),
                           minlength=n * channels * 256).reshape(n * channels, 256)
  last_nonzero = 255 - np.argmax(histograms[:, ::-1] > 0, axis=1)
  rows = np.arange(n * channels)
  steps = (histograms.sum(1) - histograms[rows, last_nonzero]) // 255
  safe_steps = np.maximum(steps, 1)[:, None]
  cumulative = np.cumsum(histograms, axis=1)
  lut = (cumulative + safe_steps // 2) // safe_steps
  lut = np.concatenate([np.zeros((n * channels, 1), lut.dtype), lut[:, :-1]], axis=1)
  lut = np.where(steps[:, None] == 0, np.arange(256)[None, :], np.clip(lut, 0, 255))
  equalized = lut[rows[:, None], planes].astype(np.uint8)
  return equalized.reshape(n, channels, height, width).transpose(0, 2, 3, 1)


def color(images: np.ndarray, factors: np.ndarray) -> np.ndarray:
  """Saturation: blends with the grayscale image (no-op on grayscale images)."""
  if images.shape[-1] == 1:
    return images
  return blend(images, _grayscale(images), factors)


def contrast(images: np.ndarray, factors: np.ndarray) -> np.ndarray:
  """Blends with the mean gray level of each image."""
  means = _grayscale(images).mean(axis=(1, 2, 3), keepdims=True)
  return blend(images, means, factors)


def sharpness(images: np.ndarray, factors: np.ndarray) -> np.ndarray:
  """Blends with PIL's SMOOTH-filtered image (3x3 kernel, centre weight 5, sum 13), whose
  border pixels are the original ones."""
  pixels = images.astype(np.float32)
  height, width = images.shape[1:3]
  smooth = pixels.copy()
  inner = sum(pixels[:, dy:height - 2 + dy, dx:width - 2 + dx]
              for dy in range(3) for dx in range(3)) + 4 * pixels[:, 1:-1, 1:-1]
  smooth[:, 1:-1, 1:-1] = np.round(inner / 13)
  return blend(images, smooth, factors)


def _linear(v1: np.ndarray, v2: np.ndarray, d: np.ndarray) -> np.ndarray:
  """PIL's linear interpolation from ``v1`` (d = 0) to ``v2`` (d = 1)."""
  return v1 + (v2 - v1) * d


def _cubic(v1: np.ndarray, v2: np.ndarray, v3: np.ndarray, v4: np.ndarray,
           d: np.ndarray) -> np.ndarray:
  """PIL's cubic convolution (a = -1) between ``v2`` (d = 0) and ``v3`` (d = 1), evaluated in
  PIL's order of operations so that the values truncate as PIL's do."""
  p2 = -v1 + v3
  p3 = 2 * (v1 - v2) + v3 - v4
  p4 = -v1 + v2 - v3 + v4
  return v2 + d * (p2 + d * (p3 + d * p4))


# Separable interpolation kernels: (taps, kernel).
_KERNELS = {'bilinear': (2, _linear), 'bicubic': (4, _cubic)}


def _interpolate(image: np.ndarray, src_x: np.ndarray, src_y: np.ndarray,
                 interpolation: str) -> np.ndarray:
  """PIL's bilinear or bicubic sample of one image ``[H, W, C]`` at points ``[P]``
  (pixel-centre coordinates), repeating the edge pixels, truncated to uint8 ``[P, C]``."""
  height, width, channels = image.shape
  taps, kernel = _KERNELS[interpolation]
  first_x, first_y = np.floor(src_x), np.floor(src_y)
  dx, dy = (src_x - first_x)[:, None], (src_y - first_y)[:, None]
  # The taps start one pixel before the floor for bicubic, at the floor for bilinear.
  start = taps // 2 - 1
  cols = [np.clip(first_x.astype(np.int64) + t - start, 0, width - 1) for t in range(taps)]
  rows = [np.clip(first_y.astype(np.int64) + t - start, 0, height - 1) * width
          for t in range(taps)]
  pixels = image.reshape(height * width, channels)
  values = kernel(*(kernel(*(pixels[row + col].astype(np.float64) for col in cols), dx)
                    for row in rows), dy)
  return np.clip(values, 0, 255).astype(np.uint8)


def affine(images: np.ndarray, inverse: np.ndarray, interpolation: str = 'nearest',
           fill: float = 0) -> np.ndarray:
  """Warp of uint8 images: output pixel (x, y) takes the input at ``inverse @ (x, y, 1)``
  (one 2x3 matrix per image, pixel-centre coordinates), or ``fill`` where that point lies
  outside the image. ``interpolation``: 'nearest', or PIL's 'bilinear' or 'bicubic'
  (Image.transform's filters)."""
  n, height, width, _ = images.shape
  ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
  grid = np.stack([xs, ys, np.ones_like(xs)], axis=0).reshape(3, -1).astype(np.float64)
  points = inverse @ grid  # [n, 2, H*W]
  if interpolation == 'nearest':
    source = np.round(points).astype(np.int64)
    src_x, src_y = source[:, 0], source[:, 1]
    inside = (src_x >= 0) & (src_x < width) & (src_y >= 0) & (src_y < height)
    flat = np.clip(src_y, 0, height - 1) * width + np.clip(src_x, 0, width - 1)
    sampled = np.take_along_axis(images.reshape(n, height * width, -1), flat[..., None],
                                 axis=1)
  else:
    # PIL samples a point whose pixel-corner coordinates lie in [0, W) x [0, H).
    src_x, src_y = points[:, 0], points[:, 1]
    inside = ((src_x + 0.5 >= 0) & (src_x + 0.5 < width) & (src_y + 0.5 >= 0)
              & (src_y + 0.5 < height))
    # One image at a time keeps the float64 temporaries in cache (twice as fast at 224^2).
    sampled = np.stack([_interpolate(image, x, y, interpolation)
                        for image, x, y in zip(images, src_x, src_y)])
  return np.where(inside[..., None], sampled, fill).reshape(images.shape).astype(np.uint8)


def rotate(images: np.ndarray, degrees: np.ndarray, interpolation: str = 'nearest',
           fill: float = 0) -> np.ndarray:
  """Counter-clockwise rotation about the image centre (``affine``'s interpolation and
  fill)."""
  height, width = images.shape[1:3]
  centre_x, centre_y = (width - 1) / 2, (height - 1) / 2
  cos, sin = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
  # Output offsets (dx, dy) from the centre come from input offsets rotated back.
  inverse = np.stack([
      np.stack([cos, -sin, centre_x - cos * centre_x + sin * centre_y], -1),
      np.stack([sin, cos, centre_y - sin * centre_x - cos * centre_y], -1)], axis=1)
  return affine(images, inverse, interpolation, fill)


def shear_x(images: np.ndarray, shears: np.ndarray, interpolation: str = 'nearest',
            fill: float = 0) -> np.ndarray:
  """Horizontal shear about the image's top-left corner (the outer corner of pixel (0, 0),
  at -1/2 in pixel-centre coordinates): input x = x + shear * (y + 1/2)."""
  zeros, ones = np.zeros_like(shears), np.ones_like(shears)
  inverse = np.stack([np.stack([ones, shears, shears / 2], -1),
                      np.stack([zeros, ones, zeros], -1)], axis=1)
  return affine(images, inverse, interpolation, fill)


def _enhance(operation: Callable[[np.ndarray, np.ndarray], np.ndarray]):
  """PIL-style enhancements take the factor ``1 + magnitude``."""
  return lambda images, magnitudes: operation(images, 1.0 + magnitudes)


OPERATIONS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    'Posterize': posterize, 'Solarize': solarize, 'Invert': invert,
    'AutoContrast': autocontrast, 'Equalize': equalize, 'Rotate': rotate,
    'ShearX': shear_x, 'Color': _enhance(color), 'Contrast': _enhance(contrast),
    'Sharpness': _enhance(sharpness),
}


def autoaugment(images: np.ndarray, draws: np.ndarray) -> np.ndarray:
  """AutoAugment (ImageNet policy) of uint8 images ``[n, H, W, C]`` (C = 1 or 3), given
  ``NUM_DRAWS`` uniform [0, 1) numbers per image. Returns new uint8 images."""
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f'autoaugment needs uint8 [n, H, W, C] images, got {images.dtype} '
                     f'{images.shape}')
  images = images.copy()
  policies = np.minimum((draws[:, 0] * len(IMAGENET_POLICY)).astype(np.int64),
                        len(IMAGENET_POLICY) - 1)
  for slot in range(2):
    coins, negative = draws[:, 1 + slot], draws[:, 3 + slot] < 0.5
    for policy_id, policy in enumerate(IMAGENET_POLICY):
      name, probability, magnitude_bin = policy[slot]
      selected = np.flatnonzero((policies == policy_id) & (coins < probability))
      if not len(selected):
        continue
      magnitudes = np.zeros(len(selected))
      if magnitude_bin is not None:
        bins, signed = MAGNITUDES[name]
        magnitudes[:] = bins[magnitude_bin]
        if signed:
          magnitudes[negative[selected]] *= -1
      images[selected] = OPERATIONS[name](images[selected], magnitudes)
  return images
