"""Convert RepVGG checkpoints: training run -> verified deploy checkpoint (and a portable
jax.export artifact), PyTorch weights -> Flax variables, and Flax -> PyTorch.

  # Training run -> deploy variables directory (+ model.jax_export with --export):
  python convert.py --workdir runs/a0 --output deploy/a0 [--step N] [--export stablehlo]
  # PyTorch state dict (official or timm names, .pth or .safetensors) -> variables:
  python convert.py --from-torch RepVGG-A0-train.pth --model RepVGG-A0 --output a0_torch
  # Training run or variables directory -> PyTorch state dict:
  python convert.py --to-torch a0.pth --workdir runs/a0 [--naming official|timm]
  python convert.py --to-torch a0.safetensors --from-variables a0_torch

Errors (a missing, unreadable or mismatched checkpoint, an existing output without
--overwrite, a deploy model that does not reproduce the training-time model within 1e-5)
print one line and exit with status 1, leaving nothing written.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from repvgg_jax import convolution, export
from repvgg_jax.checkpoint import CheckpointError
from repvgg_jax.variants import list_models


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split('\n\n', 1)[1])
  source = parser.add_argument_group('source (one of)')
  source.add_argument('--workdir', help='a training run of train.py (run.json, checkpoints/)')
  source.add_argument('--from-torch', metavar='FILE',
                      help='a PyTorch RepVGG state dict (.pth/.pt/.safetensors)')
  source.add_argument('--from-variables', metavar='DIR',
                      help='a variables directory (with --to-torch)')
  parser.add_argument('--output', metavar='DIR', help='the variables directory to write')
  parser.add_argument('--to-torch', metavar='FILE',
                      help='write a PyTorch state dict (.pth/.pt or .safetensors) instead')
  parser.add_argument('--naming', choices=('official', 'timm'), default='official',
                      help='PyTorch key names for --to-torch (default: official)')
  parser.add_argument('--step', type=int, help='checkpoint step of --workdir (default: latest)')
  parser.add_argument('--model', choices=list_models(), metavar='NAME',
                      help='the model: required with --from-torch; with --workdir, the '
                      'model the run must be of')
  parser.add_argument('--image-size', type=int, default=224,
                      help='input size recorded for --from-torch (default: 224)')
  parser.add_argument('--export', choices=export.EXPORT_FORMATS,
                      help='also write a jax.export artifact of the deploy model '
                      f'({export.EXPORT_FILE}, symbolic batch size)')
  parser.add_argument('--conv', choices=('auto',) + convolution.CONV_IMPLS, default='auto',
                      help='3x3 conv of the exported deploy model: XLA\'s, matmuls for '
                      'maps of <= 4 pixels (patches), or Winograd for the stride-1 layers '
                      '(checked against the 1e-5 bar too); auto (default): winograd4 for '
                      'a CPU-only export, xla otherwise')
  parser.add_argument('--platforms', default=','.join(export.EXPORT_PLATFORMS),
                      help='platforms lowered into the export (default: %(default)s)')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing output')
  args = parser.parse_args(argv)

  sources = [name for name in ('workdir', 'from_torch', 'from_variables')
             if getattr(args, name) is not None]
  if len(sources) != 1:
    parser.error('give exactly one of --workdir, --from-torch, --from-variables')
  if args.to_torch:
    if args.from_torch:
      parser.error('--to-torch reads --workdir or --from-variables, not --from-torch')
    if args.output or args.export:
      parser.error('--to-torch writes only the state dict: drop --output/--export')
  else:
    if args.from_variables:
      parser.error('--from-variables is a source for --to-torch only')
    if not args.output:
      parser.error('--output DIR is required')
    if args.from_torch and not args.model:
      parser.error(f'--from-torch needs --model (one of {", ".join(list_models())})')
  unknown = set(args.platforms.split(',')) - set(export.KNOWN_PLATFORMS)
  if unknown or not args.platforms:
    parser.error(f'--platforms {args.platforms!r}: comma-separated, from '
                 f'{", ".join(export.KNOWN_PLATFORMS)}')
  if args.step is not None and not args.workdir:
    parser.error('--step applies to --workdir only')
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  try:
    if args.to_torch:
      export.export_torch(args.to_torch, args.naming, workdir=args.workdir,
                          variables_dir=args.from_variables, step=args.step)
    elif args.from_torch:
      export.import_torch(args.from_torch, args.model, args.output, args.image_size,
                          args.overwrite)
    else:
      platforms = args.platforms.split(',')
      conv_impl = args.conv
      if conv_impl == 'auto':
        conv_impl = (convolution.default_conv_impl(platforms[0])
                     if args.export and len(platforms) == 1 else 'xla')
      export.convert_training_run(
          args.workdir, args.output, step=args.step, model=args.model, export=args.export,
          conv_impl=conv_impl, overwrite=args.overwrite, platforms=platforms)
  except (CheckpointError, export.ConversionError, ValueError, OSError) as e:
    print(f'convert.py: error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
