"""Inference speed of RepVGG: training-time vs deploy graph in JAX, PyTorch alongside.

  python benchmark.py --models RepVGG-A0,RepVGG-B0 --batch-sizes 1,8,32 --dtype float32 \\
      --image-size 224 [--torch] [--json results.json] [--plot results.png]

Prints a markdown table (stdout; progress lines on stderr), and writes a JSON list of
records and a PNG (throughput per batch size; speed against published ImageNet top-1).
On CPU it starts XLA with ``--xla_cpu_experimental_ynn_fusion_type=`` (YNNPACK fusions
off: faster RepVGG graphs, see docs/benchmarks.md) unless --default-xla-flags is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

from repvgg_jax import bench
from repvgg_jax.variants import get_variant, list_models


def _names(text: str) -> list[str]:
  names = [n for n in text.split(',') if n]
  for name in names:
    try:
      get_variant(name)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from None
  return names


def _positive_ints(text: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(',') if v]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise argparse.ArgumentTypeError(f'{text!r}: expected comma-separated positive '
                                     'integers, e.g. 1,8,32')
  return values


def _choices(accepted: Sequence[str]):
  def parse(text: str) -> list[str]:
    values = [v for v in text.split(',') if v]
    unknown = [v for v in values if v not in accepted]
    if unknown or not values:
      raise argparse.ArgumentTypeError(f'{text!r}: accepted are {", ".join(accepted)}')
    return values
  return parse


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('--models', type=_names, default=['RepVGG-A0'],
                      help=f'comma-separated, from: {", ".join(list_models())}')
  parser.add_argument('--batch-sizes', type=_positive_ints, default=[1, 8, 32])
  parser.add_argument('--dtype', choices=tuple(bench.DTYPES), default='float32')
  parser.add_argument('--image-size', type=int, default=224)
  parser.add_argument('--structures', type=_choices(bench.JAX_STRUCTURES),
                      help='JAX graphs, comma-separated from: '
                      f'{", ".join(bench.JAX_STRUCTURES)} (default: train,deploy, and '
                      'deploy-winograd4 on CPU at float32)')
  parser.add_argument('--torch', action='store_true',
                      help='also measure timm\'s models in PyTorch (needs torch and timm)')
  parser.add_argument('--torch-variants', type=_choices(tuple(bench.TORCH_VARIANTS)),
                      default=list(bench.TORCH_VARIANTS),
                      help=f'with --torch, from: {", ".join(bench.TORCH_VARIANTS)}')
  parser.add_argument('--threads', type=int,
                      help='PyTorch CPU threads (default: PyTorch\'s own choice)')
  parser.add_argument('--min-calls', type=int, default=10,
                      help='timed calls per measurement, at least (default: 10)')
  parser.add_argument('--min-seconds', type=float, default=3.0,
                      help='timed seconds per measurement, at least (default: 3)')
  parser.add_argument('--json', metavar='FILE', help='write the records as JSON')
  parser.add_argument('--plot', metavar='FILE', help='write a PNG plot')
  parser.add_argument('--default-xla-flags', action='store_true',
                      help='keep XLA:CPU\'s default flags (YNNPACK fusions on)')
  args = parser.parse_args(argv)
  if args.image_size < 32:
    parser.error(f'--image-size {args.image_size}: RepVGG downsamples 32x, use at least 32')
  if args.min_calls < 1 or args.min_seconds < 0:
    parser.error('--min-calls must be >= 1 and --min-seconds >= 0')
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  # Before any JAX computation: XLA reads its flags once, when the backend starts.
  if not bench.set_cpu_flags(enable=not args.default_xla_flags) and not args.default_xla_flags:
    print(f'benchmark.py: note: JAX was already running, {bench.CPU_FAST_FLAGS} not applied',
          file=sys.stderr)
  if args.torch:
    try:
      import timm  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
      import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError as e:
      print(f'benchmark.py: error: --torch needs torch and timm ({e})', file=sys.stderr)
      return 1
  if args.plot:
    try:
      import matplotlib  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      print('benchmark.py: error: --plot needs matplotlib (pip install matplotlib)',
            file=sys.stderr)
      return 1
  for path in (args.json, args.plot):
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
      print(f'benchmark.py: error: {path}: no such directory', file=sys.stderr)
      return 1

  print(f'{bench.device_description()}, XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}',
        file=sys.stderr)
  matmul_rate = bench.matmul_tflops(bench.DTYPES[args.dtype])
  structures = args.structures or bench.default_structures(args.dtype)
  records = []
  for name in args.models:
    for batch_size in args.batch_sizes:
      candidates = bench.jax_candidates(name, structures, batch_size, args.dtype,
                                        args.image_size)
      if args.torch:
        candidates += bench.torch_candidates(name, args.torch_variants, batch_size,
                                             args.dtype, args.image_size,
                                             threads=args.threads)
      records += bench.measure(candidates, batch_size, args.dtype, args.image_size,
                               args.min_calls, args.min_seconds)
  # The best of two matmul measurements, before and after: other load only slows it.
  matmul_rate = max(matmul_rate, bench.matmul_tflops(bench.DTYPES[args.dtype]))
  print(f'dense {args.dtype} matmul: {matmul_rate:.3f} TFLOP/s', file=sys.stderr)
  for r in records:
    r.matmul_fraction = r.achieved_tflops / matmul_rate
  print(bench.markdown_table(records))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump([dict(dataclasses.asdict(r), matmul_tflops=matmul_rate,
                      xla_flags=os.environ.get('XLA_FLAGS', '')) for r in records], f,
                indent=1)
  if args.plot:
    bench.plot(records, args.plot)
  return 0


if __name__ == '__main__':
  sys.exit(main())
