"""Training RepVGG: data-parallel SGD with the paper's recipe, orbax checkpoints, metrics.

``train_and_evaluate(config, workdir)`` is the whole run (``train.py`` is its command line).
Data parallelism is ``jax.pmap`` over this process's devices with the axis ``'batch'``;
on several hosts (``jax.distributed.initialize``) the same axis spans every device of
every process, BatchNorm statistics and gradients are averaged over all of them.

Determinism. The global batch of step ``s`` is a function of (dataset, seed, s) only (see
``repvgg_jax.data``), the step's random numbers are ``fold_in(PRNGKey(seed), s)`` and mixup
pairs neighbouring rows, so neither depends on how the batch is split over devices or
processes: 1 device, 4 devices and 2 processes x 2 devices give the same losses, and a run
restarted from its last checkpoint ends exactly where an uninterrupted one does.

Workdir layout: ``run.json`` (model metadata, ``checkpoint.model_metadata``, plus the
config), ``checkpoints/<step>/state`` (``step``, ``params``, ``batch_stats``,
``opt_state`` and, with EMA, ``ema``), ``metrics.jsonl``, TensorBoard event files, and at
the end ``deploy/`` (the re-parameterized variables, ``checkpoint.save_variables``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import repvgg_jax as rv
from repvgg_jax import checkpoint as ckpt
from repvgg_jax.blocks import BN_EPSILON
from repvgg_jax.convolution import check_conv_impl

AXIS = 'batch'
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
METRICS_FILE = 'metrics.jsonl'
DEPLOY_DIR = 'deploy'
Tree = Any


class TrainingError(Exception):
  """A run that cannot start or go on; the message is one line for the user."""


# ------------------------------------------------------------------------------------------
# Optimization: learning rate, weight decay with the paper's exemptions, custom L2.


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


def _path_names(path: tuple[Any, ...]) -> list[str]:
  return [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]


def weight_decay_mask(params: Tree, custom_l2: bool = False) -> Tree:
  """True where plain weight decay applies: the official rule (``train.py`` of
  DingXiaoH/RepVGG) decays every parameter whose name contains neither 'bias' nor 'bn'.

  So conv and linear kernels and the identity branch's BN scale decay; biases and the BN
  parameters of the 3x3/1x1 branches do not. With ``custom_l2`` the whole 3x3 and 1x1
  branches (``rbr_dense``/``rbr_1x1`` there) get no plain decay: ``custom_l2_penalty``
  regularizes their kernels instead.
  """
  def decays(path, _):
    names = _path_names(path)
    if names[-1] == 'bias' or 'bn' in names:
      return False
    return not (custom_l2 and ('conv3x3' in names or 'conv1x1' in names))
  return jax.tree_util.tree_map_with_path(decays, params)


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
  """SGD with momentum (decoupled from nothing: like torch, decay is added to the
  gradient before momentum), linear warm-up and cosine decay; the peak learning rate is
  ``config.learning_rate`` per 256 images, scaled linearly with the global batch. With
  ``config.grad_clip_norm > 0`` the gradient (before weight decay) is first scaled down
  to at most that global norm, as timm's ``--clip-grad``."""
  peak = config.learning_rate * config.batch_size / 256
  warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total_steps)
  schedule = learning_rate_schedule(peak, warmup, total_steps)
  clip = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm > 0 else []
  tx = optax.chain(
      *clip,
      optax.add_decayed_weights(
          config.weight_decay,
          mask=functools.partial(weight_decay_mask, custom_l2=config.custom_l2)),
      optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
  return tx, schedule


# ------------------------------------------------------------------------------------------
# The training and evaluation steps (plain functions of one replica, using AXIS).


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
  """Sums over the real (``mask`` 1) examples of the batch, over all replicas."""
  logits = model.apply(variables, batch['image'])
  mask = batch['mask']
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
  correct = jnp.argmax(logits, -1) == batch['label']
  return lax.psum({'loss': jnp.sum(loss * mask), 'correct': jnp.sum(correct * mask),
                   'count': jnp.sum(mask)}, AXIS)


# ------------------------------------------------------------------------------------------
# The run.


def _shard(batch: dict[str, np.ndarray], devices: int) -> dict[str, np.ndarray]:
  return {k: v.reshape(devices, v.shape[0] // devices, *v.shape[1:]) for k, v in batch.items()}


def _replicate(tree: Tree) -> Tree:
  """A copy of ``tree`` on every local device, placed by a pmap over ``AXIS``: the steps'
  outputs carry that axis in their sharding, and an input placed otherwise (as by
  ``flax.jax_utils.replicate``) would make the train step compile a second time."""
  stacked = jax.tree_util.tree_map(
      lambda x: np.broadcast_to(np.asarray(x), (jax.local_device_count(), *np.shape(x))), tree)
  return jax.pmap(lambda x: x, axis_name=AXIS)(stacked)


def _unreplicate(tree: Tree) -> Tree:
  """The first local replica as numpy arrays."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x[0]), tree)


def initialize_distributed(coordinator_address: Optional[str], num_processes: Optional[int],
                           process_id: Optional[int]) -> None:
  """``jax.distributed.initialize`` from explicit flags, or from the cluster environment
  where one is detected (SLURM, Open MPI, TPU pods...); nothing for a single process."""
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given) and not all(given):
    raise TrainingError('--coordinator_address, --num_processes and --process_id go '
                        'together: give all three or none')
  if all(given):
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return
  from jax._src import clusters  # the environments jax.distributed.initialize() detects
  if any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types):
    jax.distributed.initialize()


def check_config(config: Any) -> None:
  """One-line errors for values the run cannot use (before any work is done)."""
  rv.get_variant(config.model)  # ValueError naming the valid models
  if config.dtype not in DTYPES:
    raise TrainingError(f'dtype {config.dtype!r}: accepted are {", ".join(DTYPES)}')
  try:
    check_conv_impl(config.conv_impl, deploy=False)
  except ValueError as e:
    raise TrainingError(str(e)) from None
  devices = jax.device_count()
  if config.batch_size <= 0 or config.batch_size % devices:
    raise TrainingError(f'batch_size {config.batch_size} must be a positive multiple of the '
                        f'{devices} devices (over {jax.process_count()} processes)')
  if config.mixup_alpha > 0 and (config.batch_size // devices) % 2:
    raise TrainingError(f'mixup pairs neighbouring images: the per-device batch '
                        f'{config.batch_size // devices} must be even')
  if not config.grad_clip_norm >= 0:
    raise TrainingError(f'grad_clip_norm must be 0 (off) or positive, got '
                        f'{config.grad_clip_norm}')
  if not config.conv_init_scale > 0:
    raise TrainingError(f'conv_init_scale must be positive, got {config.conv_init_scale}')
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise TrainingError('set num_epochs or num_train_steps to a positive number')


def _initializer(model: nn.Module, image_size: int, channels: int
                 ) -> Callable[[jax.Array], Tree]:
  """The model's initial variables as a function of a PRNG key."""
  x = jnp.zeros((1, image_size, image_size, channels), jnp.float32)
  return lambda key: ckpt._to_dicts(model.init(key, x, train=False))


def _initial_variables(config: Any, model: nn.Module, channels: int) -> Tree:
  init = jax.jit(_initializer(model, config.image_size, channels))
  variables = jax.device_get(init(jax.random.PRNGKey(config.seed)))
  if config.init_from:
    variables = _merge_pretrained(variables, config.init_from, config.model)
  return variables


def _new_state(variables: Tree, tx: optax.GradientTransformation, ema: bool) -> Tree:
  """The training state at step 0 (also traced by ``jax.eval_shape`` for its shapes)."""
  state = {'step': jnp.zeros((), jnp.int32), 'params': variables['params'],
           'batch_stats': variables['batch_stats'], 'opt_state': tx.init(variables['params'])}
  if ema:
    state['ema'] = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
  return state


def _replicated_shapes(tree: Tree, devices: int) -> Tree:
  """Shapes and dtypes of ``tree`` with a leading axis of ``devices`` replicas."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((devices, *x.shape), x.dtype), tree)


def _batch_shapes(per_device: int, image: tuple[int, int, int], devices: int,
                  mask: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of a sharded batch of the input pipeline (``mask``: an evaluation batch)."""
  shapes = {'image': jax.ShapeDtypeStruct((devices, per_device, *image), jnp.float32),
            'label': jax.ShapeDtypeStruct((devices, per_device), jnp.int32)}
  if mask:
    shapes['mask'] = jax.ShapeDtypeStruct((devices, per_device), jnp.float32)
  return shapes


def _done(value: Any) -> concurrent.futures.Future:
  future = concurrent.futures.Future()
  future.set_result(value)
  return future


@dataclasses.dataclass(frozen=True)
class _CompiledSteps:
  """Futures of the run's compiled pmapped steps."""
  train: concurrent.futures.Future
  eval: concurrent.futures.Future
  deploy_eval: concurrent.futures.Future


def _compile_steps(config: Any, info: Any, model: nn.Module, tx: optax.GradientTransformation,
                   schedule: Callable[[jax.Array], jax.Array], options: StepOptions,
                   devices: int, processes: int) -> _CompiledSteps:
  """Compile the train step and the evaluation steps of both structures from shapes
  alone, in a background thread. Compiling keeps about one core busy: the train step
  compiles while the caller initializes the model (training starts about 20 s sooner on
  ``make train``'s 2 cores), and the evaluation steps while it trains. Over several
  processes, where lowering ``pmap`` from shapes fails (jax 0.10), each step compiles at
  its first call instead."""
  p_train = jax.pmap(functools.partial(train_step, model=model, tx=tx, schedule=schedule,
                                       options=options),
                     axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=(0,))
  p_eval, p_deploy = (
      jax.pmap(functools.partial(eval_step, model=rv.create_model(
          config.model, info.num_classes, deploy=deploy, dtype=DTYPES[config.dtype],
          conv_impl=config.conv_impl)), axis_name=AXIS)
      for deploy in (False, True))
  if processes > 1:
    return _CompiledSteps(*(_done(step) for step in (p_train, p_eval, p_deploy)))
  variables = jax.eval_shape(_initializer(model, config.image_size, info.channels),
                             jax.random.PRNGKey(0))
  state = jax.eval_shape(functools.partial(_new_state, tx=tx, ema=config.ema_decay > 0),
                         variables)
  trained = _eval_variables(variables)
  image = (config.image_size, config.image_size, info.channels)
  eval_batch_size = config.eval_batch_size or config.batch_size
  train_batch = _batch_shapes(config.batch_size // devices, image, devices)  # one process
  eval_batch = _batch_shapes(eval_batch_size // devices, image, devices, mask=True)

  def compile_(step, *shapes):
    return step.lower(*shapes).compile()
  pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='compile')
  steps = _CompiledSteps(
      train=pool.submit(compile_, p_train, _replicated_shapes(state, devices), train_batch,
                        jax.eval_shape(jax.random.PRNGKey, 0)),
      eval=pool.submit(compile_, p_eval, _replicated_shapes(trained, devices), eval_batch),
      deploy_eval=pool.submit(
          compile_, p_deploy,
          _replicated_shapes(jax.eval_shape(rv.reparameterize, trained), devices), eval_batch))
  pool.shutdown(wait=False)
  return steps


def _merge_pretrained(fresh: Tree, directory: str, model: str) -> Tree:
  """Variables from a variables directory (``convert.py``); leaves whose shape differs
  (the classifiers, for another number of classes) keep their fresh initialization."""
  try:
    loaded, metadata = ckpt.load_variables(directory)
  except ckpt.CheckpointError as e:
    raise TrainingError(f'init_from: {e}') from None
  if metadata.get('structure', 'train') != 'train':
    raise TrainingError(f'init_from {directory}: holds the {metadata.get("structure")} '
                        'structure; training needs the training-time variables')
  if metadata.get('model') != model:
    raise TrainingError(f'init_from {directory}: holds {metadata.get("model")}, not {model}')

  def pick(path, leaf):
    node = loaded
    for name in _path_names(path):
      if not isinstance(node, dict) or name not in node:
        raise TrainingError(f'init_from {directory}: lacks {"/".join(_path_names(path))}')
      node = node[name]
    return np.asarray(node, leaf.dtype) if np.shape(node) == np.shape(leaf) else leaf
  return jax.tree_util.tree_map_with_path(pick, fresh)


class _Stop:
  """Set by SIGTERM: the loop saves a checkpoint and ends at the next step boundary."""

  def __init__(self):
    self.requested = False

  def __call__(self, signum, frame):
    self.requested = True

  def agreed(self) -> bool:
    """Whether any process was asked to stop (all must stop at the same step)."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))


class _MetricsWriter:
  """metrics.jsonl and TensorBoard, written by process 0 only."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    if enabled:
      from flax.metrics import tensorboard
      self.path = os.path.join(workdir, METRICS_FILE)
      self.tensorboard = tensorboard.SummaryWriter(workdir)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, **metrics}, sort_keys=True) + '\n')
    for name, value in metrics.items():
      self.tensorboard.scalar(name, value, step)
    self.tensorboard.flush()

  def truncate_after(self, step: int) -> None:
    """Drop lines beyond ``step`` (logged after the checkpoint a run resumes from)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [line for line in f if line.strip() and json.loads(line)['step'] <= step]
    with open(self.path, 'w') as f:
      f.writelines(lines)


def evaluate(p_eval: Callable, variables: Tree, batches: Iterator[dict[str, np.ndarray]],
             devices: int) -> dict[str, float]:
  """Loss and accuracy over every example of the evaluation split."""
  totals = None
  for batch in batches:
    sums = p_eval(variables, _shard(batch, devices))
    sums = {k: float(v[0]) for k, v in sums.items()}
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
  if not totals or not totals['count']:
    raise TrainingError('the evaluation split is empty')
  return {'loss': totals['loss'] / totals['count'],
          'accuracy': totals['correct'] / totals['count']}


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Train ``config.model`` on ``config.dataset`` in ``workdir`` (resuming from its last
  checkpoint), evaluate the training-time and the re-parameterized deploy model, save
  the deploy variables; returns the final summary (also printed as a table)."""
  import orbax.checkpoint as ocp

  from repvgg_jax import data

  check_config(config)
  workdir = os.path.abspath(workdir)
  info = data.dataset_info(config.dataset, config.data_dir or None)
  process, processes = jax.process_index(), jax.process_count()
  devices = jax.local_device_count()
  lead = process == 0
  steps_per_epoch = max(info.num_train // config.batch_size, 1)
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(math.ceil(config.num_epochs * steps_per_epoch)))
  dtype = DTYPES[config.dtype]
  kernel_init = nn.initializers.variance_scaling(config.conv_init_scale, 'fan_in',
                                                 'truncated_normal')
  model = rv.create_model(config.model, info.num_classes, dtype=dtype, bn_axis_name=AXIS,
                          conv_impl=config.conv_impl, kernel_init=kernel_init)
  tx, schedule = create_optimizer(config, steps_per_epoch, total_steps)
  options = StepOptions(
      num_classes=info.num_classes, label_smoothing=config.label_smoothing,
      mixup_alpha=config.mixup_alpha, weight_decay=config.weight_decay,
      custom_l2=config.custom_l2, aux_loss_weight=config.aux_loss_weight,
      ema_decay=config.ema_decay)

  os.makedirs(workdir, exist_ok=True)
  metadata = ckpt.model_metadata(config.model, info.num_classes, config.image_size,
                                 info.mean, info.std, dataset=config.dataset,
                                 structure='train', config=json.loads(config.to_json()))
  run_json = os.path.join(workdir, ckpt.RUN_METADATA)
  if os.path.exists(run_json):
    previous = ckpt.read_json(run_json)
    if (previous.get('model'), previous.get('num_classes')) != (config.model, info.num_classes):
      raise TrainingError(f'{workdir} holds a run of {previous.get("model")} with '
                          f'{previous.get("num_classes")} classes; use another --workdir')
  if lead:
    ckpt.write_json(run_json, metadata)

  steps = _compile_steps(config, info, model, tx, schedule, options, devices, processes)

  variables = _initial_variables(config, model, info.channels)
  state = jax.device_get(jax.jit(functools.partial(
      _new_state, tx=tx, ema=config.ema_decay > 0))(variables))
  manager = ckpt.checkpoint_manager(workdir, max_to_keep=config.keep_checkpoints)
  start_step = manager.latest_step() or 0
  if start_step:
    restored = manager.restore(start_step, args=ocp.args.Composite(
        **{ckpt.STATE_ITEM: ocp.args.StandardRestore(state)}))
    state = jax.tree_util.tree_map(np.asarray, restored[ckpt.STATE_ITEM])
  writer = _MetricsWriter(workdir, lead)
  writer.truncate_after(start_step)

  base_rng = jax.random.PRNGKey(config.seed)

  def eval_batches():
    return data.eval_batches(
        config.dataset, global_batch_size=config.eval_batch_size or config.batch_size,
        image_size=config.image_size, process_index=process, process_count=processes,
        data_dir=config.data_dir or None, crop_fraction=config.crop_fraction)

  def save(step: int, replicated: Tree) -> None:
    manager.save(step, args=ocp.args.Composite(
        **{ckpt.STATE_ITEM: ocp.args.StandardSave(_unreplicate(replicated))}))

  replicated = _replicate(state)
  stop = _Stop()
  previous_handler = signal.signal(signal.SIGTERM, stop) if lead or processes > 1 else None
  progress = _progress_bar(total_steps, start_step, lead)
  window: list[dict[str, float]] = []
  window_start, timed_steps, images_per_second = time.perf_counter(), 0, float('nan')
  run_start, run_steps = window_start, 0
  last_saved, stopped_early = start_step, False
  try:
    if start_step < total_steps:
      batches = data.train_batches(
          config.dataset, global_batch_size=config.batch_size, image_size=config.image_size,
          seed=config.seed, start_step=start_step, process_index=process,
          process_count=processes, data_dir=config.data_dir or None, augment=config.augment,
          min_crop_scale=config.min_crop_scale)
      train = steps.train.result()
      for step in range(start_step + 1, total_steps + 1):
        replicated, metrics = train(replicated, _shard(next(batches), devices), base_rng)
        metrics = {k: float(v[0]) for k, v in metrics.items()}
        if not metrics.pop('finite'):
          manager.wait_until_finished()
          raise TrainingError(
              f'the loss or the parameters became NaN/inf at step {step} (train loss '
              f'{metrics["train_loss"]}); stopped without saving it. The last good '
              f'checkpoint is step {manager.latest_step()} in {manager.directory}; lower the '
              'learning rate or add warm-up')
        window.append(metrics)
        timed_steps += 1
        progress.update(1)
        if step == start_step + 1:  # the first step includes compilation: not timed
          window_start, timed_steps = time.perf_counter(), 0
          run_start, run_steps = window_start, 0
        run_steps += 1
        if step % config.log_every_steps == 0 or step == total_steps:
          logged = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
          logged['epoch'] = step / steps_per_epoch
          if timed_steps:
            images_per_second = timed_steps * config.batch_size / (
                time.perf_counter() - window_start)
            logged['images_per_second'] = images_per_second
          writer.write(step, logged)
          progress.set_postfix(loss=f'{logged["train_loss"]:.4f}',
                               acc=f'{logged["train_accuracy"]:.3f}',
                               img_s=f'{images_per_second:.0f}')
          window, window_start, timed_steps = [], time.perf_counter(), 0
        if config.eval_every_steps > 0 and step % config.eval_every_steps == 0 \
            and step < total_steps:
          result = evaluate(steps.eval.result(), _eval_variables(replicated),
                            eval_batches(), devices)
          writer.write(step, {'eval_loss': result['loss'], 'eval_accuracy': result['accuracy']})
          window_start, timed_steps = time.perf_counter(), 0
        if step % config.checkpoint_every_steps == 0 or step == total_steps:
          save(step, replicated)
          last_saved = step
        if stop.agreed():
          if last_saved != step:
            save(step, replicated)
          stopped_early = True
          break
      if run_steps > 1:  # steps after the first, including evaluation and checkpoints
        images_per_second = (run_steps - 1) * config.batch_size / (
            time.perf_counter() - run_start)
    manager.wait_until_finished()
  finally:
    progress.close()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
  final_step = int(_unreplicate(replicated['step']))
  if stopped_early:
    message = (f'stopped by SIGTERM at step {final_step} of {total_steps}; the checkpoint '
               f'is in {manager.directory}; run the same command again to resume')
    if lead:
      print(message, flush=True)
    return {'stopped_at_step': final_step, 'checkpoints': str(manager.directory)}

  summary = _final_evaluation(config, info, workdir, replicated, steps.eval.result(),
                              steps.deploy_eval.result(), eval_batches, devices, lead)
  summary.update(step=final_step, images_per_second=images_per_second,
                 checkpoints=str(manager.directory))
  writer.write(final_step, {k: summary[k] for k in (
      'eval_loss', 'eval_accuracy', 'deploy_eval_loss', 'deploy_eval_accuracy')})
  if lead:
    print(summary_table(summary), flush=True)
  return summary


def _eval_variables(replicated: Tree) -> Tree:
  return {'params': replicated['params'], 'batch_stats': replicated['batch_stats']}


def _final_evaluation(config, info, workdir, replicated, p_eval, p_deploy, eval_batches,
                      devices, lead) -> dict[str, Any]:
  """Accuracy of the training-time model, of its deploy form, saving the latter."""
  import orbax.checkpoint as ocp

  trained = evaluate(p_eval, _eval_variables(replicated), eval_batches(), devices)
  host = _unreplicate(_eval_variables(replicated))
  deploy_variables = jax.device_get(jax.jit(rv.reparameterize)(host))
  deployed = evaluate(p_deploy, _replicate(deploy_variables), eval_batches(), devices)
  summary = {'eval_loss': trained['loss'], 'eval_accuracy': trained['accuracy'],
             'deploy_eval_loss': deployed['loss'], 'deploy_eval_accuracy': deployed['accuracy'],
             'deploy_variables': os.path.join(workdir, DEPLOY_DIR)}
  if 'ema' in replicated:
    ema = evaluate(p_eval, replicated['ema'], eval_batches(), devices)
    summary.update(ema_eval_loss=ema['loss'], ema_eval_accuracy=ema['accuracy'])
  if lead:
    # A single process writes the deploy directory (plain numpy, no collective).
    metadata = ckpt.model_metadata(
        config.model, info.num_classes, config.image_size, info.mean, info.std,
        structure='deploy', dataset=config.dataset,
        eval_accuracy=deployed['accuracy'])
    with _single_process_orbax(ocp):
      ckpt.save_variables(os.path.join(workdir, DEPLOY_DIR), deploy_variables, metadata,
                          overwrite=True)
  return summary


@contextlib.contextmanager
def _single_process_orbax(ocp) -> Iterator[None]:
  """Orbax synchronizes all processes inside every save; the deploy export is written
  by process 0 alone, so it must not wait for the others."""
  if jax.process_count() == 1:
    yield
    return
  original = ocp.StandardCheckpointer
  ocp.StandardCheckpointer = functools.partial(
      original, multiprocessing_options=ocp.options.MultiprocessingOptions(
          primary_host=0, active_processes={0}))
  try:
    yield
  finally:
    ocp.StandardCheckpointer = original


def summary_table(summary: dict[str, Any]) -> str:
  """The run's result as a short Markdown table."""
  rows = [('training-time model: eval accuracy', f'{100 * summary["eval_accuracy"]:.2f}%'),
          ('deploy model: eval accuracy', f'{100 * summary["deploy_eval_accuracy"]:.2f}%')]
  if 'ema_eval_accuracy' in summary:
    rows.append(('EMA weights: eval accuracy', f'{100 * summary["ema_eval_accuracy"]:.2f}%'))
  rows += [('training images/s (after compilation)', f'{summary["images_per_second"]:.0f}'),
           ('steps', str(summary['step'])),
           ('checkpoints', summary['checkpoints']),
           ('deploy variables', summary['deploy_variables'])]
  width = max(len(r[0]) for r in rows)
  value_width = max(len(r[1]) for r in rows)
  lines = [f'| {name:<{width}} | {value:<{value_width}} |' for name, value in rows]
  rule = f'|{"-" * (width + 2)}|{"-" * (value_width + 2)}|'
  return '\n'.join([f'| {"result":<{width}} | {"":<{value_width}} |', rule] + lines)


def _progress_bar(total: int, initial: int, enabled: bool):
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, disable=not enabled, unit='step',
              dynamic_ncols=True, file=sys.stdout)
