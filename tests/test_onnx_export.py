"""ONNX export of the deploy model: onnxruntime reproduces JAX, wrong trees are refused."""

import contextlib
import copy
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax import onnx_export
from repvgg_jax.equivalence import random_variables

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')

# Non-square, so that a swapped height and width would show.
HEIGHT, WIDTH = 32, 48
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


# Last, so that the A0 variables drawn for the tests above serve its first case and the
# larger variants' are drawn once each. A0; B1g4 (grouped convs); D2se (SE before the
# ReLU); RepVGGplus-L2pse (SE after it).
@pytest.mark.parametrize('name', ['RepVGG-A0', 'RepVGG-B1g4', 'RepVGG-D2se',
                                  'RepVGGplus-L2pse'])
def test_onnxruntime_reproduces_the_jax_deploy_model(name, variables):
  _, deploy_vars = variables(name)
  serialized = onnx_export.to_onnx(name, deploy_vars)
  with optimized_xla():
    error = onnx_export.verify_onnx(serialized, name, deploy_vars, (HEIGHT, WIDTH),
                                    batch_sizes=(1, 3))
  assert error <= 1e-5
