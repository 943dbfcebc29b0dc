"""ONNX export of the deploy model: onnxruntime reproduces JAX, wrong trees are refused;
the int8 model's QDQ graph reproduces qwix's."""

import collections
import contextlib
import copy
import functools
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import repvgg_jax as rv
from repvgg_jax import onnx_export
from repvgg_jax.equivalence import random_variables, relative_error

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')

# Non-square, so that a swapped height and width would show; stage 3's maps (3x4) not
# smaller than the 3x3 kernels (conftest.py says why that is slow).
HEIGHT, WIDTH = 48, 64
NUM_CLASSES = 10


@contextlib.contextmanager
def optimized_xla():
  """XLA's optimizations on, which conftest turns off for fast compiles: the deploy
  forward of the 100M-parameter variants then runs in ~1.5 s instead of ~10 s, for
  ~0.6 s more compile (reparameterize, on the contrary, compiles 1 s faster without)."""
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  try:
    yield
  finally:
    jax.config.update('jax_disable_most_optimizations', previous)


@pytest.fixture(scope='module')
def variables():
  """``variables(name)``: (training-time, deploy) variables of ``name`` with random
  weights and BN state, the last model's kept for the next test (the larger variants'
  take ~1 GB, so only one)."""
  cache = {}

  def get(name: str) -> tuple[dict, dict]:
    if name not in cache:
      cache.clear()
      train = random_variables(rv.create_model(name, NUM_CLASSES),
                               jnp.zeros((1, HEIGHT, WIDTH, 3)))
      cache[name] = train, jax.tree_util.tree_map(np.asarray,
                                                  jax.jit(rv.reparameterize)(train))
    return cache[name]

  yield get
  cache.clear()


def edited(tree, path, value=None):
  """A deep copy of ``tree`` with the leaf or subtree at ``path`` replaced by ``value``
  (deleted when None)."""
  tree = copy.deepcopy(tree)
  node = tree
  for key in path[:-1]:
    node = node[key]
  if value is None:
    del node[path[-1]]
  else:
    node[path[-1]] = value
  return tree


def refusal(name, deploy_vars, **kwargs) -> str:
  with pytest.raises(ValueError) as error:
    onnx_export.to_onnx(name, deploy_vars, **kwargs)
  message = str(error.value)
  assert '\n' not in message
  return message


def dims(value) -> list:
  return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_graph_has_symbolic_batch_height_and_width(variables):
  _, deploy_vars = variables('RepVGG-A0')
  serialized = onnx_export.to_onnx('RepVGG-A0', deploy_vars)
  model = onnx.load_from_string(serialized)
  assert model.opset_import[0].version == 17
  assert [(v.name, dims(v)) for v in model.graph.input] == [
      ('images', ['batch', 3, 'height', 'width'])]
  assert [(v.name, dims(v)) for v in model.graph.output] == [('logits', ['batch', 10])]
  assert {n.op_type for n in model.graph.node} == {'Conv', 'Relu', 'GlobalAveragePool',
                                                   'Flatten', 'Gemm'}
  session = ort.InferenceSession(serialized, providers=['CPUExecutionProvider'])
  for shape in [(2, 3, HEIGHT, WIDTH), (1, 3, 64, 32), (1, 3, 21, 37)]:
    images = np.random.default_rng(0).standard_normal(shape, np.float32)
    logits, = session.run(None, {'images': images})
    assert logits.shape == (shape[0], NUM_CLASSES)
    if shape[0] == 2:
      # Different images, different logits: the comparisons with JAX are not of constants.
      assert np.abs(logits[0] - logits[1]).max() > 1e-3
  # verify_onnx takes the parsed proto as well as the bytes.
  assert onnx_export.verify_onnx(model, 'RepVGG-A0', deploy_vars, (HEIGHT, WIDTH)) <= 1e-5


def test_opset_11_and_no_classifier(variables):
  """The oldest accepted opset, and a tree without ``linear`` (num_classes=0): the pooled
  features are the output, as the JAX model returns them."""
  _, deploy_vars = variables('RepVGG-A0')
  serialized = onnx_export.to_onnx('RepVGG-A0', deploy_vars, opset=11)
  assert onnx.load_from_string(serialized).opset_import[0].version == 11
  assert onnx_export.verify_onnx(serialized, 'RepVGG-A0', deploy_vars, (HEIGHT, WIDTH)) <= 1e-5
  features_vars = {'params': {k: v for k, v in deploy_vars['params'].items() if k != 'linear'}}
  serialized = onnx_export.to_onnx('RepVGG-A0', features_vars)
  model = onnx.load_from_string(serialized)
  assert [v.name for v in model.graph.output] == ['features']
  assert onnx_export.verify_onnx(serialized, 'RepVGG-A0', features_vars, (HEIGHT, WIDTH)) <= 1e-5


def test_a_wrong_onnx_model_fails_verification(variables):
  _, deploy_vars = variables('RepVGG-A0')
  bias = deploy_vars['params']['stage4_0']['reparam_conv']['bias']
  wrong = edited(deploy_vars, ('params', 'stage4_0', 'reparam_conv', 'bias'), bias + 0.5)
  serialized = onnx_export.to_onnx('RepVGG-A0', wrong)
  with pytest.raises(onnx_export.OnnxVerificationError, match='above the tolerance 1e-05'):
    onnx_export.verify_onnx(serialized, 'RepVGG-A0', deploy_vars, (HEIGHT, WIDTH))


@pytest.mark.parametrize('name', rv.list_models())
def test_the_deploy_tree_of_every_model_is_accepted(name):
  """What to_onnx expects is what the deploy model's init creates (shapes only)."""
  model = rv.create_model(name, NUM_CLASSES, deploy=True)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, HEIGHT, WIDTH, 3), jnp.float32))
  assert onnx_export.check_deploy_variables(name, shapes) == NUM_CLASSES


def test_training_time_tree_is_refused(variables):
  train, _ = variables('RepVGG-A0')
  assert 'reparameterize first' in refusal('RepVGG-A0', train)
  # Without its batch_stats, by the branches.
  assert 'reparameterize first' in refusal('RepVGG-A0', {'params': train['params']})


@pytest.mark.parametrize('side', [4, 6])
def test_winograd_kernels_are_refused(side, variables):
  _, deploy_vars = variables('RepVGG-A0')
  # The shape winograd.transform_kernels gives a stride-1 kernel ('winograd2': 4x4,
  # 'winograd4': 6x6).
  path = ('params', 'stage1_1', 'reparam_conv', 'kernel')
  tree = edited(deploy_vars, path, np.zeros((side, side, 48, 48), np.float32))
  message = refusal('RepVGG-A0', tree)
  assert f'stage1_1/reparam_conv/kernel has shape ({side}, {side}, 48, 48)' in message
  assert 'Winograd' in message and '(3, 3, in/groups, out)' in message


@pytest.mark.parametrize('edit, kwargs, expected', [
    (('stage2_3', None), {}, 'stage2_3/reparam_conv/kernel missing'),
    (('stage9_0', {'reparam_conv': {'kernel': np.zeros((3, 3, 1, 1)), 'bias': np.zeros(1)}}),
     {}, 'stage9_0/reparam_conv/kernel unexpected'),
    (('stage1_0', 'reparam_conv', 'bias', np.zeros(7)), {},
     'stage1_0/reparam_conv/bias has shape (7,), expected (48,)'),
    ((), {'num_classes': 5}, 'linear/kernel has shape (1280, 10), expected (1280, 5)'),
    ((), {'channels': 1}, 'stage0/reparam_conv/kernel has shape (3, 3, 3, 48), expected '
                          '(3, 3, 1, 48)'),
])
def test_a_tree_of_another_model_is_refused(edit, kwargs, expected, variables):
  _, deploy_vars = variables('RepVGG-A0')
  if edit:
    *path, value = edit
    deploy_vars = edited(deploy_vars, ('params', *path), value)
  message = refusal('RepVGG-A0', deploy_vars, **kwargs)
  assert message.startswith('not a deploy RepVGG-A0') and expected in message


def test_unknown_model_and_opset_are_refused(variables):
  _, deploy_vars = variables('RepVGG-A0')
  assert 'unknown model' in refusal('RepVGG-Z9', deploy_vars)
  assert 'accepted 11 to' in refusal('RepVGG-A0', deploy_vars, opset=9)


def test_a_missing_package_is_named_with_its_install_command(variables, monkeypatch):
  _, deploy_vars = variables('RepVGG-A0')
  install = r"pip install 'repvgg-jax\[onnx\]' \(or pip install {}\)"
  monkeypatch.setitem(sys.modules, 'onnx', None)  # `import onnx` now raises ImportError.
  with pytest.raises(ImportError, match=install.format('onnx')):
    onnx_export.to_onnx('RepVGG-A0', deploy_vars)
  monkeypatch.setitem(sys.modules, 'onnxruntime', None)
  with pytest.raises(ImportError, match=install.format('onnxruntime')):
    onnx_export.verify_onnx(b'', 'RepVGG-A0', deploy_vars, (HEIGHT, WIDTH))


@pytest.fixture(scope='module')
def int8_a0(variables):
  """RepVGG-A0's deploy variables, ``int8_layers`` of its int8 model with every layer in
  int8 (``keep_float=()``: the Gemm and the stem, whose input, the image, is signed, too),
  and that model's jitted JAX ``forward`` and ``layer_inputs`` of images. The ranges are
  half the maxima calibrated on two images, so that the test images exceed them: both
  saturate, to [-128, 127]."""
  quantization = pytest.importorskip('repvgg_jax.quantization')  # needs qwix
  _, deploy_vars = variables('RepVGG-A0')
  model = rv.create_model('RepVGG-A0', NUM_CLASSES, deploy=True)
  images = np.random.default_rng(1).standard_normal((2, HEIGHT, WIDTH, 3), np.float32)
  ranges = quantization.calibrate(model, deploy_vars, [images])
  int8_vars = quantization.quantize(model, deploy_vars, {k: r / 2 for k, r in ranges.items()},
                                    keep_float=())
  int8_model = quantization.quantized_model(model, keep_float=())
  inputs = jax.jit(lambda v, x: quantization.layer_inputs(int8_model, v, x))
  return types.SimpleNamespace(
      deploy_vars=deploy_vars, layers=quantization.int8_layers(int8_vars),
      forward=functools.partial(jax.jit(int8_model.apply), int8_vars),
      layer_inputs=functools.partial(inputs, int8_vars))


def onnx_name(path: str) -> str:
  """The ONNX name of a layer's tensors: 'stage1_0/reparam_conv' -> 'stage1_0.conv'."""
  return path.replace('/reparam_conv', '.conv').replace('/', '.')


def test_qdq_graph_reproduces_the_jax_int8_model(int8_a0):
  serialized = onnx_export.to_onnx('RepVGG-A0', int8_a0.deploy_vars, int8_layers=int8_a0.layers)
  error = onnx_export.verify_onnx(serialized, 'RepVGG-A0', int8_a0.deploy_vars, (HEIGHT, WIDTH),
                                  reference=int8_a0.forward,
                                  tolerance=onnx_export.INT8_TOLERANCE)
  assert error <= onnx_export.INT8_TOLERANCE
  # The bar tells the int8 model from the float one.
  with pytest.raises(onnx_export.OnnxVerificationError, match='differs from the reference'):
    onnx_export.verify_onnx(onnx_export.to_onnx('RepVGG-A0', int8_a0.deploy_vars), 'RepVGG-A0',
                            int8_a0.deploy_vars, (HEIGHT, WIDTH), reference=int8_a0.forward,
                            tolerance=onnx_export.INT8_TOLERANCE)


def cut_at_int8_inputs(serialized: bytes) -> tuple[bytes, dict[str, str]]:
  """The QDQ graph with each QuantizeLinear fed by a new graph input ``<tensor>.given``
  instead of ``<tensor>`` (but the images), which becomes an output; and, by the ONNX name
  of each int8 layer, its input tensor's name."""
  model = onnx.load_from_string(serialized)
  tensors = {}
  for node in model.graph.node:
    if node.name.endswith('.input_quantized'):
      tensor = tensors[node.name[:-len('.input_quantized')]] = node.input[0]
      if tensor != 'images':
        node.input[0] = f'{tensor}.given'
        model.graph.input.append(onnx.helper.make_tensor_value_info(
            node.input[0], onnx.TensorProto.FLOAT, None))
        model.graph.output.append(onnx.helper.make_tensor_value_info(
            tensor, onnx.TensorProto.FLOAT, None))
  return model.SerializeToString(), tensors


@pytest.mark.parametrize('left_float', [None, 'stage3_5/reparam_conv'])
def test_each_qdq_layer_reproduces_the_jax_int8_layer_on_its_input(int8_a0, left_float):
  """Each int8 layer of the graph is fed the input it has in the JAX int8 model (a cut
  graph), so that one layer's error shows: in the whole graph, the rounding flips of the
  earlier layers' inputs (float32 sums, and XLA:CPU multiplying by the scale's reciprocal
  where QuantizeLinear divides) cascade into ~1% of the logits, as much as one layer left
  in float. What each layer gives the next is compared as the next one quantizes it (the
  graph quantizes a conv's output already, for onnxruntime's QLinearConv): the same int8
  values but for one-step flips, from float32 rounding (up to 2.5e-4 of a layer's input
  with onnxruntime's optimizations off) and QLinearConv's own requantization of its int32
  sums (up to 1.2e-3 with them, the graph that runs); one layer left in float moves it by
  ~5%."""
  layers = {k: v for k, v in int8_a0.layers.items() if k != left_float}
  serialized, tensors = cut_at_int8_inputs(
      onnx_export.to_onnx('RepVGG-A0', int8_a0.deploy_vars, int8_layers=layers))
  session = ort.InferenceSession(serialized, providers=['CPUExecutionProvider'])
  images = np.random.default_rng(0).standard_normal((3, HEIGHT, WIDTH, 3), np.float32)
  # NHWC -> NCHW; the classifier's input is [batch, features] in both.
  inputs = {onnx_name(k): np.asarray(v).transpose(0, 3, 1, 2) if np.ndim(v) == 4 else
            np.asarray(v) for k, v in int8_a0.layer_inputs(images).items()}
  feeds = {f'{tensors[k]}.given': np.ascontiguousarray(x) for k, x in inputs.items()
           if k in tensors and tensors[k] != 'images'}
  output_names = [o.name for o in session.get_outputs()]
  outputs = dict(zip(output_names, session.run(
      None, {'images': np.ascontiguousarray(images.transpose(0, 3, 1, 2)), **feeds})))
  scales = {onnx_name(k): layer['input_scale'] for k, layer in layers.items()}

  def quantized(x, layer):
    return np.clip(np.round(x / scales[layer]), -128, 127) * scales[layer]

  # The input of each int8 layer, from the layer before it; the logits, from the Gemm.
  errors = {k: relative_error(quantized(outputs[tensors[k]], k), quantized(inputs[k], k))
            for k in tensors if tensors[k] != 'images'}
  errors['logits'] = relative_error(outputs['logits'], int8_a0.forward(images))
  if left_float is None:
    assert max(errors.values()) <= 5e-3, errors
  else:
    assert errors['stage3_6.conv'] > 1e-2


def test_qdq_graph_quantizes_exactly_the_int8_layers(int8_a0):
  """The default keep_float: the stem and the classifier stay float. An int8 conv's
  output is quantized with the next int8 conv's input scale, but the last one's (the
  pooling and the float classifier follow)."""
  deploy_vars = int8_a0.deploy_vars
  layers = {k: v for k, v in int8_a0.layers.items()
            if k.split('/')[0] not in ('stage0', 'linear')}
  model = onnx.load_from_string(
      onnx_export.to_onnx('RepVGG-A0', deploy_vars, int8_layers=layers))
  assert model.opset_import[0].version == 17
  producer = {n.output[0]: n for n in model.graph.node}
  consumer = {i: n for n in model.graph.node for i in n.input}
  initializer = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
  int8_names = {onnx_name(path) for path in layers}
  layer_nodes = [n for n in model.graph.node if n.op_type in ('Conv', 'Gemm')]
  assert len(layer_nodes) == len(layers) + 2
  following = {n.name: f'{m.name}.input_scale' for n, m in zip(layer_nodes, layer_nodes[1:])}
  for node in layer_nodes:
    name = node.input[2][:-len('.bias')]  # stage1_0.conv, linear
    x, weight = producer.get(node.input[0]), producer.get(node.input[1])
    if name not in int8_names:
      assert name in ('stage0.conv', 'linear') and weight is None
      assert initializer[node.input[1]].dtype == np.float32
      continue
    assert x.op_type == 'DequantizeLinear' and producer[x.input[0]].op_type == 'QuantizeLinear'
    assert producer[x.input[0]].input[1:] == x.input[1:] == [f'{name}.input_scale',
                                                             'int8.zero_point']
    assert weight.op_type == 'DequantizeLinear' and weight.input[1] == f'{name}.weight_scale'
    assert [(a.name, a.i) for a in weight.attribute] == [('axis', 0)]
    assert initializer[weight.input[0]].dtype == np.int8
    assert initializer[node.input[2]].dtype == np.float32
    output = consumer[node.output[0]]
    if name == 'stage4_0.conv':
      assert output.op_type == 'Relu'
    else:
      assert output.op_type == 'QuantizeLinear' and output.input[1] == following[name]
      assert consumer[output.output[0]].op_type == 'DequantizeLinear'
  counts = collections.Counter(n.op_type for n in model.graph.node)
  # Each int8 layer's input and weight, and the outputs of all but the last.
  assert counts['QuantizeLinear'] == 2 * len(layers) - 1
  assert counts['DequantizeLinear'] == 3 * len(layers) - 1
  assert initializer['int8.zero_point'].dtype == np.int8 and initializer['int8.zero_point'] == 0
  # Flax's HWIO int8 kernel in ONNX's OIHW, its scales and the input's as they are.
  layer = layers['stage2_1/reparam_conv']
  np.testing.assert_array_equal(initializer['stage2_1.conv.weight'],
                                layer['kernel'].transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(initializer['stage2_1.conv.weight_scale'], layer['kernel_scale'])
  assert initializer['stage2_1.conv.input_scale'] == layer['input_scale']


def test_onnxruntime_fuses_the_int8_convs_into_qlinearconv(int8_a0, tmp_path):
  """Every int8 conv whose output is quantized runs as onnxruntime's QLinearConv, int8 in
  and out (without the output Q it runs float convs on dequantized values, slower than
  the float graph): with every layer int8, all convs but the last (stage4_0, before the
  pooling)."""
  serialized = onnx_export.to_onnx('RepVGG-A0', int8_a0.deploy_vars, int8_layers=int8_a0.layers)
  options = ort.SessionOptions()
  options.optimized_model_filepath = str(tmp_path / 'optimized.onnx')
  ort.InferenceSession(serialized, options, providers=['CPUExecutionProvider'])
  counts = collections.Counter(
      n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
  assert counts['QLinearConv'] == 21 and counts['Conv'] + counts['FusedConv'] == 1


@pytest.mark.parametrize('name', ['RepVGG-D2se', 'RepVGGplus-L2pse'])
def test_with_squeeze_excite_only_its_down_conv_output_is_quantized(name):
  """Squeeze-excite multiplies a block's map by its gates, so no block conv's output
  feeds one int8 conv alone; in squeeze-excite, down -> ReLU feeds only up. Every layer
  int8; zero weights of the deploy tree's shapes (the structure is what is checked, and
  the draw and calibration of these 100M-parameter variants cost seconds)."""
  model = rv.create_model(name, NUM_CLASSES, deploy=True)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, HEIGHT, WIDTH, 3), jnp.float32))
  deploy_vars = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  flat = traverse_util.flatten_dict(deploy_vars['params'], sep='/')
  layers = {path[:-len('/kernel')]: {
      'kernel': np.zeros(kernel.shape, np.int8),
      'kernel_scale': np.ones(kernel.shape[-1:], np.float32),
      'input_scale': np.float32(1), 'bias': flat[f'{path[:-len("kernel")]}bias']}
            for path, kernel in flat.items() if path.endswith('/kernel')}
  graph = onnx.load_from_string(onnx_export.to_onnx(name, deploy_vars, int8_layers=layers))
  quantized_outputs = {n.name[:-len('.output_quantized')] for n in graph.graph.node
                       if n.name.endswith('.output_quantized')}
  se_downs = {onnx_name(path) for path in layers if path.endswith('/se/down')}
  assert len(se_downs) == 48 and quantized_outputs == se_downs


def test_int8_layers_of_another_model_or_opset_11_are_refused(int8_a0):
  deploy_vars, layers = int8_a0.deploy_vars, int8_a0.layers
  assert 'accepted 13 to' in refusal('RepVGG-A0', deploy_vars, opset=11, int8_layers=layers)
  stem = layers['stage0/reparam_conv']
  for wrong, expected in [
      ({'stage9_0/reparam_conv': stem},
       "int8 layer 'stage9_0/reparam_conv' is no conv or linear layer of RepVGG-A0"),
      ({'stage1_0/reparam_conv': stem}, "int8 layer 'stage1_0/reparam_conv': kernel has shape "
                                        '(3, 3, 3, 48), expected (3, 3, 48, 48)'),
      ({'stage0/reparam_conv': {**stem, 'kernel': stem['kernel'].astype(np.float32)}},
       'kernel has dtype float32, expected int8'),
      ({'stage0/reparam_conv': {'kernel': stem['kernel']}}, 'expected the tensors'),
  ]:
    assert expected in refusal('RepVGG-A0', deploy_vars, int8_layers=wrong)


# Last, so that the A0 variables drawn for the tests above serve its first case and the
# larger variants' are drawn once each. A0; B1g4 (grouped convs); D2se (SE before the
# ReLU). RepVGGplus-L2pse (SE after it) is left to the graph-structure tests: its exact
# run cost ~45 s of make test's 10-minute budget.
@pytest.mark.parametrize('name', ['RepVGG-A0', 'RepVGG-B1g4', 'RepVGG-D2se'])
def test_onnxruntime_reproduces_the_jax_deploy_model(name, variables):
  _, deploy_vars = variables(name)
  serialized = onnx_export.to_onnx(name, deploy_vars)
  with optimized_xla():
    error = onnx_export.verify_onnx(serialized, name, deploy_vars, (HEIGHT, WIDTH),
                                    batch_sizes=(1, 3))
  assert error <= 1e-5
