"""Test accuracy of a training run's deploy model in float and after int8 post-training
quantization (repvgg_jax.quantization).

    python tools/quantization_accuracy.py --workdir runs/fashion_mnist_a0 \
        [--methods absmax,percentile] [--calibration-batches 8] [--percentile 99.99] \
        [--keep-float stage0,linear] [--json results.json]

Loads the deploy variables train.py saved (<workdir>/deploy) and the run's config
(<workdir>/run.json); calibrates the input ranges of every conv and linear layer on the
first N training batches of the run's own pipeline (its seed, batch size and
augmentation), quantizes, and evaluates the float and each int8 model on the whole test
split: accuracy, and the share of test images whose int8 prediction is the float one.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import repvgg_jax as rv  # noqa: E402
from repvgg_jax import calibration, checkpoint, cli, quantization  # noqa: E402
from repvgg_jax.training.trainer import DEPLOY_DIR  # noqa: E402


def main(argv=None) -> int:
  parser = cli.ArgumentParser(__doc__)
  cli.add_workdir(parser, required=True)
  parser.add_argument('--methods', type=cli.choices(quantization.METHODS),
                      default=['absmax', 'percentile'],
                      help='comma-separated calibration methods (default: absmax,percentile)')
  parser.add_argument('--calibration-batches', type=cli.positive_int, default=8,
                      help='training batches to calibrate on (default: 8)')
  parser.add_argument('--percentile', type=float, default=99.99,
                      help="of |x|, for the 'percentile' method (default: 99.99)")
  cli.add_keep_float(parser)
  parser.add_argument('--json', metavar='FILE', help='also write the results here')
  args = parser.parse_args(argv)
  try:
    results = evaluate_run(args.workdir, args.methods, args.calibration_batches,
                           args.percentile, args.keep_float)
  except (ValueError, checkpoint.CheckpointError, OSError) as e:
    return cli.fail(parser.prog, e)
  print(json.dumps(results, indent=2))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)
  return 0


def evaluate_run(workdir: str, methods: list[str], calibration_batches: int,
                 percentile: float, keep_float: list[str]) -> dict:
  """Float and int8 test accuracy of the run in ``workdir`` (see the module docstring)."""
  variables, metadata = checkpoint.load_variables(os.path.join(workdir, DEPLOY_DIR))
  run = checkpoint.read_json(os.path.join(workdir, checkpoint.RUN_METADATA))
  run_data = calibration.RunData.of_run(run)
  model = rv.create_model(metadata['model'], metadata['num_classes'], deploy=True)
  # The float reference computes the same function with the run's conv_impl ('patches' is
  # several times faster on CPU at 32x32); qwix's int8 model needs XLA's convolutions.
  float_model = rv.create_model(metadata['model'], metadata['num_classes'], deploy=True,
                                conv_impl=run['config']['conv_impl'])
  images = run_data.calibration_images(calibration_batches)

  start = time.perf_counter()
  int8_models, ranges = {}, {}
  for method in methods:
    ranges[method] = quantization.calibrate(model, variables, images, method, percentile)
    int8_models[method] = calibration.predictor(
        quantization.quantized_model(model, keep_float).apply,
        quantization.quantize(model, variables, ranges[method], keep_float))
  calibration_seconds = time.perf_counter() - start
  report = calibration.compare(calibration.predictor(float_model.apply, variables),
                               int8_models, run_data.eval_batches())
  return {
      'workdir': os.path.abspath(workdir), 'model': metadata['model'],
      'block': run['config'].get('block', 'repvgg'), 'test_images': report['images'],
      'calibration': {'batches': calibration_batches, 'images': sum(len(b) for b in images),
                      'percentile': percentile, 'keep_float': keep_float,
                      'seconds': round(calibration_seconds, 1)},
      'accuracy': report['top1'], 'agreement_with_float': report['agreement'],
      'logits_relative_error': report['logits_relative_error'],
      'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
  }


if __name__ == '__main__':
  sys.exit(main())
