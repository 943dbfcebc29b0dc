"""Winograd F(2x2,3x3) / F(4x4,3x3): the same convolution as XLA's, and the same model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax.equivalence import random_variables, relative_error
from repvgg_jax import winograd


@pytest.mark.parametrize('conv_impl, shape, groups', [
    ('winograd2', (2, 7, 10, 8), 1), ('winograd4', (1, 9, 6, 8), 4)])
def test_equals_a_padded_stride1_convolution(conv_impl, shape, groups):
  # Odd sizes leave partial tiles at the bottom and right.
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, shape[-1] // groups, 12))
  expected = jax.lax.conv_general_dilated(
      x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups)
  got = jax.jit(winograd.winograd_conv3x3, static_argnums=(2, 3))(
      x, winograd.transform_kernel(kernel, conv_impl), conv_impl, groups)
  assert got.shape == expected.shape
  assert relative_error(got, expected) < 1e-6


def test_deploy_model_with_winograd_matches_xla_and_keeps_the_tree_names():
  # RepVGG-B1g4 (grouped layers) is far slower to build; groups are tested above.
  name, x = 'RepVGG-A0', jnp.zeros((1, 32, 32, 3))
  deploy_vars = rv.reparameterize(random_variables(rv.create_model(name, 10), x))
  for conv_impl in ('winograd2', 'winograd4'):
    transformed = winograd.transform_kernels(deploy_vars, name, conv_impl)
    a = winograd.output_tile(conv_impl) + 2
    assert jax.tree_util.tree_structure(transformed) == jax.tree_util.tree_structure(
        deploy_vars)
    params = transformed['params']
    assert params['stage1_1']['reparam_conv']['kernel'].shape[:2] == (a, a)
    assert params['stage1_0']['reparam_conv']['kernel'].shape[:2] == (3, 3)  # stride 2
    init_shapes = jax.eval_shape(
        rv.create_model(name, 10, deploy=True, conv_impl=conv_impl).init,
        jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_map(jnp.shape, init_shapes) == jax.tree_util.tree_map(
        jnp.shape, transformed)
  images = jax.random.normal(jax.random.PRNGKey(2), (2, 40, 36, 3))
  reference = jax.jit(rv.create_model(name, 10, deploy=True).apply)(deploy_vars, images)
  got = jax.jit(rv.create_model(name, 10, deploy=True, conv_impl='winograd2').apply)(
      winograd.transform_kernels(deploy_vars, name, 'winograd2'), images)
  assert relative_error(got, reference) < 1e-5


def test_a_tree_or_kernel_that_is_not_a_deploy_models_is_refused():
  with pytest.raises(ValueError, match='params/stage1_1/reparam_conv: missing'):
    winograd.transform_kernels({'params': {}}, 'RepVGG-A0', 'winograd4')
  with pytest.raises(ValueError, match='3x3 HWIO kernel'):
    winograd.transform_kernel(np.zeros((1, 1, 4, 4)), 'winograd2')
