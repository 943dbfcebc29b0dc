"""The steps mapped over the local devices (``jax.pmap`` over ``AXIS``), and compiled
ahead of time from shapes alone, in a background thread."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from repvgg_jax.reparam import reparameterize
from repvgg_jax.training import parallel, state as train_state, steps
from repvgg_jax.training.steps import AXIS

Tree = Any


def pmapped_train_step(model: nn.Module, tx: optax.GradientTransformation,
                       schedule: Callable[[jax.Array], jax.Array],
                       options: steps.StepOptions) -> Callable:
  """``step(replicated_state, sharded_batch, base_rng) -> (state, metrics)`` over the
  local devices; the state's buffers are donated (updated in place)."""
  return jax.pmap(functools.partial(steps.train_step, model=model, tx=tx, schedule=schedule,
                                    options=options),
                  axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=(0,))


def pmapped_eval_step(model: nn.Module) -> Callable:
  """``step(replicated_variables, sharded_batch) -> sums`` over the local devices."""
  return jax.pmap(functools.partial(steps.eval_step, model=model), axis_name=AXIS)


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
  """Futures of a run's compiled steps: ``.result()`` waits for the compiler."""
  train: concurrent.futures.Future
  eval: concurrent.futures.Future
  deploy_eval: concurrent.futures.Future


def _done(value: Any) -> concurrent.futures.Future:
  future = concurrent.futures.Future()
  future.set_result(value)
  return future


def _batch_shapes(per_device: int, image: tuple[int, int, int], devices: int,
                  mask: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of a sharded batch of the input pipeline (``mask``: an evaluation batch):
  float32 images (and masks), int32 labels."""
  shapes = {'image': jax.ShapeDtypeStruct((devices, per_device, *image), jnp.float32),
            'label': jax.ShapeDtypeStruct((devices, per_device), jnp.int32)}
  if mask:
    shapes['mask'] = jax.ShapeDtypeStruct((devices, per_device), jnp.float32)
  return shapes


def compile_steps(train: Callable, evaluate: Callable, deploy_evaluate: Callable, *,
                  initializer: Callable[[jax.Array], Tree], tx: optax.GradientTransformation,
                  ema: bool, image: tuple[int, int, int], eval_image: tuple[int, int, int],
                  batch_size: int, eval_batch_size: int) -> CompiledSteps:
  """Compile the pmapped train step and the evaluation steps of both structures from
  shapes alone, in a background thread. Compiling keeps about one core busy: the train
  step compiles while the caller initializes the model (training starts about 20 s sooner
  on ``make train``'s 2 cores), and the evaluation steps while it trains. Over several
  processes, where lowering ``pmap`` from shapes fails (jax 0.10), each step compiles at
  its first call instead."""
  if jax.process_count() > 1:
    return CompiledSteps(_done(train), _done(evaluate), _done(deploy_evaluate))
  devices = jax.local_device_count()
  variables = jax.eval_shape(initializer, jax.random.PRNGKey(0))
  state = jax.eval_shape(functools.partial(train_state.new_state, tx=tx, ema=ema), variables)
  trained = train_state.eval_variables(variables)
  deployed = jax.eval_shape(reparameterize, trained)
  train_batch = _batch_shapes(batch_size // devices, image, devices)
  eval_batch = _batch_shapes(eval_batch_size // devices, eval_image, devices, mask=True)

  def compile_(step, *shapes):
    return step.lower(*shapes).compile()
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='compile')
  compiled = CompiledSteps(
      train=pool.submit(compile_, train, parallel.replicated_shapes(state, devices),
                        train_batch, jax.eval_shape(jax.random.PRNGKey, 0)),
      eval=pool.submit(compile_, evaluate, parallel.replicated_shapes(trained, devices),
                       eval_batch),
      deploy_eval=pool.submit(compile_, deploy_evaluate,
                              parallel.replicated_shapes(deployed, devices), eval_batch))
  pool.shutdown(wait=False)
  return compiled
