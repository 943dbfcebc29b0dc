"""The training and evaluation steps: plain functions of one replica.

Their collectives run over the mapped axis ``AXIS``: call them under ``jax.pmap`` (see
``compilation``) or ``jax.shard_map`` with that axis name; nothing here knows which.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from repvgg_jax.training.optimization import custom_l2_penalty

# The mapped axis over which gradients, metrics and BatchNorm statistics are averaged.
AXIS = 'batch'
Tree = Any


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """What the train step needs from the config (hashable, static under jit)."""
  num_classes: int
  label_smoothing: float = 0.0
  mixup_alpha: float = 0.0
  weight_decay: float = 0.0
  custom_l2: bool = False
  aux_loss_weight: float = 0.0
  ema_decay: float = 0.0


def soft_targets(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing) \
      if smoothing else jax.nn.one_hot(labels, num_classes)


def mixup(images: jax.Array, targets: jax.Array, rng: jax.Array, alpha: float
          ) -> tuple[jax.Array, jax.Array]:
  """Mixup with one ratio per step; row ``2i`` is mixed with row ``2i+1`` and vice versa.

  Pairing neighbours (instead of a random permutation of the local batch) keeps the
  result independent of how the global batch is split over devices; the rows are in a
  random order already.
  """
  ratio = jax.random.beta(rng, alpha, alpha)

  def partner(x):
    return x.reshape(-1, 2, *x.shape[1:])[:, ::-1].reshape(x.shape)
  return (ratio * images + (1 - ratio) * partner(images),
          ratio * targets + (1 - ratio) * partner(targets))


def train_step(state: Tree, batch: dict[str, jax.Array], base_rng: jax.Array, *,
               model: nn.Module, tx: optax.GradientTransformation,
               schedule: Callable[[jax.Array], jax.Array], options: StepOptions
               ) -> tuple[Tree, dict[str, jax.Array]]:
  """One SGD step of one replica; collectives over ``AXIS`` (run it under ``jax.pmap``
  or ``shard_map`` with that axis name). ``state`` holds ``step``, ``params``,
  ``batch_stats``, ``opt_state`` and optionally ``ema``."""
  rng = jax.random.fold_in(base_rng, state['step'])
  images = batch['image']
  targets = soft_targets(batch['label'], options.num_classes, options.label_smoothing)
  if options.mixup_alpha > 0:
    images, targets = mixup(images, targets, rng, options.mixup_alpha)

  def loss_fn(params):
    outputs, updates = model.apply(
        {'params': params, 'batch_stats': state['batch_stats']}, images, train=True,
        mutable=['batch_stats'])
    heads = outputs if isinstance(outputs, dict) else {'main': outputs}
    losses = {name: jnp.mean(optax.softmax_cross_entropy(logits, targets))
              for name, logits in heads.items()}
    loss = losses['main'] + options.aux_loss_weight * sum(
        v for k, v in losses.items() if k != 'main')
    if options.custom_l2:
      loss += 0.5 * options.weight_decay * custom_l2_penalty(params, state['batch_stats'])
    return loss, (heads['main'], updates['batch_stats'], losses['main'])

  (_, (logits, batch_stats, main_loss)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state['params'])
  grads = lax.pmean(grads, AXIS)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  new_state = dict(state, step=state['step'] + 1, params=params, batch_stats=batch_stats,
                   opt_state=opt_state)
  if 'ema' in state:
    d = options.ema_decay
    new_state['ema'] = jax.tree_util.tree_map(
        lambda e, p: d * e + (1 - d) * p, state['ema'],
        {'params': params, 'batch_stats': batch_stats})
  finite = jnp.isfinite(main_loss) & jnp.all(jnp.asarray(
      [jnp.all(jnp.isfinite(p)) for p in jax.tree_util.tree_leaves(params)]))
  metrics = {
      'train_loss': main_loss,
      'train_accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
      'learning_rate': schedule(state['step']),
      'grad_norm': optax.tree_utils.tree_norm(grads),
      'finite': finite.astype(jnp.float32),
  }
  metrics = lax.pmean(metrics, AXIS)
  return new_state, metrics


def eval_step(variables: Tree, batch: dict[str, jax.Array], *, model: nn.Module
              ) -> dict[str, jax.Array]:
  """Sums over the real (``mask`` 1) examples of the batch, over all replicas: the loss,
  the top-1 and top-5 hits (``correct``, ``correct_top5``) and the ``count``."""
  logits = model.apply(variables, batch['image'])
  mask = batch['mask']
  labels = batch['label']
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = jnp.argmax(logits, -1) == labels
  top5 = lax.top_k(logits, min(5, logits.shape[-1]))[1]
  correct_top5 = jnp.any(top5 == labels[:, None], axis=-1)
  return lax.psum({'loss': jnp.sum(loss * mask), 'correct': jnp.sum(correct * mask),
                   'correct_top5': jnp.sum(correct_top5 * mask), 'count': jnp.sum(mask)},
                  AXIS)
