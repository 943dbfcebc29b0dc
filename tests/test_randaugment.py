"""The RepVGG authors' RandAugment ('raug15'): its sampling, its operations, and the PIL
calls of their train/randaug.py (through torchvision's functional ops where it has them)."""

import numpy as np
import pytest

from repvgg_jax import randaugment as ra

GEOMETRIC = ('Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')


def _images(count: int = 4, channels: int = 3, seed: int = 0) -> np.ndarray:
  """Smooth images with noise, so that every operation has something to change."""
  rng = np.random.default_rng(seed)
  base = np.linspace(0, 200, 24 * 20 * channels).reshape(1, 24, 20, channels)
  noisy = base + rng.normal(0, 30, (count, 24, 20, channels))
  return np.clip(noisy, 0, 255).astype(np.uint8)


def _operation_draws(count: int, negative: bool, bicubic: bool,
                     seed: int = 0) -> np.ndarray:
  """One operation's block of draws (operation, level, sign, filter, centre x, centre y)
  with the given sign and filter and random centres."""
  draws = np.random.default_rng(seed).uniform(size=(count, ra.DRAWS_PER_OPERATION))
  draws[:, 2] = 0.25 if negative else 0.75
  draws[:, 3] = 0.75 if bicubic else 0.25
  return draws


def test_level_to_argument_follows_the_authors_ranges():
  levels = np.arange(15.0)
  expected = {
      'PosterizeTpu': [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 5, 5],
      'Solarize': [0, 25, 51, 76, 102, 128, 153, 179, 204, 230, 256, 281, 307, 332, 358],
      'SolarizeAdd': [0, 11, 22, 33, 44, 55, 66, 77, 88, 99, 110, 121, 132, 143, 154],
      'Cutout': [2, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56],
  }
  for name, arguments in expected.items():
    np.testing.assert_array_equal(ra.LEVEL_TO_ARGUMENT[name](levels), arguments)
  for name, maximum in (('Rotate', 30), ('ShearX', 0.3), ('ShearY', 0.3),
                        ('TranslateXRel', 0.45), ('TranslateYRel', 0.45)):
    np.testing.assert_allclose(ra.LEVEL_TO_ARGUMENT[name](levels), levels / 10 * maximum)
  for name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    factors = ra.LEVEL_TO_ARGUMENT[name](levels)
    np.testing.assert_allclose(factors, 0.1 + 0.18 * levels)
    assert factors[5] == 1.0
  assert len(set(ra.OPERATIONS)) == 16 and set(ra.LEVEL_TO_ARGUMENT) == set(ra.OPERATIONS)


def test_operations_at_neutral_levels_are_identities():
  images = _images()
  neutral = {name: 0 for name in GEOMETRIC + ('SolarizeAdd',)}
  neutral.update({name: 5 for name in ('Color', 'Contrast', 'Brightness', 'Sharpness')})
  neutral.update(Solarize=10)
  for name, level in neutral.items():
    for negative in (False, True):
      for bicubic in (False, True):
        out = ra.apply_operation(name, images, np.full(4, level),
                                 _operation_draws(4, negative, bicubic))
        np.testing.assert_array_equal(out, images, err_msg=name)
  np.testing.assert_array_equal(
      ra.apply_operation('Solarize', images, np.full(4, 14), _operation_draws(4, False, False)),
      images)


@pytest.mark.parametrize('channels', [1, 3])
def test_randaugment_keeps_shape_and_dtype_and_changes_images(channels):
  images = _images(64, channels)
  draws = np.random.default_rng(1).uniform(size=(64, ra.NUM_DRAWS))
  out = ra.randaugment(images, draws)
  assert out.shape == images.shape and out.dtype == np.uint8
  assert (out != images).any(axis=(1, 2, 3)).mean() > 0.8


def test_randaugment_is_a_pure_function_of_its_draws():
  images = _images(16)
  original = images.copy()
  rng = np.random.default_rng(2)
  draws, other = rng.uniform(size=(2, 16, ra.NUM_DRAWS))
  first = ra.randaugment(images, draws)
  np.testing.assert_array_equal(ra.randaugment(images, draws), first)
  np.testing.assert_array_equal(images, original)
  assert (ra.randaugment(images, other) != first).any(axis=(1, 2, 3)).mean() > 0.8


def test_randaugment_rejects_mismatched_inputs():
  images = _images(2)
  with pytest.raises(ValueError, match='draws of shape'):
    ra.randaugment(images, np.zeros((2, ra.NUM_DRAWS)), num_ops=3)
  with pytest.raises(ValueError, match='uint8'):
    ra.randaugment(images.astype(np.float32), np.zeros((2, ra.NUM_DRAWS)))


def test_operations_and_levels_are_drawn_uniformly():
  # A regular grid of draws: every operation and every level gets exactly its share.
  count = 16 * 15 * 4
  grid = (np.arange(count) + 0.5) / count
  rng = np.random.default_rng(3)
  draws = rng.uniform(size=(count, ra.NUM_DRAWS))
  draws[:, 0], draws[:, 1] = grid, rng.permutation(grid)
  draws[:, 6], draws[:, 7] = rng.permutation(grid), grid
  operations, levels = ra.sample_operations(draws)
  assert operations.shape == levels.shape == (count, 2)
  for slot in range(2):
    np.testing.assert_array_equal(np.bincount(operations[:, slot]), np.full(16, count // 16))
    np.testing.assert_array_equal(np.bincount(levels[:, slot]), np.full(15, count // 15))
  assert ra.sample_operations(draws, magnitude=4)[1].max() == 3
  # Draws next to 1 stay in range.
  ones = np.full((1, ra.NUM_DRAWS), np.nextafter(1.0, 0.0))
  np.testing.assert_array_equal(ra.sample_operations(ones), ([[15, 15]], [[14, 14]]))


def test_randaugment_applies_its_operations_in_order_with_their_own_draws():
  for channels in (1, 3):
    images = _images(48, channels, seed=4)
    draws = np.random.default_rng(5).uniform(size=(48, 3 * ra.DRAWS_PER_OPERATION))
    out = ra.randaugment(images, draws, magnitude=12, num_ops=3)
    operations, levels = ra.sample_operations(draws, magnitude=12, num_ops=3)
    for i, image in enumerate(images):
      expected = image[None]
      for slot in range(3):
        block = draws[i:i + 1, slot * ra.DRAWS_PER_OPERATION:(slot + 1) *
                      ra.DRAWS_PER_OPERATION]
        expected = ra.apply_operation(ra.OPERATIONS[operations[i, slot]], expected,
                                      levels[i, slot:slot + 1], block)
      np.testing.assert_array_equal(out[i], expected[0])


def _reference(image: np.ndarray, name: str, level: int, draws: np.ndarray) -> np.ndarray:
  """The authors' operation on one RGB image, through PIL: torchvision's functional ops
  where torchvision has the operation, PIL itself otherwise."""
  torchvision_f = pytest.importorskip('torchvision.transforms.functional')
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from torchvision.transforms import InterpolationMode  # pylint: disable=g-import-not-at-top
  from torchvision.transforms.autoaugment import _apply_op  # pylint: disable=g-import-not-at-top

  pil = Image.fromarray(image)
  height, width = image.shape[:2]
  scale = level / 10.0
  sign = -1 if draws[2] < 0.5 else 1
  bicubic = draws[3] >= 0.5
  interpolation = InterpolationMode.BICUBIC if bicubic else InterpolationMode.BILINEAR
  fill = [128.0] * 3
  enhance = {'Color': torchvision_f.adjust_saturation,
             'Contrast': torchvision_f.adjust_contrast,
             'Brightness': torchvision_f.adjust_brightness,
             'Sharpness': torchvision_f.adjust_sharpness}
  if name in ('Rotate', 'ShearX', 'ShearY'):
    maximum = 30.0 if name == 'Rotate' else 0.3
    out = _apply_op(pil, name, sign * (scale * maximum), interpolation, fill)
  elif name in ('TranslateXRel', 'TranslateYRel'):
    # Fractional shifts, which torchvision's TranslateX/Y (whole pixels) cannot make.
    shift = sign * (scale * 0.45)
    matrix = ((1, 0, shift * width, 0, 1, 0) if name == 'TranslateXRel'
              else (1, 0, 0, 0, 1, shift * height))
    out = pil.transform(pil.size, Image.AFFINE, matrix,
                        resample=Image.BICUBIC if bicubic else Image.BILINEAR,
                        fillcolor=(128, 128, 128))
  elif name == 'PosterizeTpu':
    bits = int(scale * 4)
    # Pillow now refuses 0 bits; the Pillow of the authors' time masked every bit.
    out = torchvision_f.posterize(pil, bits) if bits else np.zeros_like(image)
  elif name == 'Solarize':
    out = torchvision_f.solarize(pil, int(scale * 256))
  elif name == 'SolarizeAdd':
    add = int(scale * 110)
    out = pil.point([min(255, value + add) if value < 128 else value
                     for value in range(256)] * 3)
  elif name in enhance:
    out = enhance[name](pil, scale * 1.8 + 0.1)
  elif name == 'Cutout':
    half = int(max(2, scale * 40)) // 2
    x, y = int(draws[4] * width), int(draws[5] * height)
    out = image.copy()
    out[max(0, y - half):y + half, max(0, x - half):x + half] = (125, 122, 113)
  else:
    out = {'AutoContrast': torchvision_f.autocontrast, 'Equalize': torchvision_f.equalize,
           'Invert': torchvision_f.invert}[name](pil)
  return np.asarray(out)


@pytest.mark.parametrize('name', ra.OPERATIONS)
def test_operations_match_the_authors_pil_calls(name):
  """Each operation at levels 0..14 against PIL (the authors' library). Exact, except for
  rounding: geometric samples half-way between two levels or on the image's edge, and the
  torchvision arithmetic of Color, Contrast and Sharpness (see the module docstring)."""
  images = _images(4, seed=6)
  for level in range(15):
    for negative in (False, True):
      for bicubic in (False, True):
        draws = _operation_draws(4, negative, bicubic, seed=level)
        ours = ra.apply_operation(name, images, np.full(4, level), draws).astype(int)
        theirs = np.stack([_reference(image, name, level, image_draws)
                           for image, image_draws in zip(images, draws)]).astype(int)
        error = np.abs(ours - theirs)
        context = f'{name} level {level} negative {negative} bicubic {bicubic}'
        if name in GEOMETRIC:
          assert (error > 0).mean() < 0.03 and (error > 1).mean() < 0.005, context
        elif name in ('Color', 'Contrast', 'Sharpness'):
          assert error.max() <= 2, context
        else:
          assert not error.any(), context


def test_brightness_is_torchvisions_tensor_arithmetic():
  torch = pytest.importorskip('torch')
  torchvision_f = pytest.importorskip('torchvision.transforms.functional')
  images = _images(4, seed=7)
  for factor in (0.1, 0.64, 1.9, 2.62):
    ours = ra.brightness(images, np.full(4, factor))
    theirs = np.stack([torchvision_f.adjust_brightness(
        torch.from_numpy(image).permute(2, 0, 1), factor).permute(1, 2, 0).numpy()
                       for image in images])
    np.testing.assert_array_equal(ours, theirs)


def test_translations_by_whole_pixels_are_torchvisions():
  pytest.importorskip('torchvision')
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from torchvision.transforms import InterpolationMode  # pylint: disable=g-import-not-at-top
  from torchvision.transforms.autoaugment import _apply_op  # pylint: disable=g-import-not-at-top
  images = _images(4, seed=8)
  for shift in (-7, 3):
    for interpolation in ('bilinear', 'bicubic'):
      mode = InterpolationMode(interpolation)
      for name, shifts in (('TranslateX', (shift, 0)), ('TranslateY', (0, shift))):
        # torchvision moves the content by +shift: the input is read at -shift.
        ours = ra.translate(images, np.full(4, -shifts[0], float),
                            np.full(4, -shifts[1], float), interpolation, ra.FILL)
        theirs = np.stack([np.asarray(_apply_op(Image.fromarray(image), name, float(shift),
                                                mode, [128.0] * 3)) for image in images])
        np.testing.assert_array_equal(ours, theirs)
