"""ONNX export of the deploy model, built straight from its variables tree.

``to_onnx`` writes the deploy structure node by node with ``onnx.helper`` (no tracing,
no jax2onnx, no torch)::

    deploy_vars = rv.reparameterize(train_vars)
    serialized = onnx_export.to_onnx('RepVGG-A0', deploy_vars)  # the .onnx file's bytes
    open('repvgg_a0.onnx', 'wb').write(serialized)
    onnx_export.verify_onnx(serialized, 'RepVGG-A0', deploy_vars, image_size=224)

The graph, ONNX default domain, opset 17 by default (any opset from 11 up, the first in
which every operator used here has its current form, to the newest the installed onnx
knows; the IR version is the lowest that opset allows, for older runtimes):

* input ``images``: float32 ``[batch, channels, height, width]`` (NCHW, as PyTorch and
  ONNX runtimes expect; the JAX model takes NHWC) with symbolic ``batch``, ``height``
  and ``width``;
* per block (``stage0``, ``stage1_0``, ...): ``Conv`` 3x3 with bias, the block's strides
  and groups and pads ``[1, 1, 1, 1]``, then ``Relu``; a squeeze-excite block
  (``GlobalAveragePool -> Conv 1x1 -> Relu -> Conv 1x1 -> Sigmoid -> Mul``) before the
  ReLU for SE ``'pre'`` (RepVGG-D2se) or after it for ``'post'`` (RepVGGplus);
* head: ``GlobalAveragePool -> Flatten -> Gemm``, output ``logits`` float32
  ``[batch, classes]``; a tree without a classifier (``num_classes=0``) gives the pooled
  features instead, output ``features`` ``[batch, channels of the last stage]``.

Weights are float32 initializers named ``<block>.conv.weight`` (OIHW),
``<block>.conv.bias``, ``<block>.se.{down,up}.{weight,bias}`` and
``linear.{weight,bias}`` (``[in, out]``). Images are normalized as for the JAX model (the
graph does no preprocessing).

The int8 model of ``repvgg_jax.quantization`` is written in QDQ form, as TensorRT's
explicit quantization and onnxruntime's quantizer write it, by ``to_onnx(...,
int8_layers=quantization.int8_layers(int8_vars))``. Each of those layers (``<layer>``
names it as its float weights do: ``stage1_0.conv``, ``stage1_0.se.down``, ``linear``)
computes on

* its input through ``QuantizeLinear -> DequantizeLinear`` with the float32 scalar scale
  ``<layer>.input_scale`` and the int8 zero point ``int8.zero_point`` (0: symmetric);
* its weight ``<layer>.weight``, an int8 initializer in the float graph's layout, through
  ``DequantizeLinear`` with one float32 scale per output channel ``<layer>.weight_scale``
  (``axis`` 0 for ``Conv``'s OIHW, 1 for ``Gemm``'s ``[in, out]``);
* its float32 bias ``<layer>.bias``, added as qwix adds it (to the rescaled sum);
* for a conv whose ReLU feeds one int8 conv alone (a block's conv followed by the next
  block's, without squeeze-excite between; a squeeze-excite ``down`` followed by its
  ``up``), its output too, through ``QuantizeLinear -> DequantizeLinear`` with that next
  layer's input scale, before the ReLU (nodes ``<layer>.output_quantized`` and
  ``<layer>.output_dequantized``).

That output Q/DQ changes no value: with zero point 0, quantizing before or after the ReLU
gives the same int8 values, which the next layer's own input Q/DQ keeps. It is there for
the runtimes: onnxruntime's CPU provider fuses a conv into an int8 ``QLinearConv`` only
between a ``DequantizeLinear`` input and a ``QuantizeLinear`` output, and otherwise runs
float convs on the dequantized values, slower than the float graph (docs/benchmarks.md).
Outputs that feed no int8 conv alone stay float: a block's where squeeze-excite multiplies
it, the last block's (pooling and classifier follow), a squeeze-excite ``up``'s (sigmoid),
and those of the float layers (``keep_float``: by default the stem and the classifier),
which would not fuse.

That is qwix's arithmetic up to float32 rounding: QuantizeLinear rounds half to even and
saturates to [-128, 127] as qwix does (XLA's float-to-int8 conversion saturates, so an
input beyond a clipping calibration's range gives -128 or 127 in both), but it divides by
the scale where XLA:CPU multiplies by the reciprocal, and a float convolution of
dequantized values sums in another order than qwix's integer one (onnxruntime's
``QLinearConv`` sums integers but requantizes its sums in its own way). These flip the
rounding of a few elements of the next layer's input by one step, and the flips cascade:
the outputs of the whole graph differ from qwix's by up to ~2.5% (relative L2; ~1% on
trained models, whose top-1 is the same on 99-99.6% of images; qwix's own outputs move by
up to 1.6% when its images are scaled by 1 + 1e-6). Hence ``INT8_TOLERANCE``, which tells
the int8 graph from the float one (6.5% and more away) and from layout or scale mistakes,
though not one layer left in float (the tests feed each layer its own input for that);
docs/benchmarks.md has the measurements.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import jax
import numpy as np
from flax import traverse_util

from repvgg_jax.equivalence import TOLERANCE, relative_error
from repvgg_jax.models import check_variables, exact_forward, num_classes_of
from repvgg_jax.variants import get_variant, layer_specs

if TYPE_CHECKING:
  import onnx

DEFAULT_OPSET = 17
# Conv, Relu, Sigmoid, Mul, GlobalAveragePool, Flatten and Gemm all have their present
# semantics from opset 11 on (later versions only add types, e.g. bfloat16).
MIN_OPSET = 11
# DequantizeLinear with one scale per output channel (its axis attribute) is opset 13's.
MIN_INT8_OPSET = 13
# The bar of a QDQ graph against the JAX int8 model it writes (relative L2 of the
# outputs): one-step rounding flips cascade to up to ~2.5% (see the module docstring and
# docs/benchmarks.md), the float graph is 6.5% and more away.
INT8_TOLERANCE = 4e-2


class OnnxVerificationError(ValueError):
  """The ONNX model does not reproduce the JAX deploy model."""


def _import_onnx() -> Any:
  try:
    import onnx
  except ImportError:
    raise ImportError("ONNX export needs the onnx package: pip install 'repvgg-jax[onnx]' "
                      '(or pip install onnx)') from None
  return onnx


def _import_onnxruntime() -> Any:
  try:
    import onnxruntime
  except ImportError:
    raise ImportError("verify_onnx needs onnxruntime: pip install 'repvgg-jax[onnx]' "
                      '(or pip install onnxruntime)') from None
  return onnxruntime


def check_deploy_variables(model_name: str, deploy_variables: Any,
                           num_classes: Optional[int] = None, channels: int = 3) -> int:
  """Raise a one-line ValueError unless ``deploy_variables`` is the deploy tree of
  ``model_name`` for ``channels`` input channels; returns its number of classes
  (inferred from ``params/linear`` when ``num_classes`` is None, 0 without a
  classifier)."""
  get_variant(model_name)  # a ValueError listing the valid names
  if not isinstance(deploy_variables, Mapping) or 'params' not in deploy_variables:
    got = (f'keys {sorted(deploy_variables)}' if isinstance(deploy_variables, Mapping)
           else type(deploy_variables).__name__)
    raise ValueError(f"expected the deploy variables {{'params': ...}} of {model_name}, "
                     f'got {got}')
  params = deploy_variables['params']
  leaves = traverse_util.flatten_dict(dict(params), sep='/') if isinstance(
      params, Mapping) else {}
  if 'batch_stats' in deploy_variables or any(
      '/conv3x3/' in path or '/conv1x1/' in path for path in leaves):
    raise ValueError(f'got a training-time tree of {model_name} (it holds batch_stats or '
                     'conv3x3/conv1x1 branches); reparameterize first: '
                     'rv.reparameterize(train_vars) gives the deploy tree ONNX export accepts')
  extra = sorted(set(deploy_variables) - {'params'})
  if extra:
    raise ValueError(f"the deploy tree of {model_name} holds only 'params', got also "
                     f'{extra}')
  for path, leaf in leaves.items():
    shape = np.shape(leaf)
    # winograd.transform_kernels gives stride-1 kernels (m+2, m+2, in/groups, out), m=2 or 4.
    if path.endswith('reparam_conv/kernel') and len(shape) == 4 and shape[:2] in ((4, 4), (6, 6)):
      raise ValueError(f'{path} has shape {shape}: a Winograd-transformed kernel? ONNX '
                       'export takes the 3x3 HWIO kernels (3, 3, in/groups, out) of '
                       'rv.reparameterize, before winograd.transform_kernels')
  if num_classes is None:
    num_classes = num_classes_of(deploy_variables)
  check_variables(deploy_variables, model_name, num_classes, deploy=True, channels=channels)
  return num_classes


def _check_int8_layers(model_name: str, params: Mapping,
                       int8_layers: Mapping[str, Mapping[str, Any]]) -> None:
  """Raise a one-line ValueError unless every entry of ``int8_layers`` is an int8 layer
  (``quantization.int8_layers``'s tensors) of a conv or linear layer of ``params``."""
  leaves = traverse_util.flatten_dict(dict(params), sep='/')
  for path, layer in int8_layers.items():
    if f'{path}/kernel' not in leaves:
      raise ValueError(f'int8 layer {path!r} is no conv or linear layer of {model_name} '
                       "(module paths as quantization.int8_layers gives them: "
                       "'stage1_0/reparam_conv', 'linear', ...)")
    kernel_shape = np.shape(leaves[f'{path}/kernel'])
    expected = {'kernel': kernel_shape, 'kernel_scale': kernel_shape[-1:], 'input_scale': (),
                'bias': kernel_shape[-1:]}
    if not isinstance(layer, Mapping) or set(layer) != set(expected):
      got = sorted(layer) if isinstance(layer, Mapping) else type(layer).__name__
      raise ValueError(f'int8 layer {path!r}: expected the tensors {sorted(expected)} of '
                       f'quantization.int8_layers, got {got}')
    for key, shape in expected.items():
      if np.shape(layer[key]) != shape:
        raise ValueError(f'int8 layer {path!r}: {key} has shape {np.shape(layer[key])}, '
                         f'expected {shape}')
    if np.asarray(layer['kernel']).dtype != np.int8:
      raise ValueError(f"int8 layer {path!r}: kernel has dtype "
                       f"{np.asarray(layer['kernel']).dtype}, expected int8")


def to_onnx(model_name: str, deploy_variables: Any, num_classes: Optional[int] = None,
            channels: int = 3, opset: int = DEFAULT_OPSET,
            int8_layers: Optional[Mapping[str, Mapping[str, Any]]] = None) -> bytes:
  """The deploy model ``model_name`` with ``deploy_variables`` as a serialized ONNX model:
  the bytes of a ``.onnx`` file, checked by ``onnx.checker`` (with shape inference).

  Bytes rather than an ``onnx.ModelProto`` because that is what files, onnxruntime and
  OpenVINO take, and a proto of the larger variants (~500 MB) costs seconds per copy;
  ``onnx.load_from_string`` gives the proto.

  Args:
    model_name: a name of ``rv.list_models()``.
    deploy_variables: ``{'params': ...}`` of the deploy model, e.g. from
      ``rv.reparameterize``.
    num_classes: classifier outputs; None infers them from ``params/linear`` (0 without).
    channels: input channels of the images.
    opset: ONNX default-domain opset, from 11 to the newest the installed onnx knows
      (from 13 with ``int8_layers``).
    int8_layers: ``quantization.int8_layers(int8_vars)``: these layers (module paths,
      ``'stage1_0/reparam_conv'``, ``'stage1_0/se/down'``, ``'linear'``) are written in QDQ
      form (see the module docstring), the others in float; ``deploy_variables`` are the
      float deploy variables that were quantized. None: the float model.

  Raises:
    ValueError: an unknown model or opset, a tree that is not the deploy tree of the
      model (training-time, Winograd-transformed, other blocks or shapes), or int8 layers
      that are not the model's.
  """
  onnx = _import_onnx()
  from onnx import TensorProto, helper
  newest = onnx.defs.onnx_opset_version()
  lowest = MIN_INT8_OPSET if int8_layers else MIN_OPSET
  if not lowest <= opset <= newest:
    raise ValueError(f'opset {opset} not supported: accepted {lowest} to {newest}'
                     + (' (per-channel DequantizeLinear of int8 layers)' if int8_layers else ''))
  variant = get_variant(model_name)
  num_classes = check_deploy_variables(model_name, deploy_variables, num_classes, channels)
  params = deploy_variables['params']
  int8_layers = int8_layers or {}
  _check_int8_layers(model_name, params, int8_layers)
  nodes, weights = [], {}

  def weight(name: str, array: Any, dtype: str = '<f4') -> str:
    weights[name] = np.asarray(array, dtype)  # ONNX raw_data is little-endian.
    return name

  def node(op: str, inputs: list[str], output: str, **attributes: Any) -> str:
    nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
    return output

  def quantized(x: str, scale: str, name: str) -> str:
    """``x`` through ``QuantizeLinear -> DequantizeLinear`` (int8, zero point 0) with the
    scale tensor ``scale``, the nodes named ``name_quantized``/``name_dequantized``."""
    zero = weight('int8.zero_point', 0, 'i1')  # the int8 type of QuantizeLinear's output
    x = node('QuantizeLinear', [x, scale, zero], f'{name}_quantized')
    return node('DequantizeLinear', [x, scale, zero], f'{name}_dequantized')

  def input_scale(path: str, name: str) -> Optional[str]:
    """The input scale tensor of the layer ``path`` (ONNX name ``name``), None if it is
    float."""
    int8 = int8_layers.get(path)
    return None if int8 is None else weight(f'{name}.input_scale', int8['input_scale'])

  def layer(op: str, path: str, name: str, x: str, kernel: Any, bias: Any,
            layout: Callable[[Any], np.ndarray], out_axis: int, output: Optional[str] = None,
            output_scale: Optional[str] = None, **attributes: Any) -> str:
    """``op`` (Conv or Gemm) of ``x`` with the Flax ``kernel`` (``layout`` gives ONNX's,
    whose output channels are on ``out_axis``) and ``bias``, its tensors named
    ``name.*``, its output ``output`` (default ``name``); the int8 layer's instead, in
    QDQ form, if ``path`` is one, its output quantized too with ``output_scale`` if
    given (the input scale of the one int8 layer its ReLU feeds)."""
    int8 = int8_layers.get(path)
    if int8 is None:
      return node(op, [x, weight(f'{name}.weight', layout(kernel)),
                       weight(f'{name}.bias', bias)], output or name, **attributes)
    x = quantized(x, input_scale(path, name), f'{name}.input')
    # Per-axis DequantizeLinear takes no scalar zero point: 0 is its default.
    w = node('DequantizeLinear', [weight(f'{name}.weight', layout(int8['kernel']), 'i1'),
                                  weight(f'{name}.weight_scale', int8['kernel_scale'])],
             f'{name}.weight_dequantized', axis=out_axis)
    y = node(op, [x, w, weight(f'{name}.bias', int8['bias'])],
             (output or name) if output_scale is None else name, **attributes)
    return y if output_scale is None else quantized(y, output_scale, f'{name}.output')

  def squeeze_excite(x: str, block: str, se: Mapping) -> str:
    # Dense on the spatial mean == 1x1 conv on the globally pooled map, weight (out, in).
    s = node('GlobalAveragePool', [x], f'{block}.se.pool')
    for dense, activation in (('down', 'Relu'), ('up', 'Sigmoid')):
      # down's ReLU feeds only up; up's sigmoid feeds no int8 layer.
      scale = input_scale(f'{block}/se/up', f'{block}.se.up') if dense == 'down' else None
      s = layer('Conv', f'{block}/se/{dense}', f'{block}.se.{dense}', s,
                se[dense]['kernel'], se[dense]['bias'],
                lambda kernel: np.asarray(kernel).T[:, :, None, None], 0,
                output_scale=scale, kernel_shape=[1, 1])
      s = node(activation, [s], f'{block}.se.{dense}.{activation.lower()}')
    return node('Mul', [x, s], f'{block}.se')

  x = 'images'
  specs = list(layer_specs(variant))
  for spec, following in zip(specs, specs[1:] + [None]):
    block = spec.module_name
    conv = params[block]['reparam_conv']
    # A block's ReLU feeds only the next block's conv, unless squeeze-excite (which
    # multiplies the map by its gates) or the pooling and classifier come between.
    scale = None if variant.se or following is None else input_scale(
        f'{following.module_name}/reparam_conv', f'{following.module_name}.conv')
    # Flax's HWIO kernel -> ONNX's OIHW; both group the output channels the same way.
    x = layer('Conv', f'{block}/reparam_conv', f'{block}.conv', x, conv['kernel'],
              conv['bias'], lambda kernel: np.transpose(np.asarray(kernel), (3, 2, 0, 1)), 0,
              output_scale=scale, kernel_shape=[3, 3], pads=[1, 1, 1, 1],
              strides=[spec.strides, spec.strides], group=spec.groups)
    if variant.se == 'pre':
      x = squeeze_excite(x, block, params[block]['se'])
    x = node('Relu', [x], f'{block}.relu')
    if variant.se == 'post':
      x = squeeze_excite(x, block, params[block]['se'])
  x = node('GlobalAveragePool', [x], 'pool')
  output = 'logits' if num_classes else 'features'
  x = node('Flatten', [x], 'flatten' if num_classes else output, axis=1)
  if num_classes:
    linear = params['linear']
    layer('Gemm', 'linear', 'linear', x, linear['kernel'], linear['bias'], np.asarray, 1,
          output)

  graph = helper.make_graph(
      nodes, f'{model_name} deploy' + (' int8 QDQ' if int8_layers else ''),
      inputs=[helper.make_tensor_value_info(
          'images', TensorProto.FLOAT, ['batch', channels, 'height', 'width'])],
      outputs=[helper.make_tensor_value_info(
          output, TensorProto.FLOAT, ['batch', num_classes or variant.num_features])])
  opsets = [helper.make_opsetid('', opset)]
  model = helper.make_model(
      graph, opset_imports=opsets, producer_name='repvgg-jax',
      ir_version=helper.find_min_ir_version_for(opsets),
      doc_string=f'{model_name} deploy structure, NCHW float32 input, exported by '
                 'repvgg_jax.onnx_export')
  # Written into the model's own graph: make_graph and make_model copy what they get,
  # seconds for the larger variants.
  for name, array in weights.items():
    tensor = model.graph.initializer.add()
    tensor.name, tensor.raw_data = name, array.tobytes()
    tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor.dims.extend(array.shape)
  serialized = model.SerializeToString()
  onnx.checker.check_model(serialized, full_check=True)
  return serialized


def verify_onnx(model: Union[bytes, onnx.ModelProto], model_name: str,
                deploy_variables: Any, image_size: Union[int, tuple[int, int]],
                channels: int = 3, batch_sizes: Sequence[int] = (1, 3),
                tolerance: float = TOLERANCE, seed: int = 0,
                reference: Optional[Callable[[np.ndarray], Any]] = None,
                images: Optional[np.ndarray] = None) -> float:
  """Worst relative L2 error, over ``batch_sizes``, of the ONNX model run by onnxruntime
  (CPUExecutionProvider) against ``reference`` on the same random normal images of
  ``image_size`` (``size`` or ``(height, width)``), or on the leading ones of ``images``
  (NHWC float32, normalized). An int8 model wants real images: its input ranges were
  calibrated on them, and on random normal ones its activations span a few int8 steps,
  where a one-step rounding flip is a large error.

  ``reference`` maps NHWC float32 images to the outputs the ONNX model must give; None is
  the float JAX deploy model with ``deploy_variables`` (precision 'highest'). For a QDQ
  graph, the JAX int8 model with ``INT8_TOLERANCE``::

    reference=lambda x: quantization.quantized_model(deploy).apply(int8_vars, x)

  Raises:
    OnnxVerificationError: the error exceeds ``tolerance`` or the output has another
      shape.
    ValueError: ``deploy_variables`` is not the deploy tree of ``model_name``.
    ImportError: onnxruntime is not installed.
  """
  ort = _import_onnxruntime()
  if not batch_sizes or min(batch_sizes) < 1:
    raise ValueError(f'batch_sizes must be positive integers, got {tuple(batch_sizes)}')
  num_classes = check_deploy_variables(model_name, deploy_variables, None, channels)
  height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
  if images is None:
    images = np.random.default_rng(seed).standard_normal(
        (max(batch_sizes), height, width, channels), np.float32)
  elif len(images) < max(batch_sizes):
    raise ValueError(f'verify_onnx needs {max(batch_sizes)} images, got {len(images)}')
  images = np.asarray(images[:max(batch_sizes)], np.float32)
  against = 'the reference'
  if reference is None:
    against = 'the JAX deploy model'
    reference = functools.partial(exact_forward(model_name, num_classes, deploy=True),
                                  deploy_variables)
  # Images are independent in the deploy model: one JAX run (one compile) on the largest
  # batch is the reference for every batch size's leading images.
  expected = np.asarray(reference(images))
  serialized = model if isinstance(model, bytes) else model.SerializeToString()
  session = ort.InferenceSession(serialized, providers=['CPUExecutionProvider'])
  input_name = session.get_inputs()[0].name
  worst = 0.0
  for batch in batch_sizes:
    nchw = np.ascontiguousarray(images[:batch].transpose(0, 3, 1, 2))
    output, = session.run(None, {input_name: nchw})
    if output.shape != expected[:batch].shape:
      raise OnnxVerificationError(
          f'ONNX output has shape {output.shape} at batch {batch}, {against} '
          f'{expected[:batch].shape}')
    worst = max(worst, relative_error(output, expected[:batch]))
  if worst > tolerance:
    raise OnnxVerificationError(
        f'ONNX output of {model_name} differs from {against} by {worst:.3g} '
        f'(relative L2, worst of batch sizes {tuple(batch_sizes)}), above the tolerance '
        f'{tolerance:.3g}')
  return worst
