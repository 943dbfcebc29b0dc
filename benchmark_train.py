"""Training throughput: this repo's train step (JAX) next to timm's (PyTorch), same run.

    python benchmark_train.py --model RepVGG-A0 --batch-size 64 --image-size 32 \
        --channels 1 --num-classes 10 --steps 10

One SGD step (forward, backward, momentum update, BatchNorm statistics) on random data,
computed in ``--dtype``: bfloat16 is JAX's model ``dtype`` with float32 parameters (as
``config.dtype`` in training) and PyTorch's autocast. JAX's step is the training run's
own: the model, optimizer, state and pmapped step of ``configs/imagenet_a_b.py``'s recipe
built by ``repvgg_jax.training``, over all local devices. After a warm-up step each
(compilation excluded), the two frameworks take turns for ``--rounds`` rounds of
``--steps`` timed steps, so that a change in the machine's load touches both; images/s
are the median over all timed steps; TFLOP/s count 3x the forward MACs of the
training-time graph (``models.training_macs``: forward, input and weight gradients), as a
share of the measured dense matmul rate of ``--dtype``. JAX runs with the XLA:CPU flags of
``train.py``
(``xla_backend.CPU_FAST_FLAGS``); PyTorch NCHW (``--channels-last`` for NHWC) with
``torch.set_num_threads(--threads)`` on CPU (oneDNN's channels_last backward crashed in
torch 2.13). Prints one Markdown row per framework; ``--json FILE`` writes them as records.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Optional, Sequence

from repvgg_jax import benchmarking, cli, xla_backend

CONV_IMPLS = ('xla', 'patches')


def parse_args(argv: Optional[Sequence[str]] = None):
  parser = cli.ArgumentParser(__doc__, prog='benchmark_train.py')
  cli.add_model(parser, default='RepVGG-A0')
  parser.add_argument('--batch-size', type=cli.positive_int, default=64,
                      help='images per step (default: 64)')
  parser.add_argument('--image-size', type=cli.positive_int, default=32,
                      help='square input size (default: 32)')
  parser.add_argument('--channels', type=cli.positive_int, default=1, help='input channels')
  parser.add_argument('--num-classes', type=cli.positive_int, default=10,
                      help='classifier outputs')
  parser.add_argument('--steps', type=cli.positive_int, default=10,
                      help='timed steps per framework and round')
  parser.add_argument('--rounds', type=cli.positive_int, default=3,
                      help='alternating rounds of timed steps')
  parser.add_argument('--threads', type=cli.positive_int, default=2,
                      help='PyTorch CPU threads')
  cli.add_conv_impl(parser, CONV_IMPLS, default='patches')
  cli.add_dtype(parser, help='compute dtype of both frameworks (parameters stay float32)')
  parser.add_argument('--channels-last', action='store_true',
                      help='PyTorch in channels_last (NHWC) memory format')
  parser.add_argument('--no-torch', action='store_true', help='time JAX alone')
  parser.add_argument('--json', metavar='FILE', help='write the rows as JSON records')
  return parser.parse_args(argv)


def _timed(step: Callable[[], None], steps: int) -> list[float]:
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def jax_train_step(args) -> Callable[[], None]:
  """One step of the training run's pmapped ``train_step`` (a callable, no result)."""
  import jax
  import numpy as np

  from configs import imagenet_a_b
  from repvgg_jax.training import compilation, optimization, parallel, state, trainer

  config = imagenet_a_b.get_config(args.model)
  config.batch_size, config.image_size = args.batch_size, args.image_size
  config.dtype, config.conv_impl = args.dtype, args.conv_impl
  model = state.model_of(config, args.num_classes)
  tx, schedule = optimization.create_optimizer(config, steps_per_epoch=1000, total_steps=1000)
  variables = jax.jit(state.initializer(model, args.image_size, args.channels))(
      jax.random.PRNGKey(0))
  train_state = parallel.replicate(jax.device_get(jax.jit(
      lambda v: state.new_state(v, tx, ema=False))(variables)))
  step = compilation.pmapped_train_step(model, tx, schedule,
                                        trainer.step_options(config, args.num_classes))
  rng = np.random.default_rng(0)
  batch = parallel.shard({
      'image': rng.normal(size=(args.batch_size, args.image_size, args.image_size,
                                args.channels)).astype(np.float32),
      'label': rng.integers(0, args.num_classes, args.batch_size).astype(np.int32)},
      jax.local_device_count())
  holder = {'state': train_state}

  def one_step():
    holder['state'], metrics = step(holder['state'], batch, jax.random.PRNGKey(0))
    jax.block_until_ready(metrics)
  return one_step


def torch_train_step(args) -> Callable[[], None]:
  """One training step of timm's model with ``torch.optim.SGD`` (a callable)."""
  import timm
  import torch

  from repvgg_jax.torch_io import timm_model_name

  cuda = torch.cuda.is_available()
  device = 'cuda' if cuda else 'cpu'
  torch.set_num_threads(args.threads)
  memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
  model = timm.create_model(timm_model_name(args.model), pretrained=False,
                            num_classes=args.num_classes, in_chans=args.channels)
  model = model.to(device, memory_format=memory_format).train()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  images = torch.randn(args.batch_size, args.channels, args.image_size, args.image_size,
                       device=device).contiguous(memory_format=memory_format)
  labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == 'bfloat16')

  def one_step():
    optimizer.zero_grad(set_to_none=True)
    with autocast:
      loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    if cuda:
      torch.cuda.synchronize()
  return one_step


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
    return cli.fail('benchmark_train.py', f'{args.json}: no such directory')
  xla_backend.set_cpu_flags()  # before JAX starts, as train.py does
  import jax

  from repvgg_jax.models import DTYPES, training_macs
  steps = {}
  versions = f'jax {jax.__version__}'
  setting = (f'{args.model}, batch {args.batch_size}, {args.image_size}x{args.image_size}'
             f'x{args.channels}, {args.dtype}')
  steps[f'JAX (repvgg-jax, pmap step, conv_impl={args.conv_impl})'] = jax_train_step(args)
  if not args.no_torch:
    import torch
    from repvgg_jax.torch_io import timm_model_name
    if timm_model_name(args.model) is None:
      return cli.fail('benchmark_train.py', f'{args.model}: timm has no such model; '
                      'pass --no-torch')
    versions += f', torch {torch.__version__}'
    layout = 'channels_last' if args.channels_last else 'NCHW'
    where = 'CUDA' if torch.cuda.is_available() else f'{args.threads} threads'
    steps[f'PyTorch (timm, {layout}, {where})'] = torch_train_step(args)
  load = os.getloadavg()
  print(f'date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, '
        f'{benchmarking.device_description()}, {platform.machine()}, {os.cpu_count()} CPUs, '
        f'load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {versions}')
  times = {name: [] for name in steps}
  for step in steps.values():
    step()  # warm-up: compilation, allocation
  for _ in range(args.rounds):
    for name, step in steps.items():
      times[name] += _timed(step, args.steps)
  matmul_rate = benchmarking.matmul_tflops(DTYPES[args.dtype])
  flops_per_image = 3 * 2 * training_macs(args.model, args.image_size, args.num_classes)
  records = []
  for name, measured in times.items():
    images_per_second = args.batch_size / statistics.median(measured)
    tflops = flops_per_image * images_per_second / 1e12
    records.append({'framework': name, 'model': args.model, 'batch_size': args.batch_size,
                    'image_size': args.image_size, 'channels': args.channels,
                    'dtype': args.dtype, 'images_per_second': images_per_second,
                    'achieved_tflops': tflops, 'matmul_tflops': matmul_rate,
                    'matmul_fraction': tflops / matmul_rate,
                    'device': benchmarking.device_description(), 'timed_steps': len(measured)})
  print('| framework | setting | training images/s | TFLOP/s | % of matmul |')
  print('|---|---|---|---|---|')
  for r in records:
    print(f'| {r["framework"]} | {setting} | {r["images_per_second"]:.1f} | '
          f'{r["achieved_tflops"]:.3f} | {100 * r["matmul_fraction"]:.0f} |')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(records, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
