"""Structural re-parameterization: exact, pure, jit-able, differentiable, and strict."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from repvgg_jax.equivalence import random_variables, relative_error

import repvgg_jax as rv
from repvgg_jax import reparam


@pytest.fixture(scope='module')
def a0():
  """RepVGG-A0 (10 classes) with random weights and BN state on a 32x32 input."""
  model = rv.create_model('RepVGG-A0', num_classes=10, precision='highest')
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 32, 32, 3))
  return model, random_variables(model, x), x


@pytest.mark.parametrize('name', rv.list_models())
def test_deploy_model_reproduces_training_model_eval_output(name, images):
  """For every variant, on a non-square input with random, far-from-default BN state."""
  model = rv.create_model(name, precision='highest')
  deploy = rv.create_model(name, deploy=True, precision='highest')
  variables = random_variables(model, images)
  expected = jax.jit(model.apply)(variables, images)
  # The two images must give different logits, or the comparison would prove nothing.
  assert relative_error(expected[0], expected[1]) > 1e-3
  deploy_vars = jax.jit(rv.reparameterize)(variables)
  assert relative_error(jax.jit(deploy.apply)(deploy_vars, images), expected) <= 1e-5
  # Eagerly, the same deploy variables (up to float32 rounding of the fused sums).
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         rv.reparameterize(variables), deploy_vars)


@pytest.mark.parametrize('name', rv.list_models())
def test_output_has_the_structure_shapes_and_dtypes_of_deploy_init(name):
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  train = jax.eval_shape(rv.create_model(name).init, jax.random.PRNGKey(0), x)
  deploy = jax.eval_shape(rv.create_model(name, deploy=True).init, jax.random.PRNGKey(0), x)
  converted = jax.eval_shape(rv.reparameterize, train)
  assert jax.tree_util.tree_structure(converted) == jax.tree_util.tree_structure(deploy)
  for got, want in zip(jax.tree_util.tree_leaves(converted), jax.tree_util.tree_leaves(deploy)):
    assert (got.shape, got.dtype) == (want.shape, want.dtype)


def test_reparameterize_is_pure(a0):
  _, variables, _ = a0
  snapshot = copy.deepcopy(jax.tree_util.tree_map(np.asarray, variables))
  first = rv.reparameterize(variables)
  second = rv.reparameterize(variables)
  jax.tree_util.tree_map(np.testing.assert_array_equal, first, second)
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, snapshot)


def test_fused_kernel_follows_the_papers_formula(a0):
  """K = K3*t3 + pad(K1)*t1 + I*tid, b = sum(beta - mean*t) with t = gamma/sqrt(var+eps)."""
  _, variables, _ = a0
  p, s = variables['params']['stage2_1'], variables['batch_stats']['stage2_1']
  t = {b: (p[b]['bn']['scale'] if b != 'identity' else p[b]['scale'])
       / np.sqrt((s[b]['bn'] if b != 'identity' else s[b])['var'] + 1e-5)
       for b in ('conv3x3', 'conv1x1', 'identity')}
  kernel = np.array(p['conv3x3']['conv']['kernel'] * t['conv3x3'])
  kernel[1, 1] += np.asarray(p['conv1x1']['conv']['kernel'][0, 0]) * t['conv1x1']
  kernel[1, 1] += np.eye(kernel.shape[2]) * t['identity']
  bias = sum((p[b]['bn'] if b != 'identity' else p[b])['bias']
             - (s[b]['bn'] if b != 'identity' else s[b])['mean'] * t[b] for b in t)
  fused = rv.reparameterize(variables)['params']['stage2_1']['reparam_conv']
  np.testing.assert_allclose(fused['kernel'], kernel, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(fused['bias'], bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('groups', [1, 2, 4])
def test_identity_kernel_reproduces_its_input_per_group(groups):
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 7, 8))
  y = jax.lax.conv_general_dilated(
      x, reparam.identity_kernel(8, groups), (1, 1), 'SAME', feature_group_count=groups,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_array_equal(y, x)


def test_gradients_flow_through_reparameterize(a0):
  """d(loss of the deploy model)/d(a training-time kernel) matches finite differences.

  In float64, so that central differences are accurate to many digits.
  """
  _, variables, x = a0
  with jax.enable_x64(True):
    deploy = rv.create_model('RepVGG-A0', 10, deploy=True, dtype=jnp.float64)
    variables, x = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), (variables, x))
    direction = jax.random.normal(jax.random.PRNGKey(3), (2, 10), jnp.float64)

    def loss(kernel):
      block = variables['params']['stage1_0']
      params = {**variables['params'], 'stage1_0': {
          **block, 'conv3x3': {**block['conv3x3'], 'conv': {'kernel': kernel}}}}
      deploy_vars = rv.reparameterize({**variables, 'params': params})
      return jnp.sum(deploy.apply(deploy_vars, x) * direction)

    kernel = variables['params']['stage1_0']['conv3x3']['conv']['kernel']
    grad = jax.jit(jax.grad(loss))(kernel)
    assert float(jnp.abs(grad).max()) > 0
    loss = jax.jit(loss)
    for index in [(1, 1, 0, 0), (0, 2, 5, 17), (2, 0, 40, 47)]:
      eps = 1e-5
      bump = jnp.zeros_like(kernel).at[index].set(eps)
      numeric = (loss(kernel + bump) - loss(kernel - bump)) / (2 * eps)
      assert float(grad[index]) == pytest.approx(float(numeric), rel=1e-6)


def test_gradient_of_the_fused_kernel_is_the_bn_gain(a0):
  """d(sum of the fused kernel)/d(K3) = gamma / sqrt(var + eps), for every tap."""
  _, variables, _ = a0
  p, s = variables['params']['stage1_0'], variables['batch_stats']['stage1_0']
  grad = jax.grad(lambda p: jnp.sum(reparam.fuse_block(p, s)['kernel']))(p)
  gain = p['conv3x3']['bn']['scale'] / jnp.sqrt(s['conv3x3']['bn']['var'] + 1e-5)
  np.testing.assert_allclose(grad['conv3x3']['conv']['kernel'],
                             jnp.broadcast_to(gain, grad['conv3x3']['conv']['kernel'].shape),
                             rtol=1e-6)


def test_squeeze_excite_parameters_pass_through_unchanged():
  model = rv.create_model('RepVGG-D2se')
  variables = random_variables(model, jnp.ones((1, 32, 32, 3)))
  converted = rv.reparameterize(variables)['params']
  for key in ('stage0', 'stage3_5', 'stage4_0'):
    jax.tree_util.tree_map(np.testing.assert_array_equal, converted[key]['se'],
                           variables['params'][key]['se'])


def _without(tree, path):
  tree = copy.deepcopy(jax.tree_util.tree_map(np.asarray, tree))
  node = tree
  for key in path[:-1]:
    node = node[key]
  del node[path[-1]]
  return tree


def test_missing_branch_is_named(a0):
  _, variables, _ = a0
  broken = {**variables, 'params': _without(variables['params'], ('stage2_3', 'conv1x1'))}
  with pytest.raises(ValueError, match='stage2_3/conv1x1: missing'):
    rv.reparameterize(broken)


def test_missing_running_statistic_is_named(a0):
  _, variables, _ = a0
  broken = {**variables,
            'batch_stats': _without(variables['batch_stats'], ('stage1_1', 'identity', 'var'))}
  with pytest.raises(ValueError, match='stage1_1/identity/var: missing in batch_stats'):
    rv.reparameterize(broken)


def test_wrong_shape_is_named_with_expected_and_found(a0):
  _, variables, _ = a0
  params = copy.deepcopy(jax.tree_util.tree_map(np.asarray, variables['params']))
  params['stage3_4']['conv1x1']['bn']['scale'] = np.ones(7, np.float32)
  with pytest.raises(ValueError, match=r'stage3_4/conv1x1/bn/scale: expected shape \(192,\), '
                                       r'got \(7,\)'):
    rv.reparameterize({**variables, 'params': params})


def test_deploy_tree_is_refused(a0):
  _, variables, _ = a0
  with pytest.raises(ValueError, match='deploy tree'):
    rv.reparameterize(rv.reparameterize(variables))


@pytest.mark.parametrize('bad', [None, [1, 2], {'batch_stats': {}}])
def test_a_non_variables_argument_is_refused(bad):
  with pytest.raises(ValueError, match='training-time model'):
    rv.reparameterize(bad)
