"""Int8 post-training quantization of a training run's deploy model, on the run's own data:
calibration on its first training batches, then agreement with the float model on its
evaluation split (``convert.py deploy --quantize int8`` and
``tools/quantization_accuracy.py`` use it).

Calibration images are the first ``batches`` training batches of the run's own pipeline
(its dataset, seed, global batch size and augmentation: the images the model was trained
on, as PTQ wants), normalized as the run was. The evaluation split has never been seen by
the calibration, so the agreement measured on it is the int8 model's, not the
calibration's.

    run_data = RunData.of_run(run)                   # run.json's metadata
    ranges = quantization.calibrate(deploy, variables, run_data.calibration_images(8),
                                    'percentile')
    int8 = quantization.quantize(deploy, variables, ranges)
    report = compare(predictor(deploy.apply, variables),
                     {'int8': predictor(quantization.quantized_model(deploy).apply, int8)},
                     run_data.eval_batches())
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax import data
from repvgg_jax.variants import IMAGENET_MEAN, IMAGENET_STD

Tree = Any


class CalibrationDataError(ValueError):
  """The data to calibrate or verify on cannot be read or does not fit the model; the
  message is one line naming the dataset."""


@dataclasses.dataclass(frozen=True)
class RunData:
  """The data of a training run, as its config read it."""
  dataset: str
  data_dir: Optional[str]
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  train_image_size: int
  eval_image_size: int
  crop_fraction: float
  batch_size: int
  eval_batch_size: int
  seed: int
  augment: str
  min_crop_scale: float

  @classmethod
  def of_run(cls, run: Mapping[str, Any], dataset: Optional[str] = None,
             data_dir: Optional[str] = None) -> 'RunData':
    """The data of the run whose ``run.json`` is ``run``; ``dataset``/``data_dir``
    replace the run's (the same data moved, say). Raises ``CalibrationDataError`` when
    the dataset cannot be read or its classes or channels are not the model's."""
    config = run.get('config') or {}
    dataset = dataset or run.get('dataset') or config.get('dataset')
    if not dataset:
      raise CalibrationDataError('the run\'s run.json names no dataset: give the data to '
                                 'calibrate on, e.g. --calibration-dataset '
                                 'folder:/data/imagenet')
    data_dir = data_dir or config.get('data_dir') or None
    mean = tuple(run.get('mean', IMAGENET_MEAN))
    try:
      info = data.dataset_info(dataset, data_dir)
    except (ValueError, OSError, ImportError) as e:
      raise CalibrationDataError(f'calibration data {dataset!r}: '
                                 f'{(str(e).splitlines() or [type(e).__name__])[0]}') from None
    if info.num_classes != int(run['num_classes']) or info.channels != len(mean):
      raise CalibrationDataError(
          f'calibration data {dataset!r} has {info.num_classes} classes of '
          f'{info.channels}-channel images; the model takes {len(mean)}-channel images '
          f'and has {run["num_classes"]} classes')
    image_size = int(run['image_size'])  # the evaluation (deploy) size
    batch_size = int(config.get('batch_size', 256))
    return cls(dataset, data_dir, info.num_classes, mean,
               tuple(run.get('std', IMAGENET_STD)),
               int(config.get('image_size', image_size)), image_size,
               float(config.get('crop_fraction', 0.875)), batch_size,
               int(config.get('eval_batch_size') or batch_size), int(config.get('seed', 0)),
               config.get('augment', 'simple'), float(config.get('min_crop_scale', 0.08)))

  def calibration_images(self, batches: int) -> list[np.ndarray]:
    """The images of the run's first ``batches`` training batches."""
    stream = data.train_batches(
        self.dataset, global_batch_size=self.batch_size, image_size=self.train_image_size,
        seed=self.seed, data_dir=self.data_dir, augment=self.augment,
        min_crop_scale=self.min_crop_scale, mean=self.mean, std=self.std)
    try:
      return [next(stream)['image'] for _ in range(batches)]
    finally:
      stream.close()  # the prefetch thread and any decoding workers

  def eval_batches(self) -> Iterator[data.Batch]:
    """The evaluation split once, preprocessed as the run evaluated it (padded batches
    with ``mask``)."""
    return data.eval_batches(
        self.dataset, global_batch_size=self.eval_batch_size,
        image_size=self.eval_image_size, data_dir=self.data_dir,
        crop_fraction=self.crop_fraction, mean=self.mean, std=self.std)


def compare(reference: Callable[[jax.Array], jax.Array],
            candidates: Mapping[str, Callable[[jax.Array], jax.Array]],
            batches: Iterator[data.Batch], max_batches: Optional[int] = None
            ) -> dict[str, Any]:
  """Each candidate model against the float ``reference`` (functions of the images, to
  logits) on ``batches`` (the first ``max_batches`` of them; all by default): the share
  of images whose top-1 class is the reference's (``agreement``), the relative L2 error
  of the logits over all images (``logits_relative_error``), and the top-1 accuracy of
  each model (``top1``, ``'float'`` for the reference)."""
  names = ['float', *candidates]
  correct = dict.fromkeys(names, 0)
  agree = dict.fromkeys(candidates, 0)
  squared_error = dict.fromkeys(candidates, 0.0)
  squared_norm, count = 0.0, 0
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    mask = np.asarray(batch['mask'], bool)
    labels = np.asarray(batch['label'])[mask]
    expected = np.asarray(reference(batch['image']), np.float64)[mask]
    squared_norm += float(np.sum(expected ** 2))
    correct['float'] += int(np.sum(expected.argmax(-1) == labels))
    for name, model in candidates.items():
      logits = np.asarray(model(batch['image']), np.float64)[mask]
      squared_error[name] += float(np.sum((logits - expected) ** 2))
      agree[name] += int(np.sum(logits.argmax(-1) == expected.argmax(-1)))
      correct[name] += int(np.sum(logits.argmax(-1) == labels))
    count += int(mask.sum())
  if not count:
    raise CalibrationDataError('the evaluation split is empty: nothing to verify on')
  return {'images': count,
          'top1': {name: correct[name] / count for name in names},
          'agreement': {name: agree[name] / count for name in candidates},
          'logits_relative_error': {
              name: float(np.sqrt(squared_error[name] / max(squared_norm, 1e-30)))
              for name in candidates}}


def predictor(apply: Callable[..., jax.Array], variables: Tree
              ) -> Callable[[jax.Array], jax.Array]:
  """``apply(variables, images)`` (a module's ``apply``) jitted, ``variables`` bound (put
  on the device once)."""
  variables = jax.device_put(jax.tree_util.tree_map(jnp.asarray, variables))
  apply = jax.jit(apply)
  return lambda images: apply(variables, images)
