"""Int8 post-training quantization of the deploy model: agreement with float, the int8
tensors, the calibration methods, and one-line refusals."""

import jax
import numpy as np
import pytest
from repvgg_jax.equivalence import random_variables

import repvgg_jax as rv
from repvgg_jax import quantization


@pytest.fixture(scope='module')
def deploy():
  """A random QARepVGG-A0 (10 classes, grey 32x32 images) folded to its deploy model,
  with 2 calibration batches and 64 test images."""
  images = jax.random.normal(jax.random.PRNGKey(0), (96, 32, 32, 1))
  train = rv.create_model('RepVGG-A0', num_classes=10, block='qarepvgg')
  variables = rv.reparameterize(random_variables(train, images[:1]))
  model = rv.create_model('RepVGG-A0', num_classes=10, deploy=True)
  return model, variables, [images[:16], images[16:32]], images[32:]


@pytest.fixture(scope='module')
def quantized(deploy):
  model, variables, calibration, _ = deploy
  ranges = quantization.calibrate(model, variables, calibration, 'absmax')
  return ranges, quantization.quantize(model, variables, ranges)


def test_int8_agrees_with_float_on_98_percent_of_predictions(deploy, quantized):
  model, variables, _, test = deploy
  expected = np.asarray(np.argmax(jax.jit(model.apply)(variables, test), -1))
  quantized_model = quantization.quantized_model(model)
  got = np.asarray(np.argmax(jax.jit(quantized_model.apply)(quantized[1], test), -1))
  assert len(set(expected)) > 1  # a constant prediction would agree with anything
  assert np.mean(got == expected) >= 0.98


def test_int8_tensors_are_per_channel_kernels_and_a_static_input_scale(deploy, quantized):
  _, variables, _, _ = deploy
  ranges, int8_variables = quantized
  layers = quantization.int8_layers(int8_variables)
  # Every conv but the stem's; the classifier stays float too.
  assert sorted(layers) == sorted(k for k in ranges if k not in ('stage0/reparam_conv', 'linear'))
  layer = layers['stage2_1/reparam_conv']
  kernel = np.asarray(variables['params']['stage2_1']['reparam_conv']['kernel'])
  assert layer['kernel'].dtype == np.int8 and layer['kernel_scale'].shape == (kernel.shape[-1],)
  np.testing.assert_allclose(layer['kernel_scale'], np.abs(kernel).max(axis=(0, 1, 2)) / 127,
                             rtol=1e-6)
  assert np.all(np.abs(layer['kernel'] * layer['kernel_scale'] - kernel)
                <= layer['kernel_scale'] / 2 + 1e-7)
  assert layer['input_scale'] == pytest.approx(ranges['stage2_1/reparam_conv'] / 127)


def test_keep_float_none_quantizes_every_layer(deploy, quantized):
  model, variables, _, _ = deploy
  ranges = quantized[0]
  every = quantization.int8_layers(quantization.quantize(model, variables, ranges, ()))
  assert sorted(every) == sorted(ranges)


def test_percentile_and_mse_clip_below_the_maximum(deploy, quantized):
  model, variables, calibration, _ = deploy
  absmax = quantized[0]
  for method in ('percentile', 'mse'):
    ranges = quantization.calibrate(model, variables, calibration, method)
    assert all(0 < ranges[k] <= absmax[k] * (1 + 1e-6) for k in absmax)
    assert any(ranges[k] < 0.99 * absmax[k] for k in absmax)


def test_range_pickers_on_known_histograms():
  uniform = np.ones(quantization.HISTOGRAM_BINS)
  assert quantization._percentile_range(uniform, 10.0, 50) == pytest.approx(5.0)
  assert quantization._percentile_range(uniform, 10.0, 100) == pytest.approx(10.0)
  # Mass near 0 and one far outlier: clipping the outlier costs less than coarse steps.
  outlier = np.zeros(quantization.HISTOGRAM_BINS)
  outlier[:100], outlier[-1] = 1000, 1
  assert quantization._mse_range(outlier, 100.0) < 10.0
  assert quantization._mse_range(uniform, 100.0) == pytest.approx(100.0)


@pytest.mark.parametrize('batches,match', [
    ([], 'calibration needs at least one batch of images, got none'),
    ([np.zeros((2, 32, 32, 3))], r'calibration batch 0: expected NHWC images .* with 1 '
                                 r'channels, got shape \(2, 32, 32, 3\)'),
    ([np.zeros((2, 32, 32, 1)), np.zeros((32, 32, 1))], 'calibration batch 1: expected NHWC'),
])
def test_bad_calibration_batches_are_refused(deploy, batches, match):
  model, variables, _, _ = deploy
  with pytest.raises(ValueError, match=match):
    quantization.calibrate(model, variables, batches)


def test_bad_method_and_training_model_are_refused(deploy):
  model, variables, calibration, _ = deploy
  with pytest.raises(ValueError, match="calibration method 'kl': accepted are absmax, "
                                       'percentile, mse'):
    quantization.calibrate(model, variables, calibration, 'kl')
  with pytest.raises(ValueError, match='int8 quantization needs the deploy model'):
    quantization.quantized_model(rv.create_model('RepVGG-A0', num_classes=10))
