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

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import repvgg_jax as rv  # noqa: E402
from repvgg_jax import checkpoint, cli, data, quantization  # noqa: E402
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
  parser.add_argument('--keep-float', default=','.join(quantization.KEEP_FLOAT),
                      help='comma-separated top-level modules kept in float '
                           f'(default: {",".join(quantization.KEEP_FLOAT)}; "" for none)')
  parser.add_argument('--json', metavar='FILE', help='also write the results here')
  args = parser.parse_args(argv)
  try:
    results = evaluate_run(args.workdir, args.methods, args.calibration_batches,
                           args.percentile, [m for m in args.keep_float.split(',') if m])
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
  config = checkpoint.read_json(os.path.join(workdir, checkpoint.RUN_METADATA))['config']
  model = rv.create_model(metadata['model'], metadata['num_classes'], deploy=True)
  # The float reference computes the same function with the run's conv_impl ('patches' is
  # several times faster on CPU at 32x32); qwix's int8 model needs XLA's convolutions.
  float_model = rv.create_model(metadata['model'], metadata['num_classes'], deploy=True,
                                conv_impl=config['conv_impl'])
  data = dict(image_size=config['image_size'], data_dir=config['data_dir'] or None)
  train = data.train_batches(
      config['dataset'], global_batch_size=config['batch_size'], seed=config['seed'],
      augment=config['augment'], min_crop_scale=config['min_crop_scale'], **data)
  calibration = [next(train)['image'] for _ in range(calibration_batches)]

  start = time.perf_counter()
  predictors = {'float': jax.jit(float_model.apply)}
  int8_variables = {'float': variables}
  ranges = {}
  for method in methods:
    ranges[method] = quantization.calibrate(model, variables, calibration, method, percentile)
    int8_variables[method] = quantization.quantize(model, variables, ranges[method],
                                                   keep_float)
    predictors[method] = jax.jit(quantization.quantized_model(model, keep_float).apply)
  calibration_seconds = time.perf_counter() - start

  correct = {k: 0 for k in predictors}
  agree = {k: 0 for k in predictors}
  count = 0
  for batch in data.eval_batches(
      config['dataset'], global_batch_size=config['eval_batch_size'] or config['batch_size'],
      crop_fraction=config['crop_fraction'], **data):
    mask = np.asarray(batch['mask'], bool)
    predictions = {k: np.asarray(jnp.argmax(f(int8_variables[k], batch['image']), -1))[mask]
                   for k, f in predictors.items()}
    labels = np.asarray(batch['label'])[mask]
    for k, p in predictions.items():
      correct[k] += int(np.sum(p == labels))
      agree[k] += int(np.sum(p == predictions['float']))
    count += int(mask.sum())
  return {
      'workdir': os.path.abspath(workdir), 'model': metadata['model'],
      'block': config.get('block', 'repvgg'), 'test_images': count,
      'calibration': {'batches': calibration_batches, 'images': sum(len(b) for b in calibration),
                      'percentile': percentile, 'keep_float': keep_float,
                      'seconds': round(calibration_seconds, 1)},
      'accuracy': {k: correct[k] / count for k in predictors},
      'agreement_with_float': {k: agree[k] / count for k in methods},
      'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
  }


if __name__ == '__main__':
  sys.exit(main())
