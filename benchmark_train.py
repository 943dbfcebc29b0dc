"""Training throughput: this repo's train step (JAX) next to timm's (PyTorch), same run.

    python benchmark_train.py --model RepVGG-A0 --batch_size 64 --image_size 32 \
        --channels 1 --num_classes 10 --steps 10

One SGD step (forward, backward, momentum update, BatchNorm statistics) on random data,
computed in ``--dtype``: bfloat16 is JAX's model ``dtype`` with float32 parameters (as
``config.dtype`` in training) and PyTorch's CPU autocast. After a warm-up step each
(compilation excluded), the two frameworks take turns for
``--rounds`` rounds of ``--steps`` timed steps, so that a change in the machine's load
touches both; images/s are the median over all timed steps. JAX runs with the XLA:CPU
flags of ``train.py`` (``bench.CPU_FAST_FLAGS``); PyTorch NCHW with
``torch.set_num_threads(--threads)`` (oneDNN's channels_last backward crashed in torch
2.13). Prints one Markdown row per framework.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time

from absl import app, flags

flags.DEFINE_string('model', 'RepVGG-A0', 'Model name (list_models()).')
flags.DEFINE_integer('batch_size', 64, 'Images per step.')
flags.DEFINE_integer('image_size', 32, 'Square input size.')
flags.DEFINE_integer('channels', 1, 'Input channels.')
flags.DEFINE_integer('num_classes', 10, 'Classifier outputs.')
flags.DEFINE_integer('steps', 10, 'Timed steps per framework and round.')
flags.DEFINE_integer('rounds', 3, 'Alternating rounds of timed steps.')
flags.DEFINE_integer('threads', 2, 'PyTorch CPU threads.')
flags.DEFINE_enum('conv_impl', 'patches', ['xla', 'patches'], 'JAX convolutions.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                  'Compute dtype of both frameworks (parameters stay float32).')
FLAGS = flags.FLAGS


def _timed(step, steps: int) -> list[float]:
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def jax_train_step():
  """One training step of this repo's ``train_lib.train_step`` (a callable, no result)."""
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import repvgg_jax as rv
  from repvgg_jax import train_lib

  model = rv.create_model(FLAGS.model, FLAGS.num_classes, bn_axis_name=train_lib.AXIS,
                          conv_impl=FLAGS.conv_impl, dtype=train_lib.DTYPES[FLAGS.dtype])
  shape = (FLAGS.batch_size, FLAGS.image_size, FLAGS.image_size, FLAGS.channels)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, *shape[1:])))
  schedule = train_lib.learning_rate_schedule(0.1, 0, 1000)
  tx = optax.chain(optax.add_decayed_weights(1e-4, train_lib.weight_decay_mask),
                   optax.sgd(schedule, momentum=0.9))
  state = {'step': np.zeros((), np.int32), 'params': variables['params'],
           'batch_stats': variables['batch_stats'], 'opt_state': tx.init(variables['params'])}
  step = jax.pmap(functools.partial(
      train_lib.train_step, model=model, tx=tx, schedule=schedule,
      options=train_lib.StepOptions(FLAGS.num_classes)),
      axis_name=train_lib.AXIS, in_axes=(0, 0, None))
  rng = np.random.default_rng(0)
  devices = jax.local_device_count()  # 1 on a CPU unless XLA_FLAGS says otherwise
  batch = {'image': rng.normal(size=(devices, shape[0] // devices, *shape[1:])
                               ).astype(np.float32),
           'label': rng.integers(0, FLAGS.num_classes, (devices, shape[0] // devices)
                                 ).astype(np.int32)}
  holder = {'state': train_lib._replicate(state)}

  def one_step():
    holder['state'], metrics = step(holder['state'], batch, jax.random.PRNGKey(0))
    jax.block_until_ready(metrics)
  return one_step


def torch_train_step():
  """One training step of timm's model with ``torch.optim.SGD`` (a callable)."""
  import timm
  import torch

  from repvgg_jax.bench import timm_name

  torch.set_num_threads(FLAGS.threads)
  model = timm.create_model(timm_name(FLAGS.model), pretrained=False,
                            num_classes=FLAGS.num_classes, in_chans=FLAGS.channels)
  model.train()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  images = torch.randn(FLAGS.batch_size, FLAGS.channels, FLAGS.image_size, FLAGS.image_size)
  labels = torch.randint(0, FLAGS.num_classes, (FLAGS.batch_size,))

  autocast = torch.autocast('cpu', dtype=torch.bfloat16, enabled=FLAGS.dtype == 'bfloat16')

  def one_step():
    optimizer.zero_grad(set_to_none=True)
    with autocast:
      loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
  return one_step


def main(argv: list[str]) -> None:
  del argv
  from repvgg_jax import bench
  bench.set_cpu_flags()  # before JAX starts, as train.py does
  import jax
  import torch
  load = os.getloadavg()
  setting = (f'{FLAGS.model}, batch {FLAGS.batch_size}, {FLAGS.image_size}x{FLAGS.image_size}'
             f'x{FLAGS.channels}, {FLAGS.dtype}')
  print(f'date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, '
        f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load '
        f'{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; jax {jax.__version__}, '
        f'torch {torch.__version__}')
  steps = {f'JAX (repvgg-jax, pmap step, conv_impl={FLAGS.conv_impl})': jax_train_step(),
           f'PyTorch (timm, NCHW, {FLAGS.threads} threads)': torch_train_step()}
  times = {name: [] for name in steps}
  for name, step in steps.items():
    step()  # warm-up: compilation, allocation
  for _ in range(FLAGS.rounds):
    for name, step in steps.items():
      times[name] += _timed(step, FLAGS.steps)
  print('| framework | setting | training images/s |')
  print('|---|---|---|')
  for name, measured in times.items():
    print(f'| {name} | {setting} | {FLAGS.batch_size / statistics.median(measured):.1f} |')


if __name__ == '__main__':
  app.run(main)
