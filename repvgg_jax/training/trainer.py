"""The training run: data-parallel SGD with the paper's recipe, checkpoints, metrics, and
the re-parameterized deploy model at the end.

``train_and_evaluate(config, workdir)`` is the whole run (``train.py`` is its command
line). Data parallelism is ``jax.pmap`` over this process's devices with the axis
``steps.AXIS``; on several hosts (``jax.distributed``) the same axis spans every device of
every process, and BatchNorm statistics and gradients are averaged over all of them.

Determinism. The global batch of step ``s`` is a function of (dataset, seed, s) only (see
``repvgg_jax.data``), the step's random numbers are ``fold_in(PRNGKey(seed), s)`` and mixup
pairs neighbouring rows, so neither depends on how the batch is split over devices or
processes: 1 device, 4 devices and 2 processes x 2 devices give the same losses, and a run
restarted from its last checkpoint ends exactly where an uninterrupted one does.

With ``config.skip_unreadable_images``, an image folder's unreadable files are skipped
rather than an error (``repvgg_jax.data``): each is logged once, and ``metrics.jsonl`` and
the summary count them (``skipped_images``: the files this process skipped, training and
evaluation).

Workdir layout: ``run.json`` (model metadata, ``checkpoint.model_metadata``, plus the
config), ``checkpoints/<step>/state`` (``step``, ``params``, ``batch_stats``,
``opt_state`` and, with EMA, ``ema``), ``metrics.jsonl``, TensorBoard event files, and at
the end ``deploy/`` (the re-parameterized variables, ``checkpoint.save_variables``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
from typing import Any

import jax
import numpy as np

from repvgg_jax import checkpoint, data
from repvgg_jax.blocks import BLOCKS
from repvgg_jax.evaluation import evaluate
from repvgg_jax.convolution import check_conv_impl
from repvgg_jax.models import DTYPES
from repvgg_jax.reparam import reparameterize
from repvgg_jax.training import compilation, metrics as run_metrics, optimization, parallel
from repvgg_jax.training import state as train_state
from repvgg_jax.training.steps import StepOptions
from repvgg_jax.variants import get_variant

DEPLOY_DIR = 'deploy'
Tree = Any


class TrainingError(Exception):
  """A run that cannot start or go on; the message is one line for the user."""


def check_config(config: Any) -> None:
  """One-line errors for values the run cannot use (before any work is done)."""
  get_variant(config.model)  # ValueError naming the valid models
  if config.dtype not in DTYPES:
    raise TrainingError(f'dtype {config.dtype!r}: accepted are {", ".join(DTYPES)}')
  try:
    check_conv_impl(config.conv_impl, deploy=False)
  except ValueError as e:
    raise TrainingError(str(e)) from None
  if config.block not in BLOCKS:
    raise TrainingError(f'block {config.block!r}: accepted are {", ".join(BLOCKS)}')
  if config.custom_l2 and config.block != 'repvgg':
    # get_custom_L2 regularizes the BN-scaled branch kernels of the RepVGG block; the
    # QARepVGG recipe (cxxgtxy/QARepVGG, train_QAV2_B0.sh) uses plain weight decay.
    raise TrainingError(f'custom_l2 is defined for the repvgg block only, not '
                        f'{config.block!r}; set custom_l2=False (plain weight decay)')
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
  if config.weight_decay_rule not in optimization.WEIGHT_DECAY_RULES:
    raise TrainingError(f'weight_decay_rule {config.weight_decay_rule!r}: accepted are '
                        f'{", ".join(optimization.WEIGHT_DECAY_RULES)}')
  if not config.conv_init_scale > 0:
    raise TrainingError(f'conv_init_scale must be positive, got {config.conv_init_scale}')
  for field in ('log_every_steps', 'checkpoint_every_steps'):
    if config[field] <= 0:
      raise TrainingError(f'{field} must be a positive number of steps, got {config[field]}')
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise TrainingError('set num_epochs or num_train_steps to a positive number')


def step_options(config: Any, num_classes: int) -> StepOptions:
  """What the train step needs from the config."""
  return StepOptions(
      num_classes=num_classes, label_smoothing=config.label_smoothing,
      mixup_alpha=config.mixup_alpha, weight_decay=config.weight_decay,
      custom_l2=config.custom_l2, aux_loss_weight=config.aux_loss_weight,
      ema_decay=config.ema_decay)


def _check_workdir(workdir: str, model: str, num_classes: int) -> None:
  """Refuse a workdir that holds a run of another model or number of classes."""
  run_json = os.path.join(workdir, checkpoint.RUN_METADATA)
  if os.path.exists(run_json):
    previous = checkpoint.read_json(run_json)
    if (previous.get('model'), previous.get('num_classes')) != (model, num_classes):
      raise TrainingError(f'{workdir} holds a run of {previous.get("model")} with '
                          f'{previous.get("num_classes")} classes; use another --workdir')


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
  """Train ``config.model`` on ``config.dataset`` in ``workdir`` (resuming from its last
  checkpoint), evaluate the training-time and the re-parameterized deploy model, save
  the deploy variables; returns the final summary (also printed as a table)."""
  # ------------------------------------------------------------------ set-up
  check_config(config)
  workdir = os.path.abspath(workdir)
  info = data.dataset_info(config.dataset, config.data_dir or None)
  process, processes = jax.process_index(), jax.process_count()
  devices = jax.local_device_count()
  lead = process == 0
  steps_per_epoch = max(info.num_train // config.batch_size, 1)
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(math.ceil(config.num_epochs * steps_per_epoch)))
  model = train_state.model_of(config, info.num_classes)
  tx, schedule = optimization.create_optimizer(config, steps_per_epoch, total_steps)

  os.makedirs(workdir, exist_ok=True)
  _check_workdir(workdir, config.model, info.num_classes)
  if lead:
    # image_size: the size the model is evaluated (and deployed) at.
    metadata = checkpoint.model_metadata(
        config.model, info.num_classes, config.eval_image_size, info.mean, info.std,
        dataset=config.dataset, structure='train', config=json.loads(config.to_json()))
    checkpoint.write_json(os.path.join(workdir, checkpoint.RUN_METADATA), metadata)

  # ------------------------------------------------------------------ compile, initialize
  initializer = train_state.initializer(model, config.image_size, info.channels)
  compiled = compilation.compile_steps(
      compilation.pmapped_train_step(model, tx, schedule,
                                     step_options(config, info.num_classes)),
      compilation.pmapped_eval_step(model),
      compilation.pmapped_eval_step(train_state.model_of(config, info.num_classes,
                                                         deploy=True)),
      initializer=initializer, tx=tx, ema=config.ema_decay > 0,
      image=(config.image_size, config.image_size, info.channels),
      eval_image=(config.eval_image_size, config.eval_image_size, info.channels),
      batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size or config.batch_size)
  variables = train_state.initial_variables(config, model, info.channels)
  state = jax.device_get(jax.jit(functools.partial(
      train_state.new_state, tx=tx, ema=config.ema_decay > 0))(variables))

  # ------------------------------------------------------------------ resume
  manager = checkpoint.checkpoint_manager(workdir, max_to_keep=config.keep_checkpoints)
  start_step = manager.latest_step() or 0
  if start_step:
    state = checkpoint.restore_train_state(manager, start_step, state)
  writer = run_metrics.MetricsWriter(workdir, lead)
  writer.truncate_after(start_step)

  def eval_batches():
    return data.eval_batches(
        config.dataset, global_batch_size=config.eval_batch_size or config.batch_size,
        image_size=config.eval_image_size, process_index=process, process_count=processes,
        data_dir=config.data_dir or None, crop_fraction=config.crop_fraction,
        skip_unreadable_images=config.skip_unreadable_images)

  def skipped_images() -> dict[str, int]:
    if not config.skip_unreadable_images:
      return {}
    return {'skipped_images': len(data.skipped_images(config.dataset,
                                                      config.data_dir or None))}

  # ------------------------------------------------------------------ train
  replicated = parallel.replicate(state)
  base_rng = jax.random.PRNGKey(config.seed)
  stop = parallel.StopRequest()
  previous_handler = signal.signal(signal.SIGTERM, stop) if lead or processes > 1 else None
  progress = run_metrics.progress_bar(total_steps, start_step, lead)
  throughput = run_metrics.Throughput(config.batch_size)
  window: list[dict[str, float]] = []
  last_saved, stopped_early = start_step, False
  try:
    if start_step < total_steps:
      batches = data.train_batches(
          config.dataset, global_batch_size=config.batch_size, image_size=config.image_size,
          seed=config.seed, start_step=start_step, process_index=process,
          process_count=processes, data_dir=config.data_dir or None, augment=config.augment,
          min_crop_scale=config.min_crop_scale,
          skip_unreadable_images=config.skip_unreadable_images)
      train = compiled.train.result()
      for step in range(start_step + 1, total_steps + 1):
        replicated, step_metrics = train(replicated, parallel.shard(next(batches), devices),
                                         base_rng)
        step_metrics = {k: float(v[0]) for k, v in step_metrics.items()}
        if not step_metrics.pop('finite'):
          manager.wait_until_finished()
          raise TrainingError(
              f'the loss or the parameters became NaN/inf at step {step} (train loss '
              f'{step_metrics["train_loss"]}); stopped without saving it. The last good '
              f'checkpoint is step {manager.latest_step()} in {manager.directory}; lower the '
              'learning rate or add warm-up')
        window.append(step_metrics)
        throughput.step_done()
        progress.update(1)
        if step % config.log_every_steps == 0 or step == total_steps:
          logged = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
          logged['epoch'] = step / steps_per_epoch
          logged.update(skipped_images())
          images_per_second = throughput.window()
          if not math.isnan(images_per_second):
            logged['images_per_second'] = images_per_second
          writer.write(step, logged)
          progress.set_postfix(loss=f'{logged["train_loss"]:.4f}',
                               acc=f'{logged["train_accuracy"]:.3f}',
                               img_s=f'{images_per_second:.0f}')
          window = []
        if config.eval_every_steps > 0 and step % config.eval_every_steps == 0 \
            and step < total_steps:
          result = evaluate(compiled.eval.result(), train_state.eval_variables(replicated),
                            eval_batches(), devices)
          writer.write(step, {'eval_loss': result['loss'], 'eval_accuracy': result['accuracy']})
          throughput.restart_window()
        if step % config.checkpoint_every_steps == 0 or step == total_steps:
          checkpoint.save_train_state(manager, step, parallel.unreplicate(replicated))
          last_saved = step
        if stop.agreed():
          if last_saved != step:
            checkpoint.save_train_state(manager, step, parallel.unreplicate(replicated))
          stopped_early = True
          break
    manager.wait_until_finished()
  finally:
    progress.close()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
  images_per_second = throughput.run()
  final_step = int(parallel.unreplicate(replicated['step']))
  if stopped_early:
    if lead:
      print(f'stopped by SIGTERM at step {final_step} of {total_steps}; the checkpoint is in '
            f'{manager.directory}; run the same command again to resume', flush=True)
    writer.close()
    return {'stopped_at_step': final_step, 'checkpoints': str(manager.directory)}

  # ------------------------------------------------------------------ evaluate, deploy
  trained = evaluate(compiled.eval.result(), train_state.eval_variables(replicated),
                     eval_batches(), devices)
  host = parallel.unreplicate(train_state.eval_variables(replicated))
  deploy_variables = jax.device_get(jax.jit(reparameterize)(host))
  deployed = evaluate(compiled.deploy_eval.result(), parallel.replicate(deploy_variables),
                      eval_batches(), devices)
  summary = {'eval_loss': trained['loss'], 'eval_accuracy': trained['accuracy'],
             'deploy_eval_loss': deployed['loss'], 'deploy_eval_accuracy': deployed['accuracy'],
             'deploy_variables': os.path.join(workdir, DEPLOY_DIR)}
  if 'ema' in replicated:
    ema = evaluate(compiled.eval.result(), replicated['ema'], eval_batches(), devices)
    summary.update(ema_eval_loss=ema['loss'], ema_eval_accuracy=ema['accuracy'])
  if lead:
    metadata = checkpoint.model_metadata(
        config.model, info.num_classes, config.eval_image_size, info.mean, info.std,
        config.crop_fraction, structure='deploy', dataset=config.dataset,
        eval_accuracy=deployed['accuracy'])
    checkpoint.save_variables(os.path.join(workdir, DEPLOY_DIR), deploy_variables, metadata,
                              overwrite=True, this_process_only=True)
  summary.update(step=final_step, images_per_second=images_per_second,
                 checkpoints=str(manager.directory), **skipped_images())
  writer.write(final_step, {k: summary[k] for k in (
      'eval_loss', 'eval_accuracy', 'deploy_eval_loss', 'deploy_eval_accuracy')})
  writer.close()
  if lead:
    print(run_metrics.summary_table(summary), flush=True)
  return summary
