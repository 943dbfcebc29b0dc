"""Shared test set-up: float32 at full precision, fast compiles, random BN statistics."""

import os

# Several CPU devices for the data-parallel tests; must be set before jax starts.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
# Compilation, not execution, dominates these small graphs on 2 cores.
jax.config.update('jax_disable_most_optimizations', True)


def randomize_batch_norm(variables, seed: int = 0):
  """Random, far-from-default BatchNorm state: every ``scale``/``bias`` of a BN
  (a params subtree with exactly those two leaves) and every running ``mean``/``var``.

  Means sit far from 0 and variances far from 1, so a fold that ignores either shows.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    shape = np.shape(leaf)
    if "'mean'" in name:
      return jnp.asarray(rng.uniform(-3, 3, shape), jnp.float32)
    if "'var'" in name:
      return jnp.asarray(rng.uniform(2, 8, shape), jnp.float32)
    return leaf

  stats = jax.tree_util.tree_map_with_path(draw, variables['batch_stats'])

  def draw_bn_params(tree):
    if isinstance(tree, dict):
      if set(tree) == {'scale', 'bias'}:
        shape = np.shape(tree['scale'])
        return {'scale': jnp.asarray(rng.uniform(0.5, 2.0, shape), jnp.float32),
                'bias': jnp.asarray(rng.normal(0.5, 1.0, shape), jnp.float32)}
      return {k: draw_bn_params(v) for k, v in tree.items()}
    return tree

  return {**variables, 'params': draw_bn_params(variables['params']), 'batch_stats': stats}


def relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def images():
  """A non-square NHWC batch."""
  return jax.random.normal(jax.random.PRNGKey(1), (2, 64, 96, 3), jnp.float32)
