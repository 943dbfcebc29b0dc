"""The model zoo: names, official sizes, structure of both graphs, and block semantics."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax.blocks import BN_EPSILON, RepVGGBlock
from repvgg_jax.convolution import conv_layer
from repvgg_jax.equivalence import random_variables, relative_error

OFFICIAL_NAMES = [
    'RepVGG-A0', 'RepVGG-A1', 'RepVGG-A2', 'RepVGG-B0', 'RepVGG-B1', 'RepVGG-B1g2',
    'RepVGG-B1g4', 'RepVGG-B2', 'RepVGG-B2g2', 'RepVGG-B2g4', 'RepVGG-B3', 'RepVGG-B3g2',
    'RepVGG-B3g4', 'RepVGG-D2se', 'RepVGGplus-L2pse']

# Millions of trainable parameters (running statistics excluded), 1000 classes, from the
# official definitions: (training-time, deploy).
OFFICIAL_PARAMS = {
    'RepVGG-A0': (9.11, 8.31), 'RepVGG-A1': (14.09, 12.79), 'RepVGG-A2': (28.21, 25.50),
    'RepVGG-B0': (15.82, 14.34), 'RepVGG-B1': (57.42, 51.83), 'RepVGG-B1g2': (45.78, 41.36),
    'RepVGG-B1g4': (39.97, 36.13), 'RepVGG-B2': (89.02, 80.32), 'RepVGG-B2g2': (70.85, 63.96),
    'RepVGG-B2g4': (61.76, 55.78), 'RepVGG-B3': (123.09, 110.96),
    'RepVGG-B3g2': (96.91, 87.40), 'RepVGG-B3g4': (83.83, 75.63),
    'RepVGG-D2se': (133.33, 120.39)}

# Deploy GFLOPs (multiply-accumulates) at 224x224 from the official README's table.
OFFICIAL_GMACS = {
    'RepVGG-A0': 1.4, 'RepVGG-A1': 2.4, 'RepVGG-A2': 5.1, 'RepVGG-B0': 3.1,
    'RepVGG-B1': 11.8, 'RepVGG-B1g2': 8.8, 'RepVGG-B1g4': 7.3, 'RepVGG-B2': 18.4,
    'RepVGG-B2g4': 11.3, 'RepVGG-B3': 26.2, 'RepVGG-B3g4': 16.1, 'RepVGG-D2se': 32.8}

X224 = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)


def param_shapes(name, deploy=False, **kwargs):
  model = rv.create_model(name, deploy=deploy, **kwargs)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), X224)


def test_list_models_gives_every_official_variant_in_order():
  assert rv.list_models() == OFFICIAL_NAMES


def test_unknown_name_raises_value_error_listing_valid_names():
  with pytest.raises(ValueError, match='RepVGG-C9.*RepVGG-A0.*RepVGGplus-L2pse'):
    rv.create_model('RepVGG-C9')


@pytest.mark.parametrize('name', OFFICIAL_PARAMS)
def test_parameter_counts_match_official_definitions(name):
  train, deploy = OFFICIAL_PARAMS[name]
  assert rv.count_params(param_shapes(name)['params']) / 1e6 == pytest.approx(train, abs=0.01)
  assert rv.count_params(param_shapes(name, True)['params']) / 1e6 == pytest.approx(
      deploy, abs=0.01)


@pytest.mark.parametrize('name', OFFICIAL_GMACS)
def test_deploy_macs_match_official_table(name):
  assert rv.deploy_macs(name, 224) / 1e9 == pytest.approx(OFFICIAL_GMACS[name], abs=0.05)


@pytest.mark.parametrize('name,groups', [('RepVGG-B1g2', 2), ('RepVGG-B2g4', 4)])
def test_groupwise_variants_group_exactly_the_even_layers_2_to_26(name, groups):
  params = param_shapes(name)['params']
  grouped = []
  for layer, spec in enumerate(rv.layer_specs(rv.get_variant(name))):
    key = 'stage0' if spec.stage == 'stage0' else f'{spec.stage}_{spec.index}'
    kernel = params[key]['conv3x3']['conv']['kernel']
    in_channels = 3 if layer == 0 else prev_features
    if kernel.shape[2] * groups == in_channels:
      grouped.append(layer)
    else:
      assert kernel.shape[2] == in_channels
    prev_features = spec.features
  assert grouped == list(range(2, 27, 2))


def test_deploy_structure_is_a_plain_stack_of_biased_3x3_convs():
  params = param_shapes('RepVGG-B1g4', deploy=True)['params']
  blocks = {k: v for k, v in params.items() if k != 'linear'}
  assert len(blocks) == 1 + 4 + 6 + 16 + 1
  for block in blocks.values():
    assert set(block) == {'reparam_conv'}
    assert block['reparam_conv']['kernel'].shape[:2] == (3, 3)
  assert 'batch_stats' not in param_shapes('RepVGG-B1g4', deploy=True)


def test_repvggplus_training_returns_aux_logits_and_deploy_drops_them():
  x = jnp.zeros((1, 64, 64, 3))
  tree = jax.eval_shape(rv.create_model('RepVGGplus-L2pse', num_classes=10).init,
                        jax.random.PRNGKey(0), x)
  assert {'stage1_aux', 'stage2_aux', 'stage3_first_aux'} <= set(tree['params'])
  assert len([k for k in tree['params'] if k.startswith('stage3_first_')]) == 12 + 1
  assert len([k for k in tree['params'] if k.startswith('stage3_second_')]) == 12
  # The stem and every block of RepVGGplus carry a post-ReLU SE with reduction 4.
  assert tree['params']['stage4_0']['se']['down']['kernel'].shape == (2560, 640)
  deploy = jax.eval_shape(rv.create_model('RepVGGplus-L2pse', 10, deploy=True).init,
                          jax.random.PRNGKey(0), x)
  assert not any(k.endswith('_aux') for k in deploy['params'])


def _tiny_plus():
  """RepVGGplus-L2pse's code path on a model small enough to run in a test."""
  return rv.RepVGG(rv.Variant('tiny-plus', (1, 1, 2, 1), (0.25, 0.25, 0.25, 0.25),
                              se='post', plus=True), num_classes=5)


def test_repvggplus_forward_in_every_mode():
  model, x = _tiny_plus(), jnp.ones((2, 32, 40, 3))
  variables = random_variables(model, x)
  out, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, x)
  assert set(out) == {'main', 'stage1_aux', 'stage2_aux', 'stage3_first_aux'}
  assert all(v.shape == (2, 5) for v in out.values())
  assert set(updates['batch_stats']) == set(variables['batch_stats'])
  logits = jax.jit(model.apply)(variables, x)
  assert logits.shape == (2, 5)
  deploy = model.clone(deploy=True)
  assert relative_error(jax.jit(deploy.apply)(rv.reparameterize(variables), x), logits) < 1e-5


def test_training_mode_updates_running_statistics():
  model, x = rv.create_model('RepVGG-A0', num_classes=3), jnp.ones((2, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  logits, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, x)
  assert logits.shape == (2, 3)
  before = variables['batch_stats']['stage1_1']['identity']['mean']
  after = updates['batch_stats']['stage1_1']['identity']['mean']
  assert not np.allclose(before, after)


@pytest.mark.parametrize('shape', [(1, 32, 32, 3), (2, 33, 47, 3), (1, 40, 32, 1)])
def test_any_input_of_at_least_32x32_and_any_channel_count_works(shape):
  model = rv.create_model('RepVGG-A0', num_classes=7)
  x = jnp.ones(shape)
  logits = jax.jit(model.apply)(jax.jit(model.init)(jax.random.PRNGKey(0), x), x)
  assert logits.shape == (shape[0], 7) and logits.dtype == jnp.float32


def test_num_classes_zero_returns_pooled_features():
  model, x = rv.create_model('RepVGG-A0', num_classes=0), jnp.ones((2, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  assert 'linear' not in variables['params']
  assert jax.jit(model.apply)(variables, x).shape == (2, 1280)


def test_kernel_init_sets_every_training_conv_kernel_and_nothing_else():
  # A small RepVGGplus: squeeze-excite, auxiliary heads and every branch kind.
  variant = rv.Variant('test-plus', (1, 1, 2, 1), (0.125,) * 4, se='post', plus=True)
  init = lambda **kw: jax.jit(rv.RepVGG(variant, 10, **kw).init)(jax.random.PRNGKey(0),
                                                                 jnp.zeros((1, 32, 32, 3)))
  default = dict(jax.tree_util.tree_flatten_with_path(init())[0])
  ones = dict(jax.tree_util.tree_flatten_with_path(init(kernel_init=nn.initializers.ones))[0])
  assert ones.keys() == default.keys()
  conv_kernels = 0
  for path, leaf in ones.items():
    names = [getattr(k, 'key', '') for k in path]
    if names[-2:] == ['conv', 'kernel']:  # conv3x3, conv1x1, the aux heads' downsample
      conv_kernels += 1
      assert np.all(leaf == 1), names
    else:
      np.testing.assert_array_equal(leaf, default[path], err_msg=str(names))
  assert conv_kernels == 2 * 6 + 3  # two branches per block, one per aux head


def test_bfloat16_computes_in_bfloat16_with_float32_params():
  model, x = rv.create_model('RepVGG-A0', 10, dtype=jnp.bfloat16), jnp.ones((1, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
  features = jax.eval_shape(lambda v, x: model.apply(v, x, method='features'), variables, x)
  assert all(f.dtype == jnp.bfloat16 for f in features.values())
  assert jax.jit(model.apply)(variables, x).dtype == jnp.float32


@pytest.mark.parametrize('name', ['RepVGG-A0', 'RepVGGplus-L2pse'])
def test_features_are_a_pyramid_at_strides_2_to_32_in_both_structures(name):
  x = jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32)
  for deploy in (False, True):
    model = rv.create_model(name, deploy=deploy)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    features = jax.eval_shape(lambda v, x: model.apply(v, x, method='features'),
                              variables, x)
    assert list(features) == ['stage0', 'stage1', 'stage2', 'stage3', 'stage4']
    widths = [rv.get_variant(name).stem_width, *rv.get_variant(name).stage_widths]
    for (key, f), stride, width in zip(features.items(), (2, 4, 8, 16, 32), widths):
      assert f.shape == (1, 64 // stride, -(-96 // stride), width), key


def test_features_agree_between_structures(images):
  model = rv.create_model('RepVGG-A0', precision='highest')
  variables = random_variables(model, images)
  train = jax.jit(lambda v, x: model.apply(v, x, method='features'))(variables, images)
  deploy = jax.jit(lambda v, x: model.clone(deploy=True).apply(v, x, method='features'))(
      rv.reparameterize(variables), images)
  for key in train:
    assert relative_error(deploy[key], train[key]) < 1e-5, key


def _conv(x, kernel, stride, groups):
  pad = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), [(pad, pad)] * 2, feature_group_count=groups,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision='highest')


def _bn(x, params, stats):
  return (x - stats['mean']) / jnp.sqrt(stats['var'] + BN_EPSILON) * params['scale'] + params[
      'bias']


def _se(x, p):
  s = jnp.mean(x, axis=(1, 2), keepdims=True)
  s = jax.nn.relu(s @ p['down']['kernel'] + p['down']['bias'])
  return x * jax.nn.sigmoid(s @ p['up']['kernel'] + p['up']['bias'])


@pytest.mark.parametrize('se', [None, 'pre', 'post'])
@pytest.mark.parametrize('strides,groups,in_channels', [(1, 1, 16), (1, 2, 16), (2, 1, 8)])
def test_training_block_is_relu_of_three_branch_sum(se, strides, groups, in_channels):
  """ReLU(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x)), SE before ('pre') or after the ReLU."""
  block = RepVGGBlock(16, strides=strides, groups=groups, se=se, se_reduction=4,
                      conv=conv_layer(precision='highest'),
                      dense=functools.partial(nn.Dense, precision='highest'))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 14, in_channels))
  v = random_variables(block, x)
  p, s = v['params'], v['batch_stats']
  y = (_bn(_conv(x, p['conv3x3']['conv']['kernel'], strides, groups),
           p['conv3x3']['bn'], s['conv3x3']['bn'])
       + _bn(_conv(x, p['conv1x1']['conv']['kernel'], strides, groups),
             p['conv1x1']['bn'], s['conv1x1']['bn']))
  assert ('identity' in p) == (strides == 1 and in_channels == 16)
  if 'identity' in p:
    y = y + _bn(x, p['identity'], s['identity'])
  if se == 'pre':
    y = _se(y, p['se'])
  y = jax.nn.relu(y)
  if se == 'post':
    y = _se(y, p['se'])
  assert relative_error(block.apply(v, x), y) < 1e-6


def test_squeeze_excite_pools_the_whole_non_square_map():
  block = RepVGGBlock(16, se='pre', se_reduction=4, deploy=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 11, 16))
  v = random_variables(block, x)
  p = v['params']
  y = jax.nn.relu(_se(_conv(x, p['reparam_conv']['kernel'], 1, 1) + p['reparam_conv']['bias'],
                      p['se']))
  assert relative_error(block.apply(v, x), y) < 1e-6


def test_non_image_input_is_a_clear_error():
  model = rv.create_model('RepVGG-A0')
  with pytest.raises(ValueError, match='NHWC'):
    model.init(jax.random.PRNGKey(0), jnp.ones((32, 32, 3)))


class _Segmenter(nn.Module):
  """A RepVGG backbone inside a larger model with BatchNorm of its own."""
  deploy: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    features = rv.create_model('RepVGG-A0', 0, deploy=self.deploy, precision='highest')(
        x, train)
    return nn.BatchNorm(use_running_average=not train, name='head_bn')(features)


def test_backbone_inside_a_larger_model_reparameterizes_and_keeps_other_batch_norms(images):
  model = _Segmenter()
  variables = random_variables(model, images)
  deploy_vars = rv.reparameterize(variables)
  assert set(deploy_vars['batch_stats']) == {'head_bn'}
  expected = jax.jit(model.apply)(variables, images)
  got = jax.jit(_Segmenter(deploy=True).apply)(deploy_vars, images)
  assert relative_error(got, expected) < 1e-5
