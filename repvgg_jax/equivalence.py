"""How this project checks that two forms of a model compute the same function.

The bar (``TOLERANCE``) is a relative L2 error of the logits (``relative_error``) of at most
1e-5 at float32, on random input, with random variables (``random_variables``) whose
BatchNorm statistics are far from their defaults, so that a fold that ignores the running
mean or variance shows. Conversion (``conversion.verify_deploy``), the tests, the
benchmarks (whose speed does not depend on the values) and the GPU checks use these.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The conversion bar: relative L2 error of the deploy logits against the training-time
# model's, at float32 (the fold itself is exact up to rounding, ~1e-7).
TOLERANCE = 1e-5


def relative_error(output: Any, reference: Any) -> float:
  """``||output - reference|| / ||reference||`` in float64."""
  output, reference = np.asarray(output, np.float64), np.asarray(reference, np.float64)
  return float(np.linalg.norm(output - reference) / np.linalg.norm(reference))


def _is_bn(tree: Any) -> bool:
  return isinstance(tree, dict) and set(tree) == {'scale', 'bias'}


def randomize_batch_norm(variables: dict[str, Any], seed: int = 0) -> dict[str, Any]:
  """Random, far-from-default BatchNorm state in a training-time variables tree.

  Running means are drawn in [-3, 3] and variances in [2, 8], so a fold that ignores
  either is visible. Gamma and beta are drawn so that the network neither explodes nor
  forgets its input (a deep random network that outputs a constant would "match" under
  any fold): the BN gain ``gamma / std`` is in [0.6, 1], and beta is ``mean * gamma / std``
  plus noise.
  """
  rng = np.random.default_rng(seed)

  def walk(params, stats):
    # State that is no BN's (QARepVGG's identity marker) is kept as it is.
    out_params, out_stats = {}, {k: v for k, v in stats.items() if k not in params}
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
  return {**variables, 'params': params, 'batch_stats': stats}


def random_variables(model: nn.Module, x: Any, seed: int = 0) -> dict[str, Any]:
  """Variables of ``model`` for input ``x`` (an array or ``jax.ShapeDtypeStruct``) drawn
  with numpy (much faster than ``model.init`` for the 100M-parameter variants): kernels
  ~ N(0, 1/fan_in), biases ~ N(0, 0.1) (squeeze-excite gates mostly open: ``up`` biases
  in [1, 3]), and, for a training-time model, random BatchNorm state as above."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)

  def draw(path, leaf):
    name = getattr(path[-1], 'key', None)
    if name == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in))
    if name == 'bias' and len(path) > 1 and getattr(path[-2], 'key', None) == 'up':
      return jnp.asarray(rng.uniform(1, 3, leaf.shape), leaf.dtype)
    if name in ('var', 'scale'):
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.asarray(rng.normal(0, 0.1, leaf.shape), leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  if 'batch_stats' in variables:
    variables = randomize_batch_norm(variables, seed)
  return variables
