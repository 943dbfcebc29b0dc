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
``linear.{weight,bias}``. Images are normalized as for the JAX model (the graph does
no preprocessing).
"""

from __future__ import annotations

from collections.abc import Mapping
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


def to_onnx(model_name: str, deploy_variables: Any, num_classes: Optional[int] = None,
            channels: int = 3, opset: int = DEFAULT_OPSET) -> bytes:
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
    opset: ONNX default-domain opset, from 11 to the newest the installed onnx knows.

  Raises:
    ValueError: an unknown model or opset, or a tree that is not the deploy tree of the
      model (training-time, Winograd-transformed, other blocks or shapes).
  """
  onnx = _import_onnx()
  from onnx import TensorProto, helper
  newest = onnx.defs.onnx_opset_version()
  if not MIN_OPSET <= opset <= newest:
    raise ValueError(f'opset {opset} not supported: accepted {MIN_OPSET} to {newest}')
  variant = get_variant(model_name)
  num_classes = check_deploy_variables(model_name, deploy_variables, num_classes, channels)
  params = deploy_variables['params']
  nodes, weights = [], {}

  def weight(name: str, array: Any) -> str:
    weights[name] = np.asarray(array, '<f4')  # ONNX raw_data is little-endian float32.
    return name

  def node(op: str, inputs: list[str], output: str, **attributes: Any) -> str:
    nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
    return output

  def squeeze_excite(x: str, block: str, se: Mapping) -> str:
    # Dense on the spatial mean == 1x1 conv on the globally pooled map, weight (out, in).
    s = node('GlobalAveragePool', [x], f'{block}.se.pool')
    for layer, activation in (('down', 'Relu'), ('up', 'Sigmoid')):
      kernel = np.asarray(se[layer]['kernel']).T[:, :, None, None]
      s = node('Conv', [s, weight(f'{block}.se.{layer}.weight', kernel),
                        weight(f'{block}.se.{layer}.bias', se[layer]['bias'])],
               f'{block}.se.{layer}', kernel_shape=[1, 1])
      s = node(activation, [s], f'{block}.se.{layer}.{activation.lower()}')
    return node('Mul', [x, s], f'{block}.se')

  x = 'images'
  for spec in layer_specs(variant):
    block = spec.module_name
    conv = params[block]['reparam_conv']
    # Flax's HWIO kernel -> ONNX's OIHW; both group the output channels the same way.
    kernel = np.transpose(np.asarray(conv['kernel']), (3, 2, 0, 1))
    x = node('Conv', [x, weight(f'{block}.conv.weight', kernel),
                      weight(f'{block}.conv.bias', conv['bias'])],
             f'{block}.conv', kernel_shape=[3, 3], pads=[1, 1, 1, 1],
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
    node('Gemm', [x, weight('linear.weight', linear['kernel']),
                  weight('linear.bias', linear['bias'])], output)

  graph = helper.make_graph(
      nodes, f'{model_name} deploy',
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
    tensor.name, tensor.data_type, tensor.raw_data = name, TensorProto.FLOAT, array.tobytes()
    tensor.dims.extend(array.shape)
  serialized = model.SerializeToString()
  onnx.checker.check_model(serialized, full_check=True)
  return serialized


def verify_onnx(model: Union[bytes, onnx.ModelProto], model_name: str,
                deploy_variables: Any, image_size: Union[int, tuple[int, int]],
                channels: int = 3, batch_sizes: Sequence[int] = (1, 3),
                tolerance: float = TOLERANCE, seed: int = 0) -> float:
  """Worst relative L2 error, over ``batch_sizes``, of the ONNX model run by onnxruntime
  (CPUExecutionProvider) against the JAX deploy model (float32, precision 'highest') on
  the same random normal images of ``image_size`` (``size`` or ``(height, width)``).

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
  images = np.random.default_rng(seed).standard_normal(
      (max(batch_sizes), height, width, channels), np.float32)
  # Images are independent in the deploy model: one JAX run (one compile) on the largest
  # batch is the reference for every batch size's leading images.
  forward = exact_forward(model_name, num_classes, deploy=True)
  reference = np.asarray(forward(deploy_variables, images))
  serialized = model if isinstance(model, bytes) else model.SerializeToString()
  session = ort.InferenceSession(serialized, providers=['CPUExecutionProvider'])
  input_name = session.get_inputs()[0].name
  worst = 0.0
  for batch in batch_sizes:
    nchw = np.ascontiguousarray(images[:batch].transpose(0, 3, 1, 2))
    output, = session.run(None, {input_name: nchw})
    if output.shape != reference[:batch].shape:
      raise OnnxVerificationError(
          f'ONNX output has shape {output.shape} at batch {batch}, the JAX deploy model '
          f'{reference[:batch].shape}')
    worst = max(worst, relative_error(output, reference[:batch]))
  if worst > tolerance:
    raise OnnxVerificationError(
        f'ONNX output of {model_name} differs from the JAX deploy model by {worst:.3g} '
        f'(relative L2, worst of batch sizes {tuple(batch_sizes)}), above the tolerance '
        f'{tolerance:.3g}')
  return worst
