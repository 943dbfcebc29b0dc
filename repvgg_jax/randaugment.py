"""The RepVGG authors' RandAugment ('raug15') on batches of uint8 images, in numpy.

The authors train RepVGGplus-L2pse with ``AUG.PRESET raug15``: RandomResizedCrop,
RandomHorizontalFlip, then ``RandAugPolicy(magnitude=15)`` (DingXiaoH/RepVGG,
data/build.py ``build_transform`` and train/randaug.py). Their policy, which this module
follows:

* Each image gets ``num_ops = 2`` operations in turn, each drawn uniformly (with
  replacement) from the 16 of ``OPERATIONS`` and always applied.
* Each operation draws its own level uniformly from {0, ..., magnitude - 1} = {0, ..., 14}
  on a scale where 10 is the nominal maximum; levels are not clipped, so levels 11..14
  extrapolate past it.
* A level maps to the operation's argument through ``level / 10`` (``LEVEL_TO_ARGUMENT``):
  Rotate 30 degrees, ShearX/Y 0.3, TranslateX/YRel 0.45 of the width/height (each with a
  random sign, probability 1/2); Color, Contrast, Brightness and Sharpness take the
  enhancement factor ``0.1 + 1.8 * level / 10`` (no sign; level 5 is the identity);
  PosterizeTpu keeps ``int(4 * level / 10)`` bits (0 bits, a black image, at levels 0..2:
  what the Pillow of their time gave; Pillow 13 refuses 0 bits);
  Solarize inverts pixels at or above ``int(256 * level / 10)`` (everything at level 0,
  nothing from level 10); SolarizeAdd adds ``int(110 * level / 10)`` to pixels below 128,
  saturating; Cutout paints an ``int(max(2, 40 * level / 10))`` square (sides
  2, 4, 8, ..., 56) centred on a uniformly drawn pixel, clipped to the image, in the colour
  (125, 122, 113). AutoContrast, Equalize and Invert ignore the level.
* Rotate, ShearX/Y and TranslateX/YRel resample with PIL's bilinear or bicubic filter
  (each chosen with probability 1/2 per application) and fill with (128, 128, 128).
  Shears are about the top-left corner; rotations about the centre; a translation takes
  the input at (x + shift, y).

Where this differs from torchvision's ``RandAugment`` (the authors' choices, kept here):
16 operations (no Identity; adds Invert, SolarizeAdd and Cutout) instead of 14; a random
level per operation instead of one fixed magnitude; enhancement factors in [0.1, 2.62]
instead of 1 +- m; Posterize keeps 0..5 bits instead of 4..8; Solarize's threshold rises
with the level (weaker) instead of falling; relative fractional translations instead of
whole pixels; bilinear/bicubic resampling with fill 128 instead of nearest with fill 0.

Differences from the authors' PIL pipeline (tests/test_randaugment.py measures them):
the shared operations of ``autoaugment`` compute Color, Contrast and Sharpness in
torchvision's tensor arithmetic (luma truncated rather than rounded, Contrast's mean not
rounded, float32 blending), which differs from PIL's by up to 2 levels (Color, Contrast)
or 1 level (Sharpness) on many pixels; and geometric samples that fall exactly between two
levels, or exactly on the image's edge, may truncate (or fill) the other way (under 3% of
the pixels).
For single-channel images the fill is 128 and the Cutout colour is 122, the luma of
(125, 122, 113); the authors only augment RGB images.

Every random choice comes from the caller's ``draws`` (``DRAWS_PER_OPERATION`` uniform
[0, 1) numbers per image and operation), so augmentation is a pure function of its key.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from repvgg_jax import autoaugment

OPERATIONS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeTpu', 'Solarize',
              'SolarizeAdd', 'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX',
              'ShearY', 'TranslateXRel', 'TranslateYRel', 'Cutout')

# The level at which the authors' ranges reach their nominal maximum.
MAX_LEVEL = 10.0
# The geometric operations' fill, (128, 128, 128) for RGB.
FILL = 128
CUTOUT_COLOUR = (125, 122, 113)
CUTOUT_GRAY = 122

# Columns of each operation's block of draws: which operation, its level, its sign
# (negative below 1/2), its filter (bicubic from 1/2), and Cutout's centre.
_OPERATION, _LEVEL, _SIGN, _FILTER, _CENTRE_X, _CENTRE_Y = range(6)
DRAWS_PER_OPERATION = 6
# Draws per image for the authors' two operations.
NUM_DRAWS = 2 * DRAWS_PER_OPERATION


def solarize_add(images: np.ndarray, additions: np.ndarray) -> np.ndarray:
  """Adds ``addition`` to the pixels below 128, saturating at 255."""
  brighter = np.minimum(images + additions.reshape(-1, 1, 1, 1).astype(np.int64), 255)
  return np.where(images < 128, brighter, images).astype(np.uint8)


def brightness(images: np.ndarray, factors: np.ndarray) -> np.ndarray:
  """Blends with black (PIL's ImageEnhance.Brightness)."""
  return autoaugment.blend(images, np.float32(0), factors)


def shear_y(images: np.ndarray, shears: np.ndarray, interpolation: str = 'nearest',
            fill: float = 0) -> np.ndarray:
  """Vertical shear about the image's top-left corner: input y = y + shear * (x + 1/2)
  (``autoaugment.shear_x`` transposed)."""
  zeros, ones = np.zeros_like(shears), np.ones_like(shears)
  inverse = np.stack([np.stack([ones, zeros, zeros], -1),
                      np.stack([shears, ones, shears / 2], -1)], axis=1)
  return autoaugment.affine(images, inverse, interpolation, fill)


def translate(images: np.ndarray, shifts_x: np.ndarray, shifts_y: np.ndarray,
              interpolation: str = 'nearest', fill: float = 0) -> np.ndarray:
  """Output pixel (x, y) takes the input at (x + shift_x, y + shift_y), in pixels (PIL's
  affine (1, 0, shift_x, 0, 1, shift_y)): the content moves by minus the shift."""
  zeros, ones = np.zeros_like(shifts_x), np.ones_like(shifts_x)
  inverse = np.stack([np.stack([ones, zeros, shifts_x], -1),
                      np.stack([zeros, ones, shifts_y], -1)], axis=1)
  return autoaugment.affine(images, inverse, interpolation, fill)


def cutout(images: np.ndarray, centres_x: np.ndarray, centres_y: np.ndarray,
           sizes: np.ndarray) -> np.ndarray:
  """Paints columns [x - size // 2, x + size // 2) of rows [y - size // 2, y + size // 2),
  clipped to the image, in ``CUTOUT_COLOUR`` (``CUTOUT_GRAY`` for one channel)."""
  height, width, channels = images.shape[1:]
  half = (sizes // 2)[:, None]
  xs, ys = np.arange(width)[None, :], np.arange(height)[None, :]
  in_x = (xs >= centres_x[:, None] - half) & (xs < centres_x[:, None] + half)
  in_y = (ys >= centres_y[:, None] - half) & (ys < centres_y[:, None] + half)
  inside = in_y[:, :, None, None] & in_x[:, None, :, None]
  colour = np.asarray(CUTOUT_COLOUR if channels == 3 else (CUTOUT_GRAY,), np.uint8)
  return np.where(inside, colour, images)


# Levels -> arguments, elementwise.
_LevelMap = Callable[[np.ndarray], np.ndarray]


def _scaled(maximum: float) -> _LevelMap:
  """Levels scaled so that ``MAX_LEVEL`` gives ``maximum`` (the authors' float64
  arithmetic, so that whole-number arguments truncate as theirs do)."""
  return lambda levels: levels / MAX_LEVEL * maximum


def _whole(to_argument: _LevelMap) -> _LevelMap:
  """Arguments truncated to integers, as the authors' ``int(...)``."""
  return lambda levels: np.trunc(to_argument(levels)).astype(np.int64)


def _no_argument(levels: np.ndarray) -> np.ndarray:
  return np.zeros_like(levels)


def _enhancement(levels: np.ndarray) -> np.ndarray:
  return _scaled(1.8)(levels) + 0.1


# Level (float64) -> unsigned argument of each operation.
LEVEL_TO_ARGUMENT: dict[str, _LevelMap] = {
    'AutoContrast': _no_argument, 'Equalize': _no_argument, 'Invert': _no_argument,
    'Rotate': _scaled(30.0), 'PosterizeTpu': _whole(_scaled(4.0)),
    'Solarize': _whole(_scaled(256.0)), 'SolarizeAdd': _whole(_scaled(110.0)),
    'Color': _enhancement, 'Contrast': _enhancement, 'Brightness': _enhancement,
    'Sharpness': _enhancement, 'ShearX': _scaled(0.3), 'ShearY': _scaled(0.3),
    'TranslateXRel': _scaled(0.45), 'TranslateYRel': _scaled(0.45),
    'Cutout': _whole(lambda levels: np.maximum(2.0, _scaled(40.0)(levels))),
}

# Operations that take (images, arguments): the photometric ones.
_PHOTOMETRIC: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    'AutoContrast': autoaugment.autocontrast, 'Equalize': autoaugment.equalize,
    'Invert': autoaugment.invert, 'PosterizeTpu': autoaugment.posterize,
    'Solarize': autoaugment.solarize, 'SolarizeAdd': solarize_add,
    'Color': autoaugment.color, 'Contrast': autoaugment.contrast, 'Brightness': brightness,
    'Sharpness': autoaugment.sharpness,
}

# Operations that take (images, arguments, interpolation, fill), and a random sign.
_GEOMETRIC: dict[str, Callable[[np.ndarray, np.ndarray, str, float], np.ndarray]] = {
    'Rotate': autoaugment.rotate, 'ShearX': autoaugment.shear_x, 'ShearY': shear_y,
    'TranslateXRel': lambda images, fractions, interpolation, fill: translate(
        images, fractions * images.shape[2], np.zeros_like(fractions), interpolation, fill),
    'TranslateYRel': lambda images, fractions, interpolation, fill: translate(
        images, np.zeros_like(fractions), fractions * images.shape[1], interpolation, fill),
}


def sample_operations(draws: np.ndarray, magnitude: int = 15,
                      num_ops: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """Each image's operations (indices into ``OPERATIONS``) and their levels in
  {0, ..., magnitude - 1}, both int64 ``[n, num_ops]``, from ``draws`` ``[n, num_ops *
  DRAWS_PER_OPERATION]``."""
  blocks = draws.reshape(len(draws), num_ops, DRAWS_PER_OPERATION)
  operations = np.minimum((blocks[..., _OPERATION] * len(OPERATIONS)).astype(np.int64),
                          len(OPERATIONS) - 1)
  levels = np.minimum((blocks[..., _LEVEL] * magnitude).astype(np.int64), magnitude - 1)
  return operations, levels


def apply_operation(name: str, images: np.ndarray, levels: np.ndarray,
                    draws: np.ndarray) -> np.ndarray:
  """The authors' operation ``name`` at integer ``levels`` ``[n]`` on uint8 images
  ``[n, H, W, C]``, taking its sign, filter and Cutout centre from the operation's block of
  ``draws`` ``[n, DRAWS_PER_OPERATION]``. Returns uint8 images (``images`` itself where the
  operation cannot change them)."""
  arguments = LEVEL_TO_ARGUMENT[name](np.asarray(levels, np.float64))
  if name in _GEOMETRIC:
    arguments = np.where(draws[:, _SIGN] < 0.5, -arguments, arguments)
  if name in _PHOTOMETRIC:
    return _PHOTOMETRIC[name](images, arguments)
  if name == 'Cutout':
    height, width = images.shape[1:3]
    centres_x = np.minimum((draws[:, _CENTRE_X] * width).astype(np.int64), width - 1)
    centres_y = np.minimum((draws[:, _CENTRE_Y] * height).astype(np.int64), height - 1)
    return cutout(images, centres_x, centres_y, arguments)
  out = np.empty_like(images)
  bicubic = draws[:, _FILTER] >= 0.5
  for interpolation, chosen in (('bilinear', ~bicubic), ('bicubic', bicubic)):
    if chosen.any():
      out[chosen] = _GEOMETRIC[name](images[chosen], arguments[chosen], interpolation, FILL)
  return out


def randaugment(images: np.ndarray, draws: np.ndarray, magnitude: int = 15,
                num_ops: int = 2) -> np.ndarray:
  """The authors' RandAugment of uint8 images ``[n, H, W, C]`` (C = 1 or 3): ``num_ops``
  operations per image, each at a level drawn from {0, ..., magnitude - 1}, given
  ``num_ops * DRAWS_PER_OPERATION`` uniform [0, 1) numbers per image (operation k reads
  columns ``k * DRAWS_PER_OPERATION`` onwards). Returns new uint8 images."""
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'randaugment needs uint8 [n, H, W, C] images with C = 1 or 3, got '
                     f'{images.dtype} {images.shape}')
  if magnitude < 1 or num_ops < 0:
    raise ValueError(f'randaugment needs magnitude >= 1 and num_ops >= 0, got {magnitude} '
                     f'and {num_ops}')
  if draws.shape != (len(images), num_ops * DRAWS_PER_OPERATION):
    raise ValueError(f'randaugment with num_ops={num_ops} needs draws of shape '
                     f'{(len(images), num_ops * DRAWS_PER_OPERATION)}, got {draws.shape}')
  images = images.copy()
  operations, levels = sample_operations(draws, magnitude, num_ops)
  for slot in range(num_ops):
    block = draws[:, slot * DRAWS_PER_OPERATION:(slot + 1) * DRAWS_PER_OPERATION]
    for index, name in enumerate(OPERATIONS):
      selected = np.flatnonzero(operations[:, slot] == index)
      if len(selected):
        images[selected] = apply_operation(name, images[selected], levels[selected, slot],
                                           block[selected])
  return images
