"""Int8 post-training quantization of the deploy model: agreement with float, the int8
tensors, the calibration methods, and one-line refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import repvgg_jax as rv
from repvgg_jax import quantization


@pytest.fixture(scope='module')
def deploy():
  """A freshly initialized QARepVGG-A0 folded to its deploy model, whose classifier is
  fitted (least squares on the pooled features) to 10 classes of noisy grey 32x32
  templates: 32 images to fit and calibrate on, 64 to test.

  Its predictions have the margins of a trained model's; with a random classifier the
  int8 rounding of 20 layers (about 30% of the logits' norm here, where the errors of
  nearly-identity layers add up) flips the near-ties of a random model's predictions.
  """
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  templates = jax.random.normal(keys[0], (10, 32, 32, 1))
  labels = np.arange(96) % 10
  images = templates[labels] + 0.5 * jax.random.normal(keys[1], (96, 32, 32, 1))
  train = rv.create_model('RepVGG-A0', num_classes=10, block='qarepvgg')
  variables = rv.reparameterize(jax.jit(train.init)(keys[2], images[:1]))
  model = rv.create_model('RepVGG-A0', num_classes=10, deploy=True)
  features = jax.jit(lambda v, x: model.apply(v, x, method='features'))(variables, images[:32])
  features = np.mean(features['stage4'], (1, 2))
  fit = np.linalg.lstsq(np.concatenate([features, np.ones((32, 1))], 1),
                        np.eye(10)[labels[:32]], rcond=None)[0]
  variables = {'params': {**variables['params'], 'linear': {
      'kernel': jnp.asarray(fit[:-1], jnp.float32), 'bias': jnp.asarray(fit[-1], jnp.float32)}}}
  return model, variables, [images[:16], images[16:32]], images[32:]


@pytest.fixture(scope='module')
def quantized(deploy):
  model, variables, calibration, _ = deploy
  ranges = quantization.calibrate(model, variables, calibration, 'absmax')
  return ranges, quantization.quantize(model, variables, ranges)


def test_int8_agrees_with_float_on_98_percent_of_predictions(deploy, quantized):
  model, variables, _, test = deploy
  expected = np.asarray(np.argmax(jax.jit(model.apply)(variables, test), -1))
  int8_model = quantization.quantized_model(model)
  got = np.asarray(np.argmax(jax.jit(int8_model.apply)(quantized[1], test), -1))
  assert len(set(expected)) == 10  # a constant prediction would agree with anything
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
  steps = quantization.SCALE_STEPS
  np.testing.assert_allclose(layer['kernel_scale'], np.abs(kernel).max(axis=(0, 1, 2)) / steps,
                             rtol=1e-6)
  assert np.all(np.abs(layer['kernel'] * layer['kernel_scale'] - kernel)
                <= layer['kernel_scale'] * (0.5 + 1e-5))
  assert layer['input_scale'] == pytest.approx(ranges['stage2_1/reparam_conv'] / steps)


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
  # Much mass near 0 and one far outlier: clipping the outlier costs less than coarse
  # steps for all the rest.
  outlier = np.zeros(quantization.HISTOGRAM_BINS)
  outlier[:100], outlier[-1] = 1e6, 1
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
