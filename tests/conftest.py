"""Shared test set-up: float32 at full precision, fast compiles, random model states."""

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


def _is_bn(tree) -> bool:
  return isinstance(tree, dict) and set(tree) == {'scale', 'bias'}


def randomize_batch_norm(variables, seed: int = 0):
  """Random, far-from-default BatchNorm state in a training-time variables tree.

  Running means are drawn in [-3, 3] and variances in [2, 8], so a fold that ignores
  either is visible. Gamma and beta are drawn so that the network neither explodes nor
  forgets its input (a deep random network that outputs a constant would "match" under
  any fold): the BN gain ``gamma / std`` is in [0.6, 1], and beta is ``mean * gamma / std``
  plus noise.
  """
  rng = np.random.default_rng(seed)

  def walk(params, stats):
    out_params, out_stats = {}, {}
    for key, value in params.items():
      sub_stats = stats.get(key, {})
      if _is_bn(value):
        shape = np.shape(value['scale'])
        mean = rng.uniform(-3, 3, shape)
        var = rng.uniform(2, 8, shape)
        gain = rng.uniform(0.6, 1.0, shape)
        gamma = gain * np.sqrt(var + 1e-5)
        beta = mean * gain + rng.normal(0, 0.2, shape)
        out_params[key] = {'scale': jnp.asarray(gamma, jnp.float32),
                           'bias': jnp.asarray(beta, jnp.float32)}
        out_stats[key] = {'mean': jnp.asarray(mean, jnp.float32),
                          'var': jnp.asarray(var, jnp.float32)}
      elif isinstance(value, dict):
        out_params[key], s = walk(value, sub_stats)
        if s:
          out_stats[key] = s
      else:
        out_params[key] = value
    return out_params, out_stats

  params, stats = walk(variables['params'], variables['batch_stats'])
  return {'params': params, 'batch_stats': stats}


def random_variables(model, x, seed: int = 0):
  """Variables of ``model`` for input ``x`` drawn with numpy (much faster than
  ``model.init`` for the 100M-parameter variants): kernels ~ N(0, 1/fan_in), biases
  ~ N(0, 0.1) (squeeze-excite gates mostly open: ``up`` biases in [1, 3]), and, for a
  training-time model, random BatchNorm state as above."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if "'kernel'" in name:
      fan_in = int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in))
    if "'up'" in jax.tree_util.keystr(path[-2:-1]) and "'bias'" in name:
      return jnp.asarray(rng.uniform(1, 3, leaf.shape), leaf.dtype)
    if "'var'" in name:
      return jnp.ones(leaf.shape, leaf.dtype)
    if "'scale'" in name:
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.asarray(rng.normal(0, 0.1, leaf.shape), leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  if 'batch_stats' in variables:
    variables = randomize_batch_norm(variables, seed)
  return variables


def relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def images():
  """A non-square NHWC batch of two images."""
  return jax.random.normal(jax.random.PRNGKey(1), (2, 64, 96, 3), jnp.float32)
