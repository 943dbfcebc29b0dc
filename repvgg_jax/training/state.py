"""The training state: the model of a config, its initial variables (fresh, or from a
variables directory written by ``convert.py``) and the state pytree at step 0."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from repvgg_jax import checkpoint
from repvgg_jax.models import DTYPES, RepVGG, create_model
from repvgg_jax.training.steps import AXIS

Tree = Any


class InitError(ValueError):
  """Initial variables that cannot be used (``config.init_from``)."""


def model_of(config: Any, num_classes: int, deploy: bool = False) -> RepVGG:
  """The model a training config trains (``deploy``: its inference structure), computing
  in ``config.dtype`` with ``config.conv_impl``; the training-time structure is built of
  ``config.block`` blocks, averages BatchNorm statistics over ``AXIS`` and draws its conv
  kernels with variance ``config.conv_init_scale / fan_in``."""
  if deploy:
    return create_model(config.model, num_classes, deploy=True, dtype=DTYPES[config.dtype],
                        conv_impl=config.conv_impl)
  kernel_init = nn.initializers.variance_scaling(config.conv_init_scale, 'fan_in',
                                                 'truncated_normal')
  return create_model(config.model, num_classes, dtype=DTYPES[config.dtype],
                      bn_axis_name=AXIS, conv_impl=config.conv_impl, kernel_init=kernel_init,
                      block=config.block)


def initializer(model: nn.Module, image_size: int, channels: int
                ) -> Callable[[jax.Array], Tree]:
  """The model's initial variables as a function of a PRNG key."""
  x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  return lambda key: model.init(key, x, train=False)


def initial_variables(config: Any, model: nn.Module, channels: int) -> Tree:
  """Fresh variables seeded by ``config.seed``, overwritten by those of
  ``config.init_from`` where that is set."""
  init = jax.jit(initializer(model, config.image_size, channels))
  variables = jax.device_get(init(jax.random.PRNGKey(config.seed)))
  if config.init_from:
    variables = merge_pretrained(variables, config.init_from, config.model)
  return variables


def new_state(variables: Tree, tx: optax.GradientTransformation, ema: bool) -> Tree:
  """The training state at step 0 (also traced by ``jax.eval_shape`` for its shapes):
  ``step``, ``params``, ``batch_stats``, ``opt_state`` and, with ``ema``, ``ema``."""
  state = {'step': jnp.zeros((), jnp.int32), 'params': variables['params'],
           'batch_stats': variables['batch_stats'], 'opt_state': tx.init(variables['params'])}
  if ema:
    state['ema'] = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
  return state


def eval_variables(state: Tree) -> Tree:
  """The variables of the training-time model in a (possibly replicated) state."""
  return {'params': state['params'], 'batch_stats': state['batch_stats']}


def merge_pretrained(fresh: Tree, directory: str, model: str) -> Tree:
  """Variables from a variables directory (``convert.py``); leaves whose shape differs
  (the classifiers, for another number of classes) keep their fresh initialization."""
  try:
    loaded, metadata = checkpoint.load_variables(directory)
  except checkpoint.CheckpointError as e:
    raise InitError(f'init_from: {e}') from None
  if metadata.get('structure', 'train') != 'train':
    raise InitError(f'init_from {directory}: holds the {metadata.get("structure")} '
                    'structure; training needs the training-time variables')
  if metadata.get('model') != model:
    raise InitError(f'init_from {directory}: holds {metadata.get("model")}, not {model}')
  available = traverse_util.flatten_dict(loaded)
  merged = {}
  for path, leaf in traverse_util.flatten_dict(fresh).items():
    if path not in available:
      raise InitError(f'init_from {directory}: lacks {"/".join(path)}')
    found = available[path]
    merged[path] = np.asarray(found, leaf.dtype) if np.shape(found) == np.shape(leaf) else leaf
  return traverse_util.unflatten_dict(merged)
