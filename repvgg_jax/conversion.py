"""Conversions between checkpoint forms, each verified: training run -> deploy checkpoint
(and a portable export), PyTorch <-> Flax variables; ``convert.py`` is their command line.

``convert_training_run`` is what ``convert.py deploy`` does: read a training checkpoint,
``reparameterize`` it, check on random input that the deploy model reproduces the
training-time model's eval output, and only then write a variables directory (see
``checkpoint.py``) with ``structure: 'deploy'`` and, optionally, a ``jax.export``
artifact (``model.jax_export``): the deploy forward pass with its weights embedded and a
symbolic batch dimension, which runs with nothing but jax::

    exported = jax.export.deserialize(open('OUT/model.jax_export', 'rb').read())
    logits = exported.call(images)  # [N, H, W, 3] float32, normalized as in model.json

With ``int8=Int8Options(...)`` (``convert.py deploy --quantize int8``) the deploy model is
also quantized after training (``quantization``): calibrated on the run's first training
batches, compared with the float deploy model on the run's evaluation split (top-1
agreement, logits error, both top-1 accuracies), and written as the float deploy variables
plus the calibrated input ranges (``model.json``'s ``int8``), from which
``quantization.quantize`` makes the int8 model deterministically, as ``load_deploy`` does
(a TensorRT calibration cache beside an ONNX model is the same idea). The exports are then
the int8 model's: stablehlo with its int8 convolutions, ONNX as a QDQ graph.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax import (calibration, checkpoint, convolution, onnx_export, quantization, torch_io,
                        winograd)
from repvgg_jax.equivalence import TOLERANCE, relative_error
from repvgg_jax.models import check_variables, create_model, exact_forward, num_classes_of
from repvgg_jax.reparam import reparameterize
from repvgg_jax.variants import get_variant

EXPORT_FILE = 'model.jax_export'
ONNX_FILE = 'model.onnx'
EXPORT_FORMATS = ('stablehlo', 'onnx')
# Calibration images an int8 ONNX export is checked on (at batch sizes 1 and 3).
VERIFY_IMAGES = 3
# Platforms lowered into the export by default: one artifact for all of them.
EXPORT_PLATFORMS = ('cpu', 'cuda', 'tpu')
KNOWN_PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')


class ConversionError(ValueError):
  """The deploy model does not reproduce the training-time model (or its int8 model
  agrees with it less than asked)."""


@dataclasses.dataclass(frozen=True)
class Int8Options:
  """How ``convert_training_run`` quantizes the deploy model to int8.

  Attributes:
    calibration_batches: the run's first training batches to calibrate on.
    method: of ``quantization.METHODS``; 'percentile' (the default here) kept plain
      RepVGG's Fashion-MNIST accuracy best (docs/benchmarks.md, int8).
    percentile: of |x|, for 'percentile'.
    keep_float: top-level modules left in float (``quantization.KEEP_FLOAT``).
    dataset, data_dir: the data to calibrate and verify on (default: the run's).
    agreement_batches: evaluation batches to compare on (default: the whole split).
    min_agreement: refuse (write nothing) when int8 and float agree on fewer eval images.
  """
  calibration_batches: int = 8
  method: str = 'percentile'
  percentile: float = 99.99
  keep_float: tuple[str, ...] = quantization.KEEP_FLOAT
  dataset: Optional[str] = None
  data_dir: Optional[str] = None
  agreement_batches: Optional[int] = None
  min_agreement: float = 0.0


def check_structure(variables: Any, model: str, num_classes: int, deploy: bool,
                    where: str, channels: int = 3, block: str = 'repvgg') -> None:
  """Raise CheckpointError (``where`` first) naming the leaves that do not fit the model
  (``models.check_variables``): a checkpoint of another model, say."""
  try:
    check_variables(variables, model, num_classes, deploy, channels, block)
  except ValueError as e:
    raise checkpoint.CheckpointError(f'{where}: {e}') from None


def verify_deploy(model: str, num_classes: int, train_variables: Any, deploy_variables: Any,
                  image_size: int, conv_impl: str = 'xla', channels: int = 3,
                  batch_size: int = 2, seed: int = 0, block: str = 'repvgg') -> float:
  """Relative error of the deploy model's logits against the training-time model's (eval
  mode, of ``block`` blocks) on a random normal batch, both at float32 and full matmul
  precision."""
  x = jax.random.normal(jax.random.PRNGKey(seed),
                        (batch_size, image_size, image_size, channels))
  reference = exact_forward(model, num_classes, False, 'xla', block)(train_variables, x)
  output = exact_forward(model, num_classes, True, conv_impl)(deploy_variables, x)
  return relative_error(output, reference)


def export_deploy(model: str, num_classes: int, deploy_variables: Any, image_size: int,
                  conv_impl: str = 'xla', channels: int = 3,
                  platforms: Optional[Sequence[str]] = EXPORT_PLATFORMS,
                  int8: Optional[tuple[Any, Any]] = None) -> bytes:
  """A serialized ``jax.export`` of the deploy forward pass, weights embedded as
  constants, input ``[batch, image_size, image_size, channels]`` float32 with a symbolic
  batch; of its int8 model where ``int8``, that model and its variables
  (``quantization.int8_model``), is given."""
  if int8 is not None:
    net, variables = int8
  else:
    net = create_model(model, num_classes, deploy=True, conv_impl=conv_impl)
    variables = jax.tree_util.tree_map(jnp.asarray, deploy_variables)
  forward = jax.jit(lambda x: net.apply(variables, x))
  batch, = jax.export.symbolic_shape('batch')
  spec = jax.ShapeDtypeStruct((batch, image_size, image_size, channels), jnp.float32)
  return jax.export.export(forward, platforms=platforms)(spec).serialize()


def quantize_deploy(run: Mapping[str, Any], deploy_variables: Any, options: Int8Options,
                    log: Any = print
                    ) -> tuple[dict[str, Any], tuple[Any, Any], np.ndarray]:
  """Calibrate and verify the int8 model of a run's deploy variables (see the module
  docstring); returns ``model.json``'s ``int8`` entry, the int8 model and its variables
  (``quantization.int8_model``, made once for the checks and the exports), and the first
  calibration images (for checking exports: the int8 model wants images like those it
  was calibrated on).

  Raises:
    calibration.CalibrationDataError: the data cannot be read or does not fit the model.
    ConversionError: int8 and float agree on less than ``options.min_agreement``.
  """
  if not 0 <= options.min_agreement <= 1:
    raise ValueError(f'min_agreement must be in [0, 1], got {options.min_agreement}')
  run_data = calibration.RunData.of_run(run, options.dataset, options.data_dir)
  net = create_model(run['model'], run_data.num_classes, deploy=True)
  images = run_data.calibration_images(options.calibration_batches)
  ranges = quantization.calibrate(net, deploy_variables, images, options.method,
                                  options.percentile)
  count = sum(len(batch) for batch in images)
  log(f'int8: calibrated {len(ranges)} layer inputs ({options.method}) on {count} training '
      f'images of {run_data.dataset}')
  entry = {'method': options.method, 'keep_float': list(options.keep_float),
           'ranges': {k: float(v) for k, v in sorted(ranges.items())},
           'calibration': {'dataset': run_data.dataset, 'split': 'train',
                           'batches': options.calibration_batches,
                           'images': count, 'seed': run_data.seed,
                           'augment': run_data.augment}}
  if options.method == 'percentile':
    entry['percentile'] = options.percentile
  int8_net, int8_variables = quantization.int8_model(net, deploy_variables, entry)
  report = calibration.compare(
      calibration.predictor(net.apply, deploy_variables),
      {'int8': calibration.predictor(int8_net.apply, int8_variables)},
      run_data.eval_batches(), options.agreement_batches)
  entry['verification'] = {
      'dataset': run_data.dataset, 'split': 'eval', 'images': report['images'],
      'top1_agreement': report['agreement']['int8'],
      'logits_relative_error': report['logits_relative_error']['int8'],
      'float_top1': report['top1']['float'], 'int8_top1': report['top1']['int8']}
  verification = entry['verification']
  log(f'int8 vs float on {verification["images"]} eval images: top-1 agreement '
      f'{verification["top1_agreement"]:.2%}, logits relative error '
      f'{verification["logits_relative_error"]:.2e}; top-1 float '
      f'{verification["float_top1"]:.2%}, int8 {verification["int8_top1"]:.2%}')
  if verification['top1_agreement'] < options.min_agreement:
    raise ConversionError(
        f'the int8 model agrees with the float deploy model on '
        f'{verification["top1_agreement"]:.2%} of {verification["images"]} eval images, '
        f'below --min-agreement {options.min_agreement:.2%}; nothing written (QARepVGG '
        "blocks, config.block='qarepvgg', quantize far better; or try another "
        '--calibration-method)')
  return entry, (int8_net, int8_variables), np.asarray(images[0][:VERIFY_IMAGES])


def convert_training_run(workdir: str, output: str, step: Optional[int] = None,
                         model: Optional[str] = None,
                         export: Union[None, str, Sequence[str]] = None,
                         conv_impl: str = 'xla', overwrite: bool = False,
                         platforms: Optional[Sequence[str]] = EXPORT_PLATFORMS,
                         int8: Optional[Int8Options] = None,
                         log: Any = print) -> dict[str, Any]:
  """Write the verified deploy checkpoint of a training run; returns its metadata.

  Args:
    workdir: the training run (``run.json`` and ``checkpoints/``).
    output: the variables directory to create.
    step: the checkpoint step; the latest by default.
    model: the model the run must be of (an error otherwise); None accepts any.
    export: formats of ``EXPORT_FORMATS`` to also write (a name or several):
      ``'stablehlo'``, ``EXPORT_FILE``; ``'onnx'``, ``ONNX_FILE`` (``onnx_export.to_onnx``
      of the deploy variables, NCHW input, verified in onnxruntime within the same bar).
    conv_impl: the 3x3 conv implementation of the exported forward pass (the stored
      variables are always ``reparameterize``'s, for every ``conv_impl``); not a native
      one with ``'stablehlo'``.
    overwrite: replace an existing ``output``.
    platforms: platforms lowered into the export.
    int8: also quantize to int8 (see the module docstring); the exports are then the
      int8 model's, with XLA's convolutions.
    log: called with one line per stage.

  Raises:
    CheckpointError: missing, unreadable or mismatched checkpoint, or existing output.
    ConversionError: the deploy model's error exceeds ``TOLERANCE``, or its int8 model
      agrees less than ``int8.min_agreement``; nothing is written.
    calibration.CalibrationDataError: ``int8``'s data cannot be read or does not fit.
  """
  exports = [export] if isinstance(export, str) else list(export or ())
  unknown = [e for e in exports if e not in EXPORT_FORMATS]
  if unknown:
    raise ValueError(f'unknown export format {unknown[0]!r}; accepted: '
                     f'{", ".join(EXPORT_FORMATS)}')
  convolution.check_conv_impl(conv_impl, deploy=True)
  if 'stablehlo' in exports and winograd.is_native(conv_impl):
    raise ValueError(f'conv_impl {conv_impl!r} calls a kernel compiled on this machine, '
                     'which a StableHLO export cannot carry; export '
                     f'{winograd.portable(conv_impl)!r} (the same arithmetic as XLA ops)')
  if int8 is not None and conv_impl != 'xla':
    raise ValueError(f'the int8 model computes with XLA\'s (integer) convolutions: '
                     f'conv_impl {conv_impl!r} does not apply to it; use xla')
  output = os.path.abspath(output)
  checkpoint.refuse_existing(output, overwrite)
  train_variables, step, run = checkpoint.restore_training_variables(workdir, step)
  missing = [k for k in ('model', 'num_classes', 'image_size') if k not in run]
  if missing:
    raise checkpoint.CheckpointError(f'{workdir}/{checkpoint.RUN_METADATA}: lacks {missing}')
  run_model = run['model']
  try:
    get_variant(run_model)
  except ValueError as e:
    raise checkpoint.CheckpointError(f'{workdir}/{checkpoint.RUN_METADATA}: {e}') from None
  if model is not None and model != run_model:
    raise checkpoint.CheckpointError(f'{workdir}: a {run_model} run, not {model}')
  num_classes = int(run['num_classes'])
  image_size = int(run['image_size'])
  mean = run.get('mean', checkpoint.IMAGENET_MEAN)
  std = run.get('std', checkpoint.IMAGENET_STD)
  channels = len(mean)  # one normalization constant per input channel (1 for grey)
  block = run.get('config', {}).get('block', 'repvgg')  # runs before QARepVGG lack it
  check_structure(train_variables, run_model, num_classes, False, f'{workdir} step {step}',
                  channels, block)
  log(f'{run_model}: step {step} of {workdir}, {num_classes} classes, {image_size}px')

  deploy_variables = jax.tree_util.tree_map(np.asarray, reparameterize(train_variables))
  checked = convolution.transform_kernels(deploy_variables, run_model, conv_impl)
  error = verify_deploy(run_model, num_classes, train_variables, checked, image_size,
                        conv_impl, channels, block=block)
  log(f'deploy ({conv_impl}) vs training-time logits: relative error {error:.2e} '
      f'(limit {TOLERANCE:.0e})')
  if not error <= TOLERANCE:
    raise ConversionError(f'the deploy model ({conv_impl}) differs from the training-time '
                          f'model by {error:.2e} > {TOLERANCE:.0e} (relative L2 of the '
                          'logits); nothing written')

  metadata = checkpoint.model_metadata(
      run_model, num_classes, image_size, mean, std, run.get('config', {}).get('crop_fraction'),
      structure='deploy', source=os.path.abspath(workdir), step=int(step),
      conversion_relative_error=error)
  int8_model, int8_images = None, None
  if int8 is not None:
    metadata['int8'], int8_model, int8_images = quantize_deploy(run, deploy_variables, int8,
                                                                log)
  files = {}
  if 'stablehlo' in exports:
    serialized = export_deploy(run_model, num_classes, checked, image_size, conv_impl,
                               channels, platforms, int8_model)
    files[EXPORT_FILE] = serialized
    metadata['export'] = {'file': EXPORT_FILE, 'format': 'stablehlo', 'conv_impl': conv_impl,
                          'platforms': list(platforms or [jax.default_backend()]),
                          'input': ['batch', image_size, image_size, channels],
                          'int8': int8 is not None}
    log(f'exported {len(serialized) / 2**20:.1f} MiB (stablehlo, '
        f'{"int8" if int8 is not None else conv_impl}, symbolic batch)')
  if 'onnx' in exports:
    files[ONNX_FILE], onnx_error = _onnx(run_model, deploy_variables, num_classes,
                                         image_size, channels, int8_model, int8_images)
    metadata['onnx'] = {'file': ONNX_FILE, 'opset': onnx_export.DEFAULT_OPSET,
                        'input': ['batch', channels, 'height', 'width'],
                        'relative_error': onnx_error, 'int8': int8 is not None}
    log(f'exported {len(files[ONNX_FILE]) / 2**20:.1f} MiB (onnx, opset '
        f'{onnx_export.DEFAULT_OPSET}, NCHW{", int8 QDQ" if int8 is not None else ""}); '
        f'onnxruntime vs JAX: relative error {onnx_error:.2e}')
  checkpoint.save_variables(output, deploy_variables, metadata, overwrite, files)
  log(f'wrote {output}')
  return metadata


def _onnx(model: str, deploy_variables: Any, num_classes: int, image_size: int,
          channels: int, int8: Optional[tuple[Any, Any]],
          int8_images: Optional[np.ndarray]) -> tuple[bytes, float]:
  """The ONNX graph of the deploy model (of its int8 model in QDQ form where ``int8``,
  that model and its variables, is given) and its relative error against JAX in
  onnxruntime; ``ConversionError`` beyond the bar.

  The float graph's bar is ``TOLERANCE``. The QDQ graph is compared with the JAX int8
  model on ``int8_images`` (calibration images: on random ones its activations span a
  few int8 steps): one-step rounding flips (onnxruntime and XLA round a few products
  differently) cascade through the layers, up to ~2.5% on trained models and more on
  random ones, so its bar is ``onnx_export.INT8_TOLERANCE`` or, where larger, half the
  int8 model's own distance from the float model on those images: a graph that is not
  the int8 model (a wrong scale, layout or layer) lands near the float model or
  farther. ``tests/test_onnx_export.py`` checks every QDQ layer to ~1e-6 on its own.
  """
  int8_layers, reference, tolerance = None, None, TOLERANCE
  if int8 is not None:
    net = create_model(model, num_classes, deploy=True)
    int8_net, int8_variables = int8
    int8_layers = quantization.int8_layers(int8_variables)
    reference = calibration.predictor(int8_net.apply, int8_variables)
    int8_distance = relative_error(reference(int8_images),
                                   calibration.predictor(net.apply, deploy_variables)(
                                       int8_images))
    tolerance = max(onnx_export.INT8_TOLERANCE, int8_distance / 2)
  serialized = onnx_export.to_onnx(model, deploy_variables, num_classes, channels,
                                   int8_layers=int8_layers)
  try:
    error = onnx_export.verify_onnx(serialized, model, deploy_variables, image_size, channels,
                                    tolerance=tolerance, reference=reference,
                                    images=int8_images)
  except onnx_export.OnnxVerificationError as e:
    raise ConversionError(f'{e}; nothing written') from None
  return serialized, error


def load_deploy(directory: str, conv_impl: str = 'auto', dtype: Any = jnp.float32,
                int8: Optional[bool] = None
                ) -> tuple[Callable[[jax.Array], jax.Array], dict[str, Any]]:
  """``(forward, metadata)`` of a deploy variables directory written by ``convert.py``.

  ``forward(images)`` is the jitted deploy model (images normalized as ``metadata``
  says): its int8 model where the directory holds one (``convert.py --quantize int8``)
  unless ``int8=False``. ``conv_impl='auto'`` picks the fastest measured implementation
  of the float model for the default backend (``convolution.default_conv_impl``: Winograd
  F(4x4) on CPU at float32, in the native kernel where it builds, XLA's convolution
  elsewhere; on CPU also start JAX with ``xla_backend.CPU_FAST_FLAGS``); the int8 model
  computes with XLA's convolutions.
  """
  variables, metadata = checkpoint.load_variables(directory)
  if metadata.get('structure') != 'deploy':
    raise checkpoint.CheckpointError(f'{directory}: structure is '
                                     f'{metadata.get("structure")!r}, not a deploy checkpoint')
  if int8 and 'int8' not in metadata:
    raise checkpoint.CheckpointError(f'{directory}: holds no int8 calibration (convert it '
                                     'with convert.py deploy --quantize int8)')
  name = metadata['model']
  if 'int8' in metadata and int8 is not False:
    if conv_impl not in ('auto', 'xla') or jnp.dtype(dtype) != jnp.float32:
      raise ValueError(f'{directory}: the int8 model computes with XLA\'s convolutions in '
                       f'float32 around int8; conv_impl {conv_impl!r} / dtype '
                       f'{jnp.dtype(dtype).name} do not apply (int8=False loads the float '
                       'model)')
    net = create_model(name, metadata['num_classes'], deploy=True)
    int8_net, variables = quantization.int8_model(net, variables, metadata['int8'])
    return calibration.predictor(int8_net.apply, variables), metadata
  if conv_impl == 'auto':
    conv_impl = convolution.default_conv_impl(jax.default_backend(), dtype)
  net = create_model(name, metadata['num_classes'], deploy=True, dtype=dtype,
                     conv_impl=conv_impl)
  variables = convolution.transform_kernels(variables, name, conv_impl)
  return calibration.predictor(net.apply, variables), metadata


def import_torch(source: str, model: str, output: str, image_size: int = 224,
                 overwrite: bool = False, log: Any = print) -> dict[str, Any]:
  """Write the Flax variables of a PyTorch RepVGG state dict (``.pth``/``.safetensors``)
  as a variables directory, ``structure`` 'train' or 'deploy' as found in the file."""
  output = os.path.abspath(output)
  checkpoint.refuse_existing(output, overwrite)
  variables = torch_io.load_torch_weights(source, model)
  structure = 'train' if 'batch_stats' in variables else 'deploy'
  num_classes = num_classes_of(variables)
  metadata = checkpoint.model_metadata(model, num_classes, image_size, structure=structure,
                                       source=os.path.abspath(source))
  checkpoint.save_variables(output, jax.tree_util.tree_map(np.asarray, variables), metadata,
                            overwrite=overwrite)
  log(f'{model} ({structure}, {num_classes} classes) from {source}: wrote {output}')
  return metadata


def export_torch(path: str, naming: str = 'official', workdir: Optional[str] = None,
                 variables_dir: Optional[str] = None, step: Optional[int] = None,
                 log: Any = print) -> None:
  """Write a training run's or a variables directory's weights as a PyTorch state dict
  (``.pth``/``.pt`` or ``.safetensors``) in the official or timm naming."""
  if (workdir is None) == (variables_dir is None):
    raise ValueError('give exactly one source: a training run (--workdir) or a variables '
                     'directory (--variables)')
  if workdir is not None:
    variables, step, metadata = checkpoint.restore_training_variables(workdir, step)
    source = f'{workdir} step {step}'
  else:
    variables, metadata = checkpoint.load_variables(variables_dir)
    source = variables_dir
  state_dict = torch_io.to_torch_state_dict(variables, metadata['model'], naming)
  torch_io.save_torch_state_dict(state_dict, path)
  log(f'{metadata["model"]} from {source}: wrote {len(state_dict)} tensors '
      f'({naming} naming) to {path}')
