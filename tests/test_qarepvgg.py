"""QARepVGG blocks: the block's definition, an exact fold for every variant, gradients,
and the refusals (unknown block, custom L2, PyTorch export)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from repvgg_jax.equivalence import TOLERANCE, random_variables, relative_error

import repvgg_jax as rv
from repvgg_jax import blocks, reparam
from repvgg_jax.training import optimization

EPS = 1e-5


def bn(x, params, stats):
  return (x - stats['mean']) / np.sqrt(stats['var'] + EPS) * params['scale'] + params['bias']


def conv(x, kernel, stride):
  pad = kernel.shape[0] // 2
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(pad, pad)] * 2,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                      precision='highest')


@pytest.fixture(scope='module')
def a0():
  """QARepVGG-A0 (10 classes) with random weights and BN state on a 32x40 input."""
  model = rv.create_model('RepVGG-A0', num_classes=10, precision='highest', block='qarepvgg')
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 32, 40, 3))
  return model, random_variables(model, x), x


@pytest.mark.parametrize('name', rv.list_models())
def test_deploy_model_reproduces_qarepvgg_training_model(name):
  """For every variant, on a small non-square input with random, far-from-default BN
  state: the QARepVGG model folds into the same deploy structure as RepVGG. (48x64, not
  smaller: conftest.py says why.)"""
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 48, 64, 3))
  model = rv.create_model(name, num_classes=10, precision='highest', block='qarepvgg')
  deploy = rv.create_model(name, num_classes=10, deploy=True, precision='highest',
                           block='qarepvgg')
  variables = random_variables(model, x)
  expected = jax.jit(model.apply)(variables, x)
  assert relative_error(expected[0], expected[1]) > 1e-3
  got = jax.jit(deploy.apply)(jax.jit(rv.reparameterize)(variables), x)
  assert relative_error(got, expected) <= TOLERANCE


@pytest.mark.parametrize('strides,features', [(1, 8), (2, 8), (1, 12)])
def test_block_is_relu_of_bn_of_the_branch_sum(strides, features):
  """ReLU(BN(BN3(conv3x3(x)) + conv1x1(x) [+ x])), the identity only for stride 1 and
  equal channels; evaluated by hand with the block's own variables."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 10, 8))
  block = blocks.QARepVGGBlock(features, strides=strides)
  variables = random_variables(block, x)
  p, s = variables['params'], variables['batch_stats']
  y = (bn(conv(x, p['conv3x3']['conv']['kernel'], strides), p['conv3x3']['bn'],
          s['conv3x3']['bn'])
       + conv(x, p['conv1x1']['conv']['kernel'], strides))
  has_identity = strides == 1 and features == 8
  assert ('identity' in s) == has_identity
  if has_identity:
    y = y + x
  expected = np.maximum(bn(y, p['bn'], s['bn']), 0)
  np.testing.assert_allclose(block.apply(variables, x), expected, rtol=1e-5, atol=1e-5)
  assert set(p) == {'conv3x3', 'conv1x1', 'bn'} and set(p['conv1x1']) == {'conv'}


def test_fused_kernel_follows_the_formula(a0):
  """K = t * (K3 * t3 + pad(K1) + I), b = beta + t * (beta3 - mean3 * t3 - mean)."""
  _, variables, _ = a0
  p, s = variables['params']['stage2_1'], variables['batch_stats']['stage2_1']
  t3 = p['conv3x3']['bn']['scale'] / np.sqrt(s['conv3x3']['bn']['var'] + EPS)
  t = p['bn']['scale'] / np.sqrt(s['bn']['var'] + EPS)
  kernel = np.array(p['conv3x3']['conv']['kernel'] * t3)
  kernel[1, 1] += np.asarray(p['conv1x1']['conv']['kernel'][0, 0]) + np.eye(kernel.shape[2])
  bias3 = p['conv3x3']['bn']['bias'] - s['conv3x3']['bn']['mean'] * t3
  fused = rv.reparameterize(variables)['params']['stage2_1']['reparam_conv']
  np.testing.assert_allclose(fused['kernel'], kernel * t, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(fused['bias'], p['bn']['bias'] + t * (bias3 - s['bn']['mean']),
                             rtol=1e-5, atol=1e-5)


def test_gradients_flow_to_every_branch(a0):
  """The fold is differentiable: d(sum of the fused kernel)/d(K1) is the post-sum BN gain
  t, d/d(K3) is t * t3, and the deploy logits depend on every training parameter."""
  model, variables, x = a0
  p, s = variables['params']['stage1_1'], variables['batch_stats']['stage1_1']
  grad = jax.grad(lambda p: jnp.sum(reparam.fuse_block(p, s)['kernel']))(p)
  t3 = p['conv3x3']['bn']['scale'] / jnp.sqrt(s['conv3x3']['bn']['var'] + EPS)
  t = p['bn']['scale'] / jnp.sqrt(s['bn']['var'] + EPS)
  k1, k3 = grad['conv1x1']['conv']['kernel'], grad['conv3x3']['conv']['kernel']
  np.testing.assert_allclose(k1, jnp.broadcast_to(t, k1.shape), rtol=1e-6)
  np.testing.assert_allclose(k3, jnp.broadcast_to(t * t3, k3.shape), rtol=1e-6)

  deploy = rv.create_model('RepVGG-A0', 10, deploy=True, precision='highest')

  def loss(params):
    return jnp.sum(deploy.apply(rv.reparameterize({**variables, 'params': params}), x) ** 2)

  grads = jax.jit(jax.grad(loss))(variables['params'])
  block = grads['stage2_1']
  for leaf in jax.tree_util.tree_leaves(block):
    assert np.all(np.isfinite(leaf)) and float(jnp.abs(leaf).max()) > 0


def test_unknown_block_is_refused():
  with pytest.raises(ValueError, match="block 'qa': accepted are repvgg, qarepvgg"):
    rv.create_model('RepVGG-A0', block='qa').init(jax.random.PRNGKey(0),
                                                 jnp.zeros((1, 32, 32, 3)))


def test_missing_post_sum_statistics_are_named(a0):
  _, variables, _ = a0
  stats = {**variables['batch_stats'], 'stage1_0': {
      k: v for k, v in variables['batch_stats']['stage1_0'].items() if k != 'bn'}}
  with pytest.raises(ValueError, match='stage1_0/bn: missing in batch_stats'):
    rv.reparameterize({**variables, 'batch_stats': stats})


def test_weight_decay_is_the_authors_rule(a0):
  """cxxgtxy/QARepVGG decays every kernel (the 1x1 one too), no BN parameter."""
  _, variables, _ = a0
  mask = optimization.weight_decay_mask(variables['params'])['stage1_1']
  assert mask == {'conv3x3': {'conv': {'kernel': True}, 'bn': {'scale': False, 'bias': False}},
                  'conv1x1': {'conv': {'kernel': True}},
                  'bn': {'scale': False, 'bias': False}}


def test_torch_export_of_training_weights_is_refused_deploy_is_not(a0):
  _, variables, _ = a0
  with pytest.raises(ValueError, match='QARepVGG training-time weights have no PyTorch'):
    rv.to_torch_state_dict(variables, 'RepVGG-A0')
  state = rv.to_torch_state_dict(rv.reparameterize(variables), 'RepVGG-A0')
  assert 'stage0.rbr_reparam.weight' in state


def test_training_config_selects_the_block_and_refuses_custom_l2():
  from configs import fashion_mnist
  from repvgg_jax.training import state, trainer

  config = fashion_mnist.get_config()
  assert config.block == 'repvgg'
  config.block = 'qarepvgg'
  trainer.check_config(config)
  assert state.model_of(config, 10).block == 'qarepvgg'
  config.custom_l2 = True
  with pytest.raises(trainer.TrainingError, match="custom_l2 is defined for the repvgg block "
                                                  "only, not 'qarepvgg'"):
    trainer.check_config(config)
  config.custom_l2, config.block = False, 'qa'
  with pytest.raises(trainer.TrainingError, match="block 'qa': accepted are repvgg, qarepvgg"):
    trainer.check_config(config)


def test_conversion_checks_and_verifies_qarepvgg_trees(a0):
  from repvgg_jax import checkpoint, conversion

  _, variables, _ = a0
  conversion.check_structure(variables, 'RepVGG-A0', 10, False, 'run', 3, block='qarepvgg')
  with pytest.raises(checkpoint.CheckpointError, match='run: not a training-time RepVGG-A0'):
    conversion.check_structure(variables, 'RepVGG-A0', 10, False, 'run', 3)
  error = conversion.verify_deploy('RepVGG-A0', 10, variables, rv.reparameterize(variables),
                                   32, block='qarepvgg')
  assert error <= TOLERANCE
