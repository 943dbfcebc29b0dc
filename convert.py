"""Convert RepVGG checkpoints: training run -> verified deploy checkpoint (and a portable
jax.export artifact), PyTorch weights -> Flax variables, and Flax -> PyTorch.

  # Training run -> deploy variables directory (+ model.jax_export, model.onnx):
  python convert.py deploy --workdir runs/a0 --output deploy/a0 [--step N] \
      [--export stablehlo,onnx]
  # ... and its int8 model, calibrated on the run's first 8 training batches and compared
  # with the float model on the run's evaluation split:
  python convert.py deploy --workdir runs/a0 --output deploy/a0_int8 --quantize int8 \
      [--calibration-batches 8] [--calibration-method percentile] [--min-agreement 0.98] \
      [--export stablehlo,onnx]
  # PyTorch state dict (official or timm names, .pth or .safetensors) -> variables:
  python convert.py from-torch RepVGG-A0-train.pth --model RepVGG-A0 --output a0_torch
  # Training run or variables directory -> PyTorch state dict:
  python convert.py to-torch a0.pth --workdir runs/a0 [--naming official|timm]
  python convert.py to-torch a0.safetensors --variables a0_torch

The spellings from before the subcommands still work: ``--workdir RUN --output DIR``
(deploy), ``--from-torch FILE ...`` and ``--to-torch FILE ... [--from-variables DIR]``.
Errors (a missing, unreadable or mismatched checkpoint, an existing output without
--overwrite, a deploy model that does not reproduce the training-time model within 1e-5,
calibration data that cannot be read or does not fit the model, an int8 model agreeing
with the float one on fewer eval images than --min-agreement) print one line and exit with
status 1, leaving nothing written.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from repvgg_jax import (calibration, checkpoint, cli, conversion, convolution, native,
                        quantization, torch_io)
from repvgg_jax.variants import list_models

COMMANDS = ('deploy', 'from-torch', 'to-torch')
# The flags that named the mode before the subcommands, and the subcommand each is now.
LEGACY_MODES = {'--from-torch': 'from-torch', '--to-torch': 'to-torch'}


def _with_subcommand(argv: list[str]) -> list[str]:
  """The pre-subcommand spellings as subcommands: ``--from-torch FILE ...`` ->
  ``from-torch FILE ...``, ``--to-torch FILE ...`` -> ``to-torch FILE ...`` (with
  ``--from-variables`` -> ``--variables``), anything else -> ``deploy ...``."""
  if not argv or argv[0] in COMMANDS or argv[0] in ('-h', '--help'):
    return argv
  for i, arg in enumerate(argv):
    flag, sep, value = arg.partition('=')
    if flag in LEGACY_MODES:
      file = [value] if sep else argv[i + 1:i + 2]
      rest = argv[:i] + argv[i + (1 if sep else 2):]
      rest = ['--variables' if a == '--from-variables' else a for a in rest]
      return [LEGACY_MODES[flag], *file, *rest]
  return ['deploy', *argv]


def parse_args(argv: Optional[Sequence[str]] = None):
  parser = cli.ArgumentParser(__doc__, prog='convert.py')
  commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

  deploy = commands.add_parser('deploy', help='training run -> verified deploy checkpoint')
  cli.add_workdir(deploy, required=True)
  cli.add_step(deploy)
  deploy.add_argument('--output', required=True, metavar='DIR',
                      help='the variables directory to write')
  cli.add_model(deploy, help='the model the run must be of (default: any)')
  deploy.add_argument('--export', type=cli.choices(conversion.EXPORT_FORMATS), default=[],
                      help='also write, comma-separated: stablehlo (a jax.export artifact, '
                      f'{conversion.EXPORT_FILE}, symbolic batch size), onnx '
                      f'({conversion.ONNX_FILE}, NCHW, opset 17, checked in onnxruntime)')
  cli.add_conv_impl(deploy, ('auto',) + convolution.CONV_IMPLS, default='auto',
                    extra_names=('--conv',),
                    help='3x3 conv of the exported deploy model: XLA\'s, matmuls for maps '
                    'of <= 4 pixels (patches), or Winograd for the stride-1 layers (checked '
                    'against the 1e-5 bar too; a -native one not with --export stablehlo); auto '
                    '(default): winograd4 for a CPU-only export, xla otherwise')
  deploy.add_argument('--platforms', type=cli.choices(conversion.KNOWN_PLATFORMS),
                      default=list(conversion.EXPORT_PLATFORMS),
                      help='platforms lowered into the export, comma-separated (default: '
                      f'{",".join(conversion.EXPORT_PLATFORMS)})')
  cli.add_overwrite(deploy)
  int8 = deploy.add_argument_group('int8 post-training quantization')
  int8.add_argument('--quantize', choices=('int8',),
                    help='also quantize the deploy model: int8 weights per output channel, '
                    'int8 inputs of static range (exports are then the int8 model\'s)')
  int8.add_argument('--calibration-batches', type=cli.positive_int, default=8,
                    help='the run\'s first training batches to calibrate on (default: 8)')
  int8.add_argument('--calibration-method', choices=quantization.METHODS,
                    default='percentile', help='the clipping range of each layer\'s input '
                    '(default: percentile)')
  int8.add_argument('--percentile', type=float, default=99.99,
                    help='of |x|, for --calibration-method percentile (default: 99.99)')
  cli.add_keep_float(int8)
  int8.add_argument('--calibration-dataset', metavar='DATASET',
                    help='the data to calibrate and verify on (default: the run\'s)')
  int8.add_argument('--data-dir', metavar='DIR', help='its TFDS data_dir (default: the run\'s)')
  int8.add_argument('--agreement-batches', type=cli.positive_int,
                    help='evaluation batches to compare int8 and float on (default: all)')
  int8.add_argument('--min-agreement', type=float, default=0.0,
                    help='write nothing when int8 and float agree on fewer evaluation images '
                    '(a share in [0, 1]; default: 0, report only)')

  from_torch = commands.add_parser('from-torch', help='PyTorch state dict -> variables')
  from_torch.add_argument('file', help='a PyTorch RepVGG state dict (.pth/.pt/.safetensors)')
  cli.add_model(from_torch)
  from_torch.add_argument('--output', required=True, metavar='DIR',
                          help='the variables directory to write')
  cli.add_image_size(from_torch, help='input size recorded in the metadata (default: 224)')
  cli.add_overwrite(from_torch)

  to_torch = commands.add_parser('to-torch', help='run or variables -> PyTorch state dict')
  to_torch.add_argument('file', help='the state dict to write (.pth/.pt or .safetensors)')
  source = to_torch.add_mutually_exclusive_group(required=True)
  cli.add_workdir(source)
  source.add_argument('--variables', metavar='DIR', help='a variables directory')
  cli.add_step(to_torch)
  to_torch.add_argument('--naming', choices=torch_io.NAMINGS, default='official',
                        help='PyTorch key names (default: official)')

  args = parser.parse_args(_with_subcommand(list(sys.argv[1:] if argv is None else argv)))
  if args.command == 'from-torch' and not args.model:
    parser.error(f'--from-torch needs --model (one of {", ".join(list_models())})')
  if args.command == 'to-torch' and args.step is not None and not args.workdir:
    parser.error('--step applies to --workdir only')
  if args.command == 'deploy':
    if not 0 <= args.min_agreement <= 1:
      parser.error(f'--min-agreement {args.min_agreement}: a share in [0, 1]')
    if not 0 < args.percentile <= 100:
      parser.error(f'--percentile {args.percentile}: must be in (0, 100]')
    given = [f for f, v in (('--calibration-dataset', args.calibration_dataset),
                            ('--data-dir', args.data_dir),
                            ('--agreement-batches', args.agreement_batches)) if v is not None]
    if given and not args.quantize:
      parser.error(f'{given[0]} applies to --quantize int8 only')
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  try:
    if args.command == 'to-torch':
      conversion.export_torch(args.file, args.naming, workdir=args.workdir,
                              variables_dir=args.variables, step=args.step)
    elif args.command == 'from-torch':
      conversion.import_torch(args.file, args.model, args.output, args.image_size,
                              args.overwrite)
    else:
      conv_impl = args.conv_impl
      if conv_impl == 'auto':
        conv_impl = (convolution.default_conv_impl(args.platforms[0], portable=True)
                     if 'stablehlo' in args.export and len(args.platforms) == 1
                     and not args.quantize else 'xla')
      int8 = None if not args.quantize else conversion.Int8Options(
          args.calibration_batches, args.calibration_method, args.percentile,
          tuple(args.keep_float), args.calibration_dataset, args.data_dir,
          args.agreement_batches, args.min_agreement)
      conversion.convert_training_run(
          args.workdir, args.output, step=args.step, model=args.model, export=args.export,
          conv_impl=conv_impl, overwrite=args.overwrite, platforms=args.platforms, int8=int8)
  except (checkpoint.CheckpointError, conversion.ConversionError,
          calibration.CalibrationDataError, native.NativeKernelError, ValueError,
          OSError) as e:
    return cli.fail('convert.py', e)
  return 0


if __name__ == '__main__':
  sys.exit(main())
