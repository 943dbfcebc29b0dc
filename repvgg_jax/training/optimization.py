"""Optimization: learning rate, weight decay with the paper's exemptions, custom L2."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax import lax

from repvgg_jax.blocks import BN_EPSILON

Tree = Any


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int
                           ) -> Callable[[jax.Array], jax.Array]:
  """Linear warm-up to ``peak`` over ``warmup_steps`` (the first step already at
  ``peak / warmup_steps``), then cosine decay to 0 at ``total_steps``."""
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * (step + 1) / max(warmup_steps, 1)
    progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0, 1)
    cosine = 0.5 * peak * (1 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup_steps, warm, cosine)
  return schedule


# The weight-decay rules of the authors' two trainers, by the name a config gives them.
WEIGHT_DECAY_RULES = ('repvgg', 'swin')


def weight_decay_mask(params: Tree, custom_l2: bool = False, rule: str = 'repvgg') -> Tree:
  """True where plain weight decay applies, by one of the authors' rules:

  * ``'repvgg'``, the original RepVGG models' (``train.py`` of DingXiaoH/RepVGG): every
    parameter whose name contains neither 'bias' nor 'bn';
  * ``'swin'``, their Swin-Transformer-based trainer's (``train/optimizer.py``
    ``set_weight_decay``, used for RepVGGplus): no decay on biases and on every 1-D
    parameter, except the identity branch's BN scale (``'identity.weight'`` is decayed
    there by name).

  On RepVGG's parameters both select the conv, SE and linear kernels and the identity
  branch's BN scale, and leave biases and the 3x3/1x1 branches' BN parameters alone. For
  QARepVGG blocks ``'repvgg'`` is also their authors' rule (cxxgtxy/QARepVGG): all
  kernels, the 1x1 ones included, decay; the 3x3 branch's BN and the BN after the sum
  (``bn``) do not. With ``custom_l2`` the whole 3x3 and 1x1 branches
  (``rbr_dense``/``rbr_1x1`` there) get no plain decay: ``custom_l2_penalty`` regularizes
  their kernels instead.
  """
  if rule not in WEIGHT_DECAY_RULES:
    raise ValueError(f'weight_decay_rule {rule!r}: accepted are {", ".join(WEIGHT_DECAY_RULES)}')

  def decays(names: tuple[str, ...], leaf: Any) -> bool:
    if custom_l2 and ('conv3x3' in names or 'conv1x1' in names):
      return False
    if rule == 'repvgg':
      return names[-1] != 'bias' and 'bn' not in names
    if names[-2:] == ('identity', 'scale'):
      return True
    return names[-1] != 'bias' and jnp.ndim(leaf) > 1
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {names: decays(names, leaf) for names, leaf in flat.items()})


def custom_l2_penalty(params: Tree, batch_stats: Tree) -> jax.Array:
  """Sum over RepVGG blocks of the official ``get_custom_L2`` (repvgg.py).

  For a block with 3x3 kernel ``K3``, 1x1 kernel ``K1`` and BN factors
  ``t = gamma / sqrt(running_var + eps)`` (held constant): plain L2 on the eight outer
  taps of ``K3``, plus ``sum(eq^2 / (t3^2 + t1^2))`` on the equivalent centre tap
  ``eq = K3[centre] * t3 + K1 * t1``. The loss adds ``0.5 * weight_decay`` times this.
  """
  total = jnp.zeros((), jnp.float32)
  for name, sub in params.items():
    if not isinstance(sub, dict):
      continue
    stats = batch_stats.get(name, {})
    if 'conv3x3' in sub and 'conv1x1' in sub:
      k3 = sub['conv3x3']['conv']['kernel']
      k1 = sub['conv1x1']['conv']['kernel']
      t3, t1 = (lax.stop_gradient(sub[b]['bn']['scale'] /
                                  jnp.sqrt(stats[b]['bn']['var'] + BN_EPSILON))
                for b in ('conv3x3', 'conv1x1'))
      centre = k3[1, 1]
      circle = jnp.sum(k3 ** 2) - jnp.sum(centre ** 2)
      equivalent = centre * t3 + k1[0, 0] * t1  # [in/groups, out] * [out]
      total += circle + jnp.sum(equivalent ** 2 / (t3 ** 2 + t1 ** 2))
    else:
      total += custom_l2_penalty(sub, stats)
  return total


def create_optimizer(config: Any, steps_per_epoch: int, total_steps: int
                     ) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
  """``(optimizer, schedule)`` of a training config: SGD with momentum (like torch, the
  decay is added to the gradient before momentum), linear warm-up and cosine decay; the
  peak learning rate is ``config.learning_rate`` per 256 images, scaled linearly with the
  global batch. With ``config.grad_clip_norm > 0`` the gradient (before weight decay) is
  first scaled down to at most that global norm, as timm's ``--clip-grad``."""
  peak = config.learning_rate * config.batch_size / 256
  warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total_steps)
  schedule = learning_rate_schedule(peak, warmup, total_steps)
  clip = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm > 0 else []
  tx = optax.chain(
      *clip,
      optax.add_decayed_weights(
          config.weight_decay,
          mask=functools.partial(weight_decay_mask, custom_l2=config.custom_l2,
                                 rule=config.weight_decay_rule)),
      optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
  return tx, schedule
