"""Post-training int8 quantization of the deploy model (static ranges, run by qwix).

The scheme TensorRT and QDQ ONNX graphs use: every conv and linear layer of the deploy
model computes on

- int8 weights, symmetric, one scale per output channel (the channel's largest |w| over
  127.5, qwix's convention; values rounded to [-127, 127]);
- an int8 input, symmetric, with one static scale for the whole tensor: its clipping
  range over 127.5, calibrated once on a few batches of training images (``calibrate``)
  by one of ``METHODS``: ``'absmax'`` (the largest |x| seen), ``'percentile'`` (that
  percentile of |x|) or ``'mse'`` (the range whose int8 rounding and clipping of the
  histogram of |x| has the least squared error).

``keep_float`` leaves layers in float, by default the first (``stage0``, which sees the
normalized image) and the classifier (``linear``), as int8 deployments usually do.

qwix (Google's JAX quantization library) runs the quantized model: ``quantized_model`` is
the deploy model under qwix's PTQ provider, and ``quantize`` makes its variables from the
float deploy variables and the ranges, which it hands to qwix as static-range statistics
of one sample each. (qwix's own static calibration averages each image's absmax over the
batches; it has no percentile nor MSE calibration.) qwix convolves the int8 values
themselves (XLA's integer convolution) and rescales the result in float, an int8 engine's
arithmetic, which a QDQ graph describes too; ``int8_layers`` lists the tensors such a graph
needs.

    ranges = calibrate(deploy, deploy_vars, batches, 'percentile')
    int8_vars = quantize(deploy, deploy_vars, ranges)
    logits = quantized_model(deploy).apply(int8_vars, images)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import traverse_util

from repvgg_jax.models import RepVGG
from repvgg_jax.variants import MIN_IMAGE_SIZE

METHODS = ('absmax', 'percentile', 'mse')
KEEP_FLOAT = ('stage0', 'linear')
# qwix's symmetric int8: scale = range / 127.5 (qmax + 0.5, so that the top bucket is as
# wide as the others), values rounded and clipped to [-127, 127].
INT8_MAX = 127
SCALE_STEPS = 127.5
# Histogram of |x| per layer for the percentile and MSE ranges (TensorRT's calibrators
# use 2048 bins too).
HISTOGRAM_BINS = 2048
# The smallest clipping range the MSE search tries, in bins: narrower ranges clip almost
# everything of any layer that is not dead.
MSE_MIN_BIN = 16

Tree = Any


def _check_deploy(model: nn.Module) -> None:
  if not isinstance(model, RepVGG) or not model.deploy or model.conv_impl not in ('xla',):
    raise ValueError('int8 quantization needs the deploy model with conv_impl=\'xla\', i.e. '
                     "create_model(name, num_classes, deploy=True); got "
                     f'{type(model).__name__}(deploy={getattr(model, "deploy", None)}, '
                     f'conv_impl={getattr(model, "conv_impl", None)!r})')


def layer_inputs(model: nn.Module, variables: Tree, images: jax.Array) -> dict[str, jax.Array]:
  """The input of every conv and linear layer of ``model`` on ``images``, by module path
  (``'stage1_0/reparam_conv'``, ``'linear'``, ``'stage1_0/se/down'``); jit-able."""
  captured = {}

  def capture(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and isinstance(context.module, (nn.Conv, nn.Dense)):
      captured['/'.join(context.module.path)] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(capture):
    model.apply(variables, images)
  return captured


def _check_batches(batches: Iterable[Any], channels: int) -> list[jax.Array]:
  batches = [jnp.asarray(b) for b in batches]
  if not batches:
    raise ValueError('calibration needs at least one batch of images, got none')
  for i, batch in enumerate(batches):
    if batch.ndim != 4 or batch.shape[-1] != channels or batch.shape[1] < MIN_IMAGE_SIZE:
      raise ValueError(f'calibration batch {i}: expected NHWC images of at least '
                       f'{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} with {channels} channels, got '
                       f'shape {batch.shape}')
  return batches


def calibrate(model: RepVGG, variables: Tree, batches: Iterable[Any], method: str = 'absmax',
              percentile: float = 99.99) -> dict[str, float]:
  """The clipping range of the input of every conv and linear layer of the deploy
  ``model``, by module path, from its inputs on ``batches`` (NHWC images, preprocessed as
  for the model) by ``method`` (see the module docstring); ``percentile`` in (0, 100] is
  that of ``'percentile'``."""
  _check_deploy(model)
  if method not in METHODS:
    raise ValueError(f'calibration method {method!r}: accepted are {", ".join(METHODS)}')
  if method == 'percentile' and not 0 < percentile <= 100:
    raise ValueError(f'percentile must be in (0, 100], got {percentile}')
  channels = variables['params']['stage0']['reparam_conv']['kernel'].shape[2]
  batches = _check_batches(batches, channels)

  absmax, histograms = _statistics(model)
  maxima = {}
  for batch in batches:
    for k, m in absmax(variables, batch).items():
      maxima[k] = max(maxima.get(k, 0.0), float(m))
  if method == 'absmax':
    return maxima

  # Dead layers (all-zero inputs) get a range of 0 (quantize gives them a tiny scale).
  counts = {k: 0 for k in maxima}
  for batch in batches:
    for k, c in histograms(variables, batch,
                           {k: max(m, 1e-30) for k, m in maxima.items()}).items():
      counts[k] = counts[k] + np.asarray(c, np.float64)
  pick = (lambda c, m: _percentile_range(c, m, percentile)) if method == 'percentile' \
      else _mse_range
  return {k: pick(counts[k], maxima[k]) if maxima[k] > 0 else 0.0 for k in maxima}


@functools.lru_cache(maxsize=4)
def _statistics(model: RepVGG) -> tuple[Callable, Callable]:
  """Jitted functions of ``(variables, images)``: the largest |x| of each layer's input,
  and (given those maxima) the histogram of its |x|; compiled once per model."""

  @jax.jit
  def absmax(variables, images):
    return {k: jnp.max(jnp.abs(x)) for k, x in layer_inputs(model, variables, images).items()}

  @jax.jit
  def histograms(variables, images, maxima):
    # A scatter-add of bin indices: jnp.histogram's search is many times slower on CPU.
    bins = {k: jnp.minimum(jnp.abs(x) / maxima[k] * HISTOGRAM_BINS, HISTOGRAM_BINS - 1)
            for k, x in layer_inputs(model, variables, images).items()}
    return {k: jnp.bincount(b.astype(jnp.int32).ravel(), length=HISTOGRAM_BINS)
            for k, b in bins.items()}

  return absmax, histograms


def _percentile_range(counts: np.ndarray, maximum: float, percentile: float) -> float:
  """The upper edge of the bin where the histogram's cumulative share reaches
  ``percentile``."""
  cdf = np.cumsum(counts) / counts.sum()
  index = min(int(np.searchsorted(cdf, percentile / 100)), len(counts) - 1)
  return maximum * (index + 1) / len(counts)


def _mse_range(counts: np.ndarray, maximum: float) -> float:
  """The clipping range, among the histogram's bin edges, that minimizes the squared
  error of symmetric int8 quantization (qwix's) of the histogram's bin centres."""
  width = maximum / len(counts)
  centres = (np.arange(len(counts)) + 0.5) * width
  candidates = np.arange(MSE_MIN_BIN, len(counts) + 1)[:, None] * width
  step = candidates / SCALE_STEPS
  quantized = np.minimum(np.round(centres / step), INT8_MAX) * step
  errors = ((centres - quantized) ** 2 * counts).sum(axis=1)
  return float(candidates[np.argmin(errors), 0])


def _rules(keep_float: Sequence[str]) -> list[qwix.QuantizationRule]:
  # qwix takes the first rule whose module_path fully matches; one without qtypes keeps
  # the layer in float.
  rules = [qwix.QuantizationRule(module_path=f'({"|".join(keep_float)})(/.*)?')] \
      if keep_float else []
  return rules + [qwix.QuantizationRule(weight_qtype=jnp.int8, act_qtype=jnp.int8,
                                        act_static_scale=True)]


def quantized_model(model: RepVGG, keep_float: Sequence[str] = KEEP_FLOAT) -> nn.Module:
  """The deploy ``model`` computing in int8 (qwix's PTQ provider), except the layers
  under the top-level modules named in ``keep_float``; its variables come from
  ``quantize``."""
  _check_deploy(model)
  return qwix.quantize_model(model, qwix.PtqProvider(_rules(tuple(keep_float))))


def quantize(model: RepVGG, variables: Tree, ranges: Mapping[str, float],
             keep_float: Sequence[str] = KEEP_FLOAT) -> dict[str, Any]:
  """The variables of ``quantized_model(model, keep_float)`` from the float deploy
  ``variables`` and the input ranges of ``calibrate``: ``{'params': ...}`` where each
  int8 layer holds its kernel as a qwix ``QArray`` (int8 values, float32 scale per output
  channel), its float bias, and the float32 scale of its input (``<op>_lhs_scale``)."""
  qmodel = quantized_model(model, keep_float)
  channels = variables['params']['stage0']['reparam_conv']['kernel'].shape[2]
  x = jax.ShapeDtypeStruct((1, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE, channels), jnp.float32)
  abstract = jax.eval_shape(qmodel.init, jax.random.PRNGKey(0), x)['params']
  # qwix's static-range statistics (quant_stats): a sum of absmax over a count of samples
  # per quantized input, next to whose scale parameter (<op>_lhs_scale) they belong.
  stats = {}
  for path, leaf in traverse_util.flatten_dict(abstract).items():
    if not path[-1].endswith('_lhs_scale'):
      continue
    layer = '/'.join(path[:-1])
    if layer not in ranges:
      raise ValueError(f'ranges lack the int8 layer {layer!r} (they hold {len(ranges)} '
                       'layers); calibrate the same model')
    absmax = max(float(ranges[layer]), 1e-8)  # a dead layer still needs a scale
    stats[path[:-1] + (path[-1][:-len('_scale')],)] = {
        'count': jnp.ones((), jnp.int32),
        'sum_of_absmax': jnp.full(leaf.array.shape, absmax, jnp.float32)}
  # qwix wants jax arrays (variables loaded from a checkpoint are numpy).
  params = qwix.quantize_params(jax.tree_util.tree_map(jnp.asarray, variables['params']),
                                abstract, traverse_util.unflatten_dict(stats))
  return {'params': params}


def int8_model(model: RepVGG, variables: Tree, calibration: Mapping[str, Any]
               ) -> tuple[nn.Module, dict[str, Any]]:
  """``(int8_model, int8_variables)``: the int8 model of the float deploy ``model`` and
  ``variables`` that ``calibration`` describes (a deploy checkpoint's ``model.json``
  ``int8`` entry: the ``ranges`` of ``calibrate`` and the ``keep_float`` modules)."""
  keep_float = tuple(calibration['keep_float'])
  return (quantized_model(model, keep_float),
          quantize(model, variables, calibration['ranges'], keep_float))


def int8_layers(quantized: Tree) -> dict[str, dict[str, np.ndarray]]:
  """The tensors of each int8 layer of ``quantize``'s output, by module path, as a QDQ
  graph (QuantizeLinear/DequantizeLinear around each conv) wants them: ``kernel`` (int8,
  Flax's HWIO or IO layout), ``kernel_scale`` (float32, one per output channel),
  ``input_scale`` (float32 scalar), and ``bias`` (float32)."""
  layers = {}
  flat = traverse_util.flatten_dict(quantized['params'],
                                    is_leaf=lambda _, v: not isinstance(v, Mapping))
  for path, leaf in flat.items():
    # qwix wraps an int8 kernel as WithAux(array=QArray(qvalue, scale)).
    if path[-1] != 'kernel' or not isinstance(getattr(leaf, 'array', None), qwix.QArray):
      continue
    layer = path[:-1]
    scale = next(v for p, v in flat.items() if p[:-1] == layer and p[-1].endswith('_lhs_scale'))
    layers['/'.join(layer)] = {
        'kernel': np.asarray(leaf.array.qvalue),
        'kernel_scale': np.asarray(leaf.array.scale, np.float32).reshape(-1),
        'input_scale': np.asarray(scale.array, np.float32).reshape(()),
        'bias': np.asarray(flat[layer + ('bias',)], np.float32)}
  return layers
