"""Evaluation of RepVGG weights on a dataset: top-1, top-5, loss and speed.

The library of ``evaluate.py`` (timm's ``validate.py`` is the model) and of the trainer's
evaluations. Weights come from a PyTorch file (the authors' or timm's, official or timm
naming, training-time or deploy), a training run of ``train.py`` or a variables directory
of ``convert.py``; each brings the preprocessing it was trained or published with
(``Weights``): the published weights' table (``variants.Variant.eval_preprocessing``), the
run's own config, or the directory's metadata. The evaluation covers every example of the
split once, over all local devices and processes (pad and mask).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np

from repvgg_jax import checkpoint, convolution, data, quantization, torch_io
from repvgg_jax.models import DTYPES, create_model, num_classes_of
from repvgg_jax.reparam import reparameterize
from repvgg_jax.training import compilation, parallel
from repvgg_jax.variants import IMAGENET_MEAN, IMAGENET_STD, get_variant

Tree = Any


class EvaluationError(ValueError):
  """Weights or data that cannot be evaluated; the message is one line for the user."""


def evaluate(p_eval: Callable, variables: Tree, batches: Iterator[dict[str, np.ndarray]],
             devices: int) -> dict[str, float]:
  """Loss, top-1 and top-5 accuracy over every example of ``batches`` with the pmapped
  ``steps.eval_step`` ``p_eval`` (over all processes: the step sums across them), and the
  examples per second after the first batch (which includes compilation)."""
  totals, after_first, start = None, 0.0, None
  for batch in batches:
    sums = p_eval(variables, parallel.shard(batch, devices))
    sums = {k: float(v[0]) for k, v in sums.items()}
    if totals is None:
      totals, start = sums, time.perf_counter()
    else:
      totals = {k: totals[k] + sums[k] for k in totals}
      after_first += sums['count']
  if not totals or not totals['count']:
    raise EvaluationError('the evaluation split is empty')
  return {'loss': totals['loss'] / totals['count'],
          'accuracy': totals['correct'] / totals['count'],
          'top5_accuracy': totals['correct_top5'] / totals['count'],
          'count': int(totals['count']),
          'images_per_second': (after_first / (time.perf_counter() - start)
                                if after_first else float('nan'))}


@dataclasses.dataclass(frozen=True)
class Weights:
  """A model's variables and how its inputs are prepared."""
  model: str
  variables: Tree
  structure: str           # 'train' or 'deploy'
  num_classes: int
  image_size: int
  crop_fraction: float
  mean: tuple[float, ...]  # (pixel - mean) / std, per channel, pixels in [0, 255]
  std: tuple[float, ...]
  source: str
  int8: Optional[dict[str, Any]] = None  # a deploy directory's int8 calibration (convert.py)


def load_weights(model: Optional[str] = None, weights: Optional[str] = None,
                 workdir: Optional[str] = None, step: Optional[int] = None,
                 variables_dir: Optional[str] = None) -> Weights:
  """The weights of exactly one source: ``weights`` (a PyTorch ``.pth``/``.safetensors``
  file of ``model``), ``workdir`` (a training run; its checkpoint at ``step``, the latest
  by default) or ``variables_dir`` (``convert.py``'s output). ``model``, where given with
  a run or a directory, must be theirs."""
  if sum(source is not None for source in (weights, workdir, variables_dir)) != 1:
    raise EvaluationError('give exactly one source of weights: --weights FILE, --workdir '
                          'RUN or --variables DIR')
  if step is not None and workdir is None:
    raise EvaluationError('--step applies to --workdir only')
  if weights is not None:
    if model is None:
      raise EvaluationError('--weights needs --model (the file does not name its model)')
    variables = torch_io.load_torch_weights(weights, model)
    published = get_variant(model).eval_preprocessing
    return Weights(model, variables, 'train' if 'batch_stats' in variables else 'deploy',
                   num_classes_of(variables), published.image_size, published.crop_fraction,
                   IMAGENET_MEAN, IMAGENET_STD, weights)
  if workdir is not None:
    variables, step, metadata = checkpoint.restore_training_variables(workdir, step)
    structure, source = 'train', f'{workdir} step {step}'
  else:
    variables, metadata = checkpoint.load_variables(variables_dir)
    structure, source = metadata.get('structure', 'train'), variables_dir
  if model is not None and metadata.get('model') != model:
    raise EvaluationError(f'{source} holds {metadata.get("model")}, not {model}')
  # A training run's config, or a variables directory's own entry, says how the run
  # evaluated; the variant's published crop only where neither does.
  crop_fraction = metadata.get('crop_fraction', (metadata.get('config') or {}).get(
      'crop_fraction', get_variant(metadata['model']).eval_preprocessing.crop_fraction))
  return Weights(metadata['model'], variables, structure, num_classes_of(variables),
                 int(metadata['image_size']), float(crop_fraction),
                 tuple(metadata.get('mean', IMAGENET_MEAN)),
                 tuple(metadata.get('std', IMAGENET_STD)), source, metadata.get('int8'))


def evaluate_weights(weights: Weights, dataset: str, *, deploy: bool = False,
                     image_size: Optional[int] = None, crop_fraction: Optional[float] = None,
                     batch_size: int = 256, data_dir: Optional[str] = None,
                     conv_impl: str = 'xla', dtype: str = 'float32',
                     skip_unreadable_images: bool = False,
                     float_model: bool = False) -> dict[str, Any]:
  """Evaluate ``weights`` on the evaluation split of ``dataset`` (``repvgg_jax.data``'s
  names) at ``image_size``/``crop_fraction`` (default: the weights' own); ``deploy``
  re-parameterizes training-time weights first (deploy weights are evaluated as they
  are, int8 ones as their int8 model unless ``float_model``); ``skip_unreadable_images``
  leaves an image folder's unreadable files out of the metrics (each logged) instead of
  failing on them. Returns top-1, top-5, loss, the
  number of examples, the number of unreadable files skipped and images/s."""
  deploy = deploy or weights.structure == 'deploy'
  int8 = weights.int8 is not None and not float_model
  if int8 and (conv_impl != 'xla' or dtype != 'float32'):
    raise EvaluationError(f'{weights.source}: an int8 model computes with XLA\'s '
                          f'convolutions around float32; --conv-impl {conv_impl} / --dtype '
                          f'{dtype} do not apply (--float-model evaluates its float model)')
  image_size = image_size or weights.image_size
  crop_fraction = crop_fraction or weights.crop_fraction
  convolution.check_conv_impl(conv_impl, deploy)
  info = data.dataset_info(dataset, data_dir)
  if info.num_classes != weights.num_classes:
    raise EvaluationError(f'{weights.source}: a classifier of {weights.num_classes} classes; '
                          f'{dataset} has {info.num_classes}')
  if info.channels != len(weights.mean):
    raise EvaluationError(f'{weights.source}: takes {len(weights.mean)}-channel images; '
                          f'{dataset} has {info.channels}')
  devices, processes = jax.local_device_count(), jax.process_count()
  if batch_size % (devices * processes):
    raise EvaluationError(f'--batch-size {batch_size} must be a multiple of the '
                          f'{devices * processes} devices')
  variables = weights.variables
  if deploy and weights.structure == 'train':
    variables = jax.device_get(jax.jit(reparameterize)(variables))
  if deploy:
    variables = convolution.transform_kernels(variables, weights.model, conv_impl)
  model = create_model(weights.model, weights.num_classes, deploy=deploy,
                       dtype=DTYPES[dtype], conv_impl=conv_impl)
  if int8:
    model, variables = quantization.int8_model(model, variables, weights.int8)
  p_eval = compilation.pmapped_eval_step(model)
  batches = data.eval_batches(
      dataset, global_batch_size=batch_size, image_size=image_size,
      process_index=jax.process_index(), process_count=processes, data_dir=data_dir,
      crop_fraction=crop_fraction, mean=weights.mean, std=weights.std,
      skip_unreadable_images=skip_unreadable_images)
  result = evaluate(p_eval, parallel.replicate(variables), batches, devices)
  return {'model': weights.model, 'source': weights.source, 'dataset': dataset,
          'structure': 'deploy int8' if int8 else 'deploy' if deploy else 'train',
          'image_size': image_size,
          'crop_fraction': crop_fraction, 'top1': 100 * result['accuracy'],
          'top5': 100 * result['top5_accuracy'], 'loss': result['loss'],
          'count': result['count'],
          # The split covers every example once over all processes: those not counted
          # are the files skipped, in every process.
          'skipped_images': info.num_eval - result['count'],
          'images_per_second': result['images_per_second']}
