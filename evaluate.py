"""Evaluate RepVGG weights on a dataset: top-1, top-5, loss and images/s.

  # The published weights (the authors' or timm's file), with their own preprocessing:
  python evaluate.py --model RepVGG-A0 --weights RepVGG-A0-train.pth \\
      --dataset folder:/data/imagenet [--deploy]
  # A training run's checkpoint (the latest, or --step N), or a variables directory:
  python evaluate.py --workdir runs/a0 --dataset fashion_mnist
  python evaluate.py --variables deploy/a0 --dataset imagenet2012 --data-dir ~/tensorflow_datasets

The preprocessing defaults to the weights' own: for published weights the size and crop
fraction their top-1 was measured with (A/B: 224 at 0.875; D2se, L2pse: 320 at 1.0), for a
run or a variables directory those it was trained and evaluated with; --image-size and
--crop-fraction override them. An int8 deploy directory (convert.py deploy --quantize int8)
is evaluated as its int8 model, --float-model as its float one. --deploy evaluates the
re-parameterized model of training-time weights (deploy weights always run as the deploy
model). An image folder's file that cannot be read is an error naming it;
--skip-unreadable-images leaves such files out of the metrics instead (each is logged, and
their number printed). All local devices are used; over several hosts, start one process
per host with --coordinator-address, --num-processes and --process-id, as train.py. Prints
a Markdown table; --json FILE writes the result. Errors print one line and exit with
status 1.
"""

from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

from repvgg_jax import checkpoint, cli, evaluation, native, xla_backend
from repvgg_jax.training import parallel


def parse_args(argv: Optional[Sequence[str]] = None):
  parser = cli.ArgumentParser(__doc__, prog='evaluate.py')
  source = parser.add_argument_group('weights (one of)')
  source.add_argument('--weights', metavar='FILE',
                      help='a PyTorch state dict (.pth/.pt/.safetensors) of --model')
  cli.add_workdir(source)
  source.add_argument('--variables', metavar='DIR', help='a variables directory (convert.py)')
  cli.add_model(parser, help='the model: required with --weights; with a run or a '
                'directory, the model it must hold')
  cli.add_step(parser)
  parser.add_argument('--dataset', required=True,
                      help="'imagenet2012', 'folder:/path/to/root' (root/val/<class>/*), "
                      "'fashion_mnist' or 'tfds:<name>'")
  parser.add_argument('--data-dir', metavar='DIR', help='the TFDS data_dir')
  parser.add_argument('--deploy', action='store_true',
                      help='evaluate the re-parameterized (deploy) model')
  parser.add_argument('--image-size', type=cli.image_size,
                      help='evaluation size (default: the weights\' own)')
  parser.add_argument('--crop-fraction', type=float,
                      help='centre crop of the resized image (default: the weights\' own)')
  parser.add_argument('--skip-unreadable-images', action='store_true',
                      help='leave an image folder\'s unreadable files out of the metrics '
                      '(logged, counted) instead of failing on the first')
  parser.add_argument('--float-model', action='store_true',
                      help='evaluate an int8 deploy directory\'s float model (by default its '
                      'int8 model: convert.py deploy --quantize int8)')
  parser.add_argument('--batch-size', type=cli.positive_int, default=256,
                      help='global evaluation batch, a multiple of the devices (default: 256)')
  cli.add_conv_impl(parser, help='how the convolutions are computed (repvgg_jax.convolution;'
                    ' default: xla; Winograd, XLA graph or native CPU kernel, for the '
                    'deploy model only)')
  cli.add_dtype(parser)
  parser.add_argument('--json', metavar='FILE', help='write the result as JSON')
  parser.add_argument('--coordinator-address', metavar='HOST:PORT',
                      help='process 0\'s address, for evaluating over several processes')
  parser.add_argument('--num-processes', type=cli.positive_int)
  parser.add_argument('--process-id', type=int)
  args = parser.parse_args(argv)
  if args.crop_fraction is not None and not 0 < args.crop_fraction <= 1:
    parser.error(f'--crop-fraction {args.crop_fraction}: must be in (0, 1]')
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  xla_backend.set_cpu_flags()
  try:
    parallel.initialize_distributed(args.coordinator_address, args.num_processes,
                                    args.process_id)
    weights = evaluation.load_weights(args.model, args.weights, args.workdir, args.step,
                                      args.variables)
    result = evaluation.evaluate_weights(
        weights, args.dataset, deploy=args.deploy, image_size=args.image_size,
        crop_fraction=args.crop_fraction, batch_size=args.batch_size, data_dir=args.data_dir,
        conv_impl=args.conv_impl, dtype=args.dtype,
        skip_unreadable_images=args.skip_unreadable_images, float_model=args.float_model)
  except (checkpoint.CheckpointError, native.NativeKernelError, ValueError, OSError) as e:
    return cli.fail('evaluate.py', e)
  print(f'| model | weights | structure | dataset | size | crop | top-1 | top-5 | loss | '
        f'images/s |\n|---|---|---|---|---|---|---|---|---|---|\n'
        f'| {result["model"]} | {result["source"]} | {result["structure"]} | '
        f'{result["dataset"]} | {result["image_size"]} | {result["crop_fraction"]} | '
        f'{result["top1"]:.2f} | {result["top5"]:.2f} | {result["loss"]:.4f} | '
        f'{result["images_per_second"]:.1f} |')
  if result['skipped_images']:
    print(f'{result["skipped_images"]} unreadable images skipped: not in the metrics (the '
          'log names them)')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
