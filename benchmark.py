"""Inference speed of RepVGG: training-time vs deploy graph in JAX, PyTorch alongside.

  python benchmark.py --models RepVGG-A0,RepVGG-B0 --batch-sizes 1,8,32 --dtype float32 \\
      --image-size 224 [--structures deploy,deploy-winograd4-native,deploy-int8] [--torch] \\
      [--onnx-runtimes onnxruntime,openvino [--onnx-exporters jax,torch,int8]] \\
      [--json results.json] [--plot results.png]

Prints a markdown table (stdout; progress lines on stderr), and writes a JSON list of
records and a PNG (throughput per batch size; speed against published ImageNet top-1).
On CPU it starts XLA with ``--xla_cpu_experimental_ynn_fusion_type=`` (YNNPACK fusions
off: faster RepVGG graphs, see docs/benchmarks.md) unless --default-xla-flags is given.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

import jax

from repvgg_jax import benchmarking, cli, native, winograd, xla_backend
from repvgg_jax.models import DTYPES
from repvgg_jax.variants import list_models


def parse_args(argv: Optional[Sequence[str]] = None):
  parser = cli.ArgumentParser(__doc__, prog='benchmark.py')
  parser.add_argument('--models', type=cli.model_names, default=['RepVGG-A0'],
                      help=f'comma-separated, from: {", ".join(list_models())}')
  parser.add_argument('--batch-sizes', type=cli.positive_ints, default=[1, 8, 32])
  cli.add_dtype(parser)
  cli.add_image_size(parser)
  parser.add_argument('--structures', type=cli.choices(benchmarking.JAX_STRUCTURES),
                      help='JAX graphs, comma-separated from: '
                      f'{", ".join(benchmarking.JAX_STRUCTURES)} (default: train,deploy, and '
                      'on CPU at float32 deploy-winograd4 and, where it compiles, '
                      'deploy-winograd4-native)')
  parser.add_argument('--torch', action='store_true',
                      help='also measure timm\'s models in PyTorch (needs torch and timm)')
  parser.add_argument('--torch-variants', type=cli.choices(tuple(benchmarking.TORCH_VARIANTS)),
                      default=list(benchmarking.TORCH_VARIANTS),
                      help=f'with --torch, from: {", ".join(benchmarking.TORCH_VARIANTS)}')
  parser.add_argument('--onnx-runtimes', type=cli.choices(benchmarking.ONNX_RUNTIMES),
                      default=[], help='also run ONNX graphs of the deploy model (float32, CPU; '
                      'see --onnx-exporters) in these, comma-separated from: '
                      f'{", ".join(benchmarking.ONNX_RUNTIMES)}')
  parser.add_argument('--onnx-exporters', type=cli.choices(benchmarking.ONNX_EXPORTERS),
                      default=['jax'], help='with --onnx-runtimes, where the ONNX graphs come '
                      'from, comma-separated from: jax (this project\'s export), torch (timm\'s '
                      'reparameterized model exported by torch.onnx; needs torch and timm), '
                      'int8 (this project\'s QDQ export of the int8 model, the structure '
                      f'{benchmarking.INT8_STRUCTURE}; rows "<runtime> int8") (default: jax)')
  parser.add_argument('--threads', type=cli.positive_int,
                      help='CPU threads of PyTorch and the ONNX runtimes (default: each '
                      'one\'s own choice)')
  parser.add_argument('--min-calls', type=cli.positive_int, default=10,
                      help='timed calls per measurement, at least (default: 10)')
  parser.add_argument('--min-seconds', type=float, default=3.0,
                      help='timed seconds per measurement, at least (default: 3)')
  parser.add_argument('--json', metavar='FILE', help='write the records as JSON')
  parser.add_argument('--plot', metavar='FILE', help='write a PNG plot')
  parser.add_argument('--default-xla-flags', action='store_true',
                      help='keep XLA:CPU\'s default flags (YNNPACK fusions on)')
  args = parser.parse_args(argv)
  if args.min_seconds < 0:
    parser.error('--min-seconds must be >= 0')
  if args.onnx_runtimes and args.dtype != 'float32':
    parser.error('--onnx-runtimes runs the float32 export: use --dtype float32')
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  # Before any JAX computation: XLA reads its flags once, when the backend starts.
  applied = xla_backend.set_cpu_flags(enable=not args.default_xla_flags)
  if not applied and not args.default_xla_flags:
    print(f'benchmark.py: note: JAX was already running, {xla_backend.CPU_FAST_FLAGS} not '
          'applied', file=sys.stderr)
  if args.torch:
    try:
      import timm  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
      import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError as e:
      return cli.fail('benchmark.py', f'--torch needs torch and timm ({e})')
  if args.plot:
    try:
      import matplotlib  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      return cli.fail('benchmark.py', '--plot needs matplotlib (pip install matplotlib)')
  for path in (args.json, args.plot):
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
      return cli.fail('benchmark.py', f'{path}: no such directory')

  print(f'{benchmarking.device_description()}, XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}',
        file=sys.stderr)
  matmul_rate = benchmarking.matmul_tflops(DTYPES[args.dtype])
  structures = args.structures or benchmarking.default_structures(args.dtype)
  if any(winograd.is_native(benchmarking.conv_impl_of(s)) for s in structures):
    if jax.default_backend() != 'cpu' or args.dtype != 'float32':
      return cli.fail('benchmark.py', 'the deploy-*-native structures run on CPU at float32 '
                      f'only, not on {jax.default_backend()} at {args.dtype}')
    try:
      native.library()
    except native.NativeKernelError as e:
      return cli.fail('benchmark.py', e)
  records = []
  for name in args.models:
    for batch_size in args.batch_sizes:
      candidates = benchmarking.jax_candidates(name, structures, batch_size, args.dtype,
                                        args.image_size)
      if args.torch:
        candidates += benchmarking.torch_candidates(name, args.torch_variants, batch_size,
                                                    args.dtype, args.image_size,
                                                    threads=args.threads)
      if args.onnx_runtimes:
        candidates += benchmarking.onnx_candidates(name, args.onnx_runtimes, batch_size,
                                                   args.image_size, threads=args.threads,
                                                   exporters=args.onnx_exporters)
      records += benchmarking.measure(candidates, batch_size, args.dtype, args.image_size,
                               args.min_calls, args.min_seconds)
  # The best of two matmul measurements, before and after: other load only slows it.
  matmul_rate = max(matmul_rate, benchmarking.matmul_tflops(DTYPES[args.dtype]))
  print(f'dense {args.dtype} matmul: {matmul_rate:.3f} TFLOP/s', file=sys.stderr)
  for r in records:
    r.matmul_fraction = r.achieved_tflops / matmul_rate
  print(benchmarking.markdown_table(records))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump([dict(dataclasses.asdict(r), matmul_tflops=matmul_rate,
                      xla_flags=os.environ.get('XLA_FLAGS', '')) for r in records], f,
                indent=1)
  if args.plot:
    benchmarking.plot(records, args.plot)
  return 0


if __name__ == '__main__':
  sys.exit(main())
