"""Randomness of the training batches: a counter-based hash, so that every random choice is a
pure function of its key (seed, step, position in the global batch, column), and the
per-epoch order of the examples."""

from __future__ import annotations

import numpy as np

from repvgg_jax import autoaugment, randaugment

# Random-resized-crop attempts before the centre fallback (torchvision's RandomResizedCrop).
CROP_ATTEMPTS = 10


def _mix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finalizer: a bijective scrambling of uint64 values."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def uniforms(seed: int, step: int, positions: np.ndarray, count: int) -> np.ndarray:
  """``count`` uniform floats in [0, 1) for each position of the global batch of ``step``:
  shape ``[len(positions), count]``, a pure function of (seed, step, position, column)."""
  golden = np.uint64(0x9E3779B97F4A7C15)
  key = _mix64(np.asarray([seed & (2**64 - 1)], np.uint64) + golden)
  key = _mix64(key ^ np.uint64(step & (2**64 - 1)))
  key = _mix64(key + np.asarray(positions, np.uint64) * golden)
  counters = key[:, None] + (np.arange(1, count + 1, dtype=np.uint64) * golden)[None, :]
  # The top 53 bits make an exactly representable double in [0, 1).
  return (_mix64(counters) >> np.uint64(11)).astype(np.float64) * 2.0**-53


# Columns of the per-position draws: crop areas, crop log-ratios, crop offsets, flip,
# then those of the policy (AutoAugment's or RandAugment's: a run uses one, so they share
# columns; a column's value does not depend on how many are drawn).
AREA = slice(0, CROP_ATTEMPTS)
RATIO = slice(CROP_ATTEMPTS, 2 * CROP_ATTEMPTS)
TOP, LEFT, FLIP = 2 * CROP_ATTEMPTS, 2 * CROP_ATTEMPTS + 1, 2 * CROP_ATTEMPTS + 2
_POLICY = 2 * CROP_ATTEMPTS + 3
AUTOAUGMENT = slice(_POLICY, _POLICY + autoaugment.NUM_DRAWS)
RANDAUGMENT = slice(_POLICY, _POLICY + randaugment.NUM_DRAWS)
NUM_DRAWS = _POLICY + max(autoaugment.NUM_DRAWS, randaugment.NUM_DRAWS)


def train_draws(seed: int, step: int, positions: np.ndarray) -> np.ndarray:
  """All random numbers that augment the given positions of the global batch of ``step``."""
  return uniforms(seed, step, positions, NUM_DRAWS)


class EpochPermutations:
  """The training order of a dataset read by index: epoch ``e`` visits the examples in a
  permutation seeded by (seed, e). Keeps the two latest epochs (a batch spans at most two)."""

  def __init__(self, seed: int, size: int):
    self.seed, self.size, self.cache = seed, size, {}

  def examples(self, stream_positions: np.ndarray) -> np.ndarray:
    """The example read at each position of the endless stream of epochs."""
    epochs = stream_positions // self.size
    out = np.empty_like(stream_positions)
    for epoch in np.unique(epochs):
      if epoch not in self.cache:
        if len(self.cache) >= 2:
          del self.cache[min(self.cache)]
        self.cache[epoch] = np.random.default_rng([self.seed, int(epoch)]).permutation(
            self.size)
      selected = epochs == epoch
      out[selected] = self.cache[epoch][stream_positions[selected] % self.size]
    return out
