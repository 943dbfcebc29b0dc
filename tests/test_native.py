"""The native CPU Winograd kernel (conv_impl 'winograd2-native'/'winograd4-native'): the
same convolution as XLA's, the same model, and clear refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax import native, winograd
from repvgg_jax.equivalence import random_variables, relative_error


def xla_conv(x, kernel, groups=1):
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups, precision='highest')


@pytest.mark.parametrize('conv_impl, shape, out', [
    # Odd sizes leave partial tiles; 5 in channels fill no whole vector; 72 out channels
    # leave a narrow last kernel panel; 2 x 5 x 6 tiles, rows of tiles in partial blocks.
    ('winograd2-native', (2, 7, 10, 5), 20), ('winograd4-native', (1, 9, 13, 24), 72),
    # 1024 tiles: more than one chunk of the kernel's 4 MiB buffers, the last one partial.
    ('winograd4-native', (4, 64, 62, 16), 16)])
def test_equals_a_padded_stride1_convolution_plus_bias(conv_impl, shape, out):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, shape[-1], out))
  bias = jax.random.normal(jax.random.PRNGKey(2), (out,))
  packed = winograd.transform_kernel(kernel, conv_impl)
  positions = (winograd.output_tile(conv_impl) + 2) ** 2
  assert packed.shape == (positions, shape[-1] * -(-out // native.lanes()) * native.lanes())
  got = jax.jit(native.winograd_conv3x3)(x, packed, bias)
  assert relative_error(got, xla_conv(x, kernel) + bias) < 2e-6


def test_a_grouped_conv_keeps_the_xla_graph_and_its_kernel():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 5, 8))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 12))
  transformed = winograd.transform_kernel(kernel, 'winograd4-native', groups=2)
  assert transformed.shape == (6, 6, 4, 12)
  conv = winograd.WinogradConv3x3(12, 'winograd4-native', groups=2)
  got = conv.apply({'params': {'kernel': transformed, 'bias': jnp.zeros(12)}}, x)
  assert relative_error(got, xla_conv(x, kernel, groups=2)) < 1e-6


def test_deploy_model_with_the_native_kernel_matches_xla_and_its_init():
  name, x = 'RepVGG-A0', jnp.zeros((1, 32, 32, 3))
  deploy_vars = rv.reparameterize(random_variables(rv.create_model(name, 10), x))
  images = jax.random.normal(jax.random.PRNGKey(2), (2, 40, 36, 3))
  reference = jax.jit(rv.create_model(name, 10, deploy=True).apply)(deploy_vars, images)
  for conv_impl in ('winograd2-native', 'winograd4-native'):
    model = rv.create_model(name, 10, deploy=True, conv_impl=conv_impl)
    variables = winograd.transform_kernels(deploy_vars, name, conv_impl)
    init_shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_map(jnp.shape, init_shapes) == jax.tree_util.tree_map(
        jnp.shape, variables)
    assert relative_error(jax.jit(model.apply)(variables, images), reference) < 1e-5


def test_the_wrong_kernels_or_dtype_are_refused():
  name, x = 'RepVGG-A0', jnp.zeros((1, 32, 32, 3))
  deploy_vars = rv.reparameterize(random_variables(rv.create_model(name, 10), x))
  model = rv.create_model(name, 10, deploy=True, conv_impl='winograd4-native')
  # The XLA graph's (6, 6, in, out) kernels are not the packed ones.
  with pytest.raises(ValueError, match=r"winograd4-native kernel must have shape \(36, 2304\) "
                     r"\(convolution.transform_kernels .*'winograd4-native'\), got \(6, 6, 48, 48\)"):
    model.apply(winograd.transform_kernels(deploy_vars, name, 'winograd4'), x)
  bf16 = rv.create_model(name, 10, deploy=True, conv_impl='winograd4-native',
                         dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="computes in float32.*not bfloat16; use 'winograd4'"):
    bf16.apply(winograd.transform_kernels(deploy_vars, name, 'winograd4-native'), x)


def test_no_input_channels_give_the_bias():
  x = jnp.zeros((2, 5, 3, 0))
  bias = jnp.arange(20.0)
  packed = winograd.transform_kernel(jnp.zeros((3, 3, 0, 20)), 'winograd4-native')
  np.testing.assert_array_equal(jax.jit(native.winograd_conv3x3)(x, packed, bias),
                                jnp.broadcast_to(bias, (2, 5, 3, 20)))


def test_a_missing_compiler_is_one_clear_error(tmp_path, monkeypatch):
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
  monkeypatch.setenv('REPVGG_JAX_CACHE', str(tmp_path / 'cache'))
  with pytest.raises(native.NativeKernelError, match=r'needs a C\+\+17 compiler .*winograd4'):
    native._build()  # pylint: disable=protected-access
  assert not list((tmp_path / 'cache').rglob('*.so'))


def test_unpack_kernel_inverts_pack_kernel():
  transformed = jax.random.normal(jax.random.PRNGKey(0), (6, 6, 8, 72))
  np.testing.assert_array_equal(
      native.unpack_kernel(native.pack_kernel(transformed), 72), transformed)


def test_gradients_and_vmap_are_those_of_the_xla_graph():
  # The native kernel has no derivative of its own: the module gives it the XLA graph's.
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 1, 7, 9, 8))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 8, 20))
  bias = jax.random.normal(jax.random.PRNGKey(2), (20,))
  variables = {}
  for conv_impl in ('winograd4', 'winograd4-native'):
    variables[conv_impl] = {'params': {
        'kernel': winograd.transform_kernel(kernel, conv_impl), 'bias': bias}}
  # Linear in the output, so that the gradients do not depend on the forward values.
  cotangent = jax.random.normal(jax.random.PRNGKey(3), (1, 7, 9, 20))
  def loss(params, x, conv_impl):
    y = winograd.WinogradConv3x3(20, conv_impl).apply({'params': params}, x)
    return jnp.sum(y * cotangent)
  grads = {c: jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(
      v['params'], x[0], c) for c, v in variables.items()}
  (native_params, native_x), (xla_params, xla_x) = grads['winograd4-native'], grads['winograd4']
  assert relative_error(native_x, xla_x) < 1e-6
  assert relative_error(native_params['bias'], xla_params['bias']) < 1e-6
  assert relative_error(native_params['kernel'], native.pack_kernel(xla_params['kernel'])) < 1e-6
  apply = lambda c: jax.vmap(lambda xi: winograd.WinogradConv3x3(20, c).apply(variables[c], xi))
  assert relative_error(jax.jit(apply('winograd4-native'))(x), apply('winograd4')(x)) < 1e-6
