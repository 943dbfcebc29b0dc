"""conv_impl: every implementation computes the model's function with the same variables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax.equivalence import random_variables, relative_error
from repvgg_jax import convolution

NHWC = ('NHWC', 'HWIO', 'NHWC')


@pytest.mark.parametrize('kernel, stride, height, width', [
    (3, 1, 2, 2), (3, 2, 2, 2), (3, 1, 1, 3),  # fewer pixels than taps: one dense matmul
    (1, 2, 2, 2), (1, 1, 2, 2), (3, 2, 4, 4),  # im2col
])
def test_conv_by_patches_equals_xla_convolution_and_its_gradients(kernel, stride, height, width):
  # Output maps of at most 4 pixels: the ones conv_impl='patches' computes by matmuls.
  x = jax.random.normal(jax.random.PRNGKey(0), (2, height, width, 5))
  w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, 5, 6))
  args = ((stride, stride), ((kernel // 2,) * 2,) * 2)

  def loss(conv):
    return lambda x, w: jnp.sum(jnp.sin(conv(x, w, *args, dimension_numbers=NHWC)))
  xla = jax.value_and_grad(loss(jax.lax.conv_general_dilated), (0, 1))(x, w)
  ours = jax.value_and_grad(loss(convolution.conv_by_patches), (0, 1))(x, w)
  for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(xla)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_conv_by_patches_leaves_larger_maps_to_xla():
  x, w = jnp.ones((1, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
  lowered = jax.jit(lambda x, w: convolution.conv_by_patches(
      x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)).lower(x, w).as_text()
  assert 'convolution' in lowered


@pytest.mark.parametrize('deploy', [False, True])
def test_patches_model_equals_xla_model(deploy):
  # At 32x32, stages 3 and 4 of RepVGG-A0 run on 2x2 and 1x1 maps: the patches path.
  name, images = 'RepVGG-A0', jax.random.normal(jax.random.PRNGKey(2), (2, 32, 32, 3))
  variables = random_variables(rv.create_model(name, 10), images[:1])
  if deploy:
    variables = rv.reparameterize(variables)
  outputs = {impl: jax.jit(rv.create_model(name, 10, deploy=deploy, conv_impl=impl).apply)(
      variables, images) for impl in ('xla', 'patches')}
  assert relative_error(outputs['patches'], outputs['xla']) < 1e-5


def test_training_gradients_agree():
  variant = rv.Variant('test-small', (1, 1, 2, 1), (0.125, 0.125, 0.125, 0.125))
  images = jax.random.normal(jax.random.PRNGKey(3), (4, 16, 16, 3))
  variables = random_variables(rv.RepVGG(variant, 5), images[:1])

  def grads(conv_impl):
    model = rv.RepVGG(variant, 5, conv_impl=conv_impl)
    def loss(params):
      logits, _ = model.apply({**variables, 'params': params}, images, train=True,
                              mutable=['batch_stats'])
      return jnp.sum(jax.nn.log_softmax(logits)[:, 0])
    return jax.jit(jax.grad(loss))(variables['params'])
  flat = lambda tree: np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(tree)])
  # Float32 rounding, amplified by training-mode BatchNorm on 4 images: ~1e-6 overall.
  assert relative_error(flat(grads('patches')), flat(grads('xla'))) < 1e-5


def test_winograd_is_deploy_only_and_unknown_names_are_refused():
  with pytest.raises(ValueError, match=r"conv_impl 'winograd2'.*training-time.*xla, patches"):
    convolution.check_conv_impl('winograd2', deploy=False)
  with pytest.raises(ValueError, match=r"conv_impl 'im2col'.*xla, patches, winograd2, winograd4"):
    convolution.check_conv_impl('im2col', deploy=True)
  for impl in convolution.CONV_IMPLS:
    convolution.check_conv_impl(impl, deploy=True)
  # The model and the kernel transform refuse the same way.
  x = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match="conv_impl 'winograd3'"):
    rv.create_model('RepVGG-A0', deploy=True, conv_impl='winograd3').init(
        jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match='Winograd only with deploy=True'):
    rv.create_model('RepVGG-A0', conv_impl='winograd2').init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="conv_impl 'winograd3'"):
    convolution.transform_kernels({'params': {}}, 'RepVGG-A0', 'winograd3')


def test_only_winograd_transforms_the_kernels():
  name, x = 'RepVGG-A0', jnp.zeros((1, 32, 32, 3))
  deploy_vars = rv.reparameterize(random_variables(rv.create_model(name, 10), x))
  for impl in ('xla', 'patches'):
    same = convolution.transform_kernels(deploy_vars, name, impl)
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(same),
                                      jax.tree_util.tree_leaves(deploy_vars)))
