"""convert.py: verified deploy checkpoints, jax.export artifacts, PyTorch in and out."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import onnx
import orbax.checkpoint as ocp
import pytest
from PIL import Image

import convert
import evaluate
import repvgg_jax as rv
from repvgg_jax.equivalence import random_variables, relative_error
from repvgg_jax import calibration, checkpoint, conversion, equivalence, quantization

# Grey images, as Fashion-MNIST's: the channel count comes from the normalization.
MODEL, CLASSES, SIZE, CHANNELS = 'RepVGG-A0', 10, 32, 1
MEAN, STD = (1.0,), (4.0,)
RUN_CONFIG = {'batch_size': 16, 'eval_batch_size': 8, 'seed': 0}


def write_run(workdir, steps_and_seeds, model=MODEL, channels=CHANNELS):
  """A training run as train.py writes it: run.json and checkpoints/<step>/state."""
  os.makedirs(workdir, exist_ok=True)
  # The batch sizes of a config, which names no dataset: int8 calibration (1 batch)
  # and verification read them.
  checkpoint.write_json(os.path.join(workdir, checkpoint.RUN_METADATA),
                        checkpoint.model_metadata(model, CLASSES, SIZE, MEAN * channels,
                                                  STD * channels, config=RUN_CONFIG))
  net = rv.create_model(MODEL, CLASSES)
  states = {}
  with checkpoint.checkpoint_manager(workdir) as manager:
    for step, seed in steps_and_seeds:
      states[step] = random_variables(net, np.zeros((1, SIZE, SIZE, channels), np.float32),
                                      seed)
      manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(
          {**states[step], 'step': np.int64(step)})))
  return states


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A RepVGG-A0 run with checkpoints at steps 3 and 7 (different weights)."""
  workdir = str(tmp_path_factory.mktemp('run'))
  return workdir, write_run(workdir, [(3, 1), (7, 2)])


@pytest.fixture(scope='module')
def converted(run, tmp_path_factory):
  """convert.py --export stablehlo of the latest checkpoint."""
  workdir, _ = run
  output = str(tmp_path_factory.mktemp('out') / 'deploy')
  assert convert.main(['--workdir', workdir, '--output', output, '--export', 'stablehlo',
                       '--platforms', 'cpu']) == 0
  return output


train_logits = jax.jit(rv.create_model(MODEL, CLASSES).apply)


def test_writes_a_deploy_checkpoint_of_the_latest_step_that_reproduces_training(
    run, converted):
  _, states = run
  variables, metadata = checkpoint.load_variables(converted)
  assert metadata['structure'] == 'deploy' and metadata['step'] == 7
  assert (metadata['model'], metadata['num_classes'], metadata['image_size']) == (
      MODEL, CLASSES, SIZE)
  assert (tuple(metadata['mean']), tuple(metadata['std'])) == (MEAN, STD)
  assert metadata['conversion_relative_error'] < equivalence.TOLERANCE
  x = jax.random.normal(jax.random.PRNGKey(5), (3, SIZE, SIZE, CHANNELS))
  deploy = rv.create_model(MODEL, CLASSES, deploy=True)
  assert relative_error(jax.jit(deploy.apply)(variables, x), train_logits(states[7], x)) < 1e-5


def test_stablehlo_export_runs_with_only_jax_at_any_batch_size(run, converted, tmp_path):
  _, states = run
  # A CPU-only export uses the fastest CPU path, Winograd F(4x4,3x3), within the same bar.
  export_info = checkpoint.load_variables(converted)[1]['export']
  assert (export_info['conv_impl'], export_info['platforms']) == ('winograd4', ['cpu'])
  script = (
      'import sys, jax, numpy as np\n'
      f'exported = jax.export.deserialize(open(sys.argv[1], "rb").read())\n'
      'for n in (1, 3):\n'
      '  x = np.random.default_rng(n).normal(size=(n, 32, 32, 1)).astype(np.float32)\n'
      '  np.save(f"{sys.argv[2]}/out{n}.npy", np.asarray(exported.call(x)))\n')
  # Not the project's path (-I, no PYTHONPATH); fast compiles as in conftest.
  env = {**{k: v for k, v in os.environ.items() if k != 'PYTHONPATH'},
         'JAX_DISABLE_MOST_OPTIMIZATIONS': '1'}
  subprocess.run([sys.executable, '-I', '-c', script,
                  os.path.join(converted, conversion.EXPORT_FILE), str(tmp_path)],
                 check=True, env=env, cwd=tmp_path)
  for n in (1, 3):
    x = np.random.default_rng(n).normal(size=(n, SIZE, SIZE, CHANNELS)).astype(np.float32)
    out = np.load(tmp_path / f'out{n}.npy')
    assert out.shape == (n, CLASSES)
    assert relative_error(out, train_logits(states[7], x)) < 1e-5


def test_onnx_export_is_written_verified_and_runs_in_onnxruntime(run, tmp_path):
  ort = pytest.importorskip('onnxruntime')
  workdir, states = run
  output = tmp_path / 'deploy'
  assert convert.main(['deploy', '--workdir', workdir, '--output', str(output),
                       '--export', 'onnx']) == 0
  info = checkpoint.load_variables(str(output))[1]['onnx']
  assert info['input'] == ['batch', CHANNELS, 'height', 'width'] and info['opset'] == 17
  assert info['relative_error'] < 1e-5
  session = ort.InferenceSession(str(output / conversion.ONNX_FILE),
                                 providers=['CPUExecutionProvider'])
  x = np.random.default_rng(0).normal(size=(2, SIZE, SIZE, CHANNELS)).astype(np.float32)
  out, = session.run(None, {'images': x.transpose(0, 3, 1, 2)})
  assert relative_error(out, train_logits(states[7], x)) < 1e-5


def test_load_deploy_runs_the_fastest_cpu_path_within_the_bar(run, converted):
  _, states = run
  forward, metadata = conversion.load_deploy(converted)
  assert metadata['model'] == MODEL
  x = jax.random.normal(jax.random.PRNGKey(5), (3, SIZE, SIZE, CHANNELS))
  assert relative_error(forward(x), train_logits(states[7], x)) < 1e-5


def test_step_selects_an_older_checkpoint(run, tmp_path):
  workdir, _ = run
  assert convert.main(['--workdir', workdir, '--output', str(tmp_path / 'd'),
                       '--step', '3']) == 0
  assert checkpoint.load_variables(str(tmp_path / 'd'))[1]['step'] == 3


@pytest.mark.parametrize('problem', ['missing', 'corrupt', 'other model', 'no such step'])
def test_bad_sources_fail_cleanly_and_write_nothing(problem, run, tmp_path, capsys):
  workdir, _ = run
  args = []
  if problem == 'missing':
    workdir = str(tmp_path / 'nowhere')
  elif problem == 'corrupt':
    corrupt = tmp_path / 'corrupt'
    write_run(str(corrupt), [(1, 0)])
    for root, _, files in os.walk(corrupt / checkpoint.CHECKPOINTS):
      for name in files:
        with open(os.path.join(root, name), 'wb') as f:
          f.write(b'garbage')
    workdir = str(corrupt)
  elif problem == 'other model':
    args = ['--model', 'RepVGG-B0']
  else:
    args = ['--step', '5']
  output = tmp_path / 'out'
  assert convert.main(['--workdir', workdir, '--output', str(output), *args]) == 1
  message = capsys.readouterr().err
  assert message.startswith('convert.py: error:') and len(message.splitlines()) == 1
  assert {'missing': 'no training checkpoints', 'corrupt': 'unreadable',
          'other model': 'a RepVGG-A0 run, not RepVGG-B0',
          'no such step': 'available: [3, 7]'}[problem] in message
  assert not output.exists() and os.listdir(tmp_path) in ([], ['corrupt'])


def test_weights_of_another_model_are_refused(tmp_path, capsys):
  # run.json says RepVGG-B0, the checkpoint holds RepVGG-A0 weights.
  write_run(str(tmp_path / 'run'), [(1, 0)], model='RepVGG-B0')
  assert convert.main(['--workdir', str(tmp_path / 'run'), '--output',
                       str(tmp_path / 'out')]) == 1
  assert 'not a training-time RepVGG-B0' in capsys.readouterr().err
  assert not (tmp_path / 'out').exists()


def test_existing_output_is_kept_unless_overwrite(run, tmp_path, capsys):
  workdir, _ = run
  output = tmp_path / 'out'
  output.mkdir()
  (output / 'mine.txt').write_text('keep me')
  assert convert.main(['--workdir', workdir, '--output', str(output)]) == 1
  assert 'already exists' in capsys.readouterr().err
  assert os.listdir(output) == ['mine.txt']
  assert convert.main(['--workdir', workdir, '--output', str(output), '--overwrite']) == 0
  assert not (output / 'mine.txt').exists()
  assert checkpoint.load_variables(str(output))[1]['step'] == 7


def test_a_deploy_model_off_by_more_than_1e5_is_not_written(run, tmp_path, monkeypatch,
                                                            capsys):
  workdir, _ = run

  def lossy_reparameterize(variables):
    # Forgets the identity branch of one block: a plausible conversion bug.
    deploy = rv.reparameterize(variables)
    block = deploy['params']['stage1_1']['reparam_conv']
    block['bias'] = block['bias'] - variables['params']['stage1_1']['identity']['bias']
    return deploy

  monkeypatch.setattr(conversion, 'reparameterize', lossy_reparameterize)
  assert convert.main(['--workdir', workdir, '--output', str(tmp_path / 'out')]) == 1
  assert 'differs from the training-time model' in capsys.readouterr().err
  assert os.listdir(tmp_path) == []


def test_torch_round_trip_through_convert(tmp_path):
  pytest.importorskip('torch')
  # PyTorch's RepVGG takes RGB images.
  workdir = str(tmp_path / 'rgb_run')
  states = write_run(workdir, [(7, 3)], channels=3)
  pth = tmp_path / 'a0.pth'
  assert convert.main(['--workdir', workdir, '--to-torch', str(pth), '--naming', 'timm']) == 0
  imported = tmp_path / 'imported'
  assert convert.main(['--from-torch', str(pth), '--model', MODEL, '--output',
                       str(imported), '--image-size', str(SIZE)]) == 0
  variables, metadata = checkpoint.load_variables(str(imported))
  assert (metadata['structure'], metadata['num_classes']) == ('train', CLASSES)
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, states[7])
  safetensors = tmp_path / 'a0.safetensors'
  assert convert.main(['--from-variables', str(imported), '--to-torch',
                       str(safetensors)]) == 0
  with open(safetensors, 'rb') as f:
    header = json.loads(f.read(int.from_bytes(f.read(8), 'little')))
  assert 'stage0.rbr_dense.conv.weight' in header


def test_command_line_mistakes_are_usage_errors(capsys):
  with pytest.raises(SystemExit) as exit_info:
    convert.main(['--from-torch', 'x.pth', '--output', 'out'])
  assert exit_info.value.code == 2
  assert '--from-torch needs --model' in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# --quantize int8: calibration on the run's data, agreement on its eval split.


def write_folder(root, classes=CLASSES, per_class=2, mode='L', size=SIZE):
  """A tiny image folder (train/ and val/, ``per_class`` images of each class)."""
  rng = np.random.default_rng(0)
  for split in ('train', 'val'):
    for c in range(classes):
      os.makedirs(root / split / f'c{c}', exist_ok=True)
      for i in range(per_class):
        pixels = rng.integers(0, 256, (size, size) + (() if mode == 'L' else (3,)), np.uint8)
        Image.fromarray(pixels, mode).save(root / split / f'c{c}' / f'{i}.png')
  return f'folder:{root}'


@pytest.fixture(scope='module')
def grey_folder(tmp_path_factory):
  return write_folder(tmp_path_factory.mktemp('grey'))


INT8_ARGS = ['--quantize', 'int8', '--calibration-batches', '1']


@pytest.fixture(scope='module')
def int8_converted(run, grey_folder, tmp_path_factory):
  """convert.py deploy --quantize int8 --export stablehlo(,onnx where onnxruntime is
  installed) of the latest checkpoint, calibrated and verified on a tiny grey folder."""
  workdir, _ = run
  output = str(tmp_path_factory.mktemp('int8') / 'deploy')
  exports = 'stablehlo' + (',onnx' if importlib.util.find_spec('onnxruntime') else '')
  assert convert.main(['deploy', '--workdir', workdir, '--output', output, *INT8_ARGS,
                       '--calibration-dataset', grey_folder, '--export', exports,
                       '--platforms', 'cpu']) == 0
  return output


def test_int8_conversion_records_its_calibration_and_agreement(int8_converted):
  _, metadata = checkpoint.load_variables(int8_converted)
  int8 = metadata['int8']
  # Every conv's and the classifier's input (A0: 22 convs).
  assert len(int8['ranges']) == 23 and min(int8['ranges'].values()) >= 0
  assert (int8['method'], int8['keep_float']) == ('percentile', ['stage0', 'linear'])
  assert int8['calibration']['images'] == 16 and int8['calibration']['split'] == 'train'
  verification = int8['verification']
  assert verification['images'] == 2 * CLASSES  # the whole val split, once
  assert 0 <= verification['top1_agreement'] <= 1
  assert verification['logits_relative_error'] > 0  # int8 rounding is not exact
  assert metadata['export']['int8'] is True


def test_int8_checkpoint_loads_and_exports_as_the_int8_model(int8_converted):
  variables, metadata = checkpoint.load_variables(int8_converted)
  net = rv.create_model(MODEL, CLASSES, deploy=True)
  ranges = metadata['int8']['ranges']
  x = jax.random.normal(jax.random.PRNGKey(3), (2, SIZE, SIZE, CHANNELS))
  expected = quantization.quantized_model(net).apply(
      quantization.quantize(net, variables, ranges), x)
  forward, _ = conversion.load_deploy(int8_converted)
  np.testing.assert_array_equal(forward(x), expected)
  float_forward, _ = conversion.load_deploy(int8_converted, int8=False, conv_impl='xla')
  assert relative_error(float_forward(x), net.apply(variables, x)) < 1e-5
  assert relative_error(float_forward(x), expected) > 1e-4  # the two differ
  with open(os.path.join(int8_converted, conversion.EXPORT_FILE), 'rb') as f:
    exported = jax.export.deserialize(f.read())
  assert relative_error(exported.call(x), expected) < 1e-6


def test_int8_onnx_export_is_the_qdq_graph_of_the_int8_model(int8_converted, run,
                                                            grey_folder):
  ort = pytest.importorskip('onnxruntime')
  variables, metadata = checkpoint.load_variables(int8_converted)
  assert metadata['onnx']['int8']
  path = os.path.join(int8_converted, conversion.ONNX_FILE)
  ops = [node.op_type for node in onnx.load(path).graph.node]
  # The input of every int8 layer (A0: 21 convs) and the output of each but the last.
  assert ops.count('QuantizeLinear') == 2 * 21 - 1
  net = rv.create_model(MODEL, CLASSES, deploy=True)
  int8_net, int8_variables = quantization.int8_model(net, variables, metadata['int8'])
  # Images like the calibration's: on random ones the activations span a few int8 steps.
  run_json = checkpoint.read_json(os.path.join(run[0], checkpoint.RUN_METADATA))
  x = calibration.RunData.of_run(run_json, grey_folder).calibration_images(1)[0][:4]
  out, = ort.InferenceSession(path, providers=['CPUExecutionProvider']).run(
      None, {'images': x.transpose(0, 3, 1, 2)})
  # Nearer the int8 model than the float model is (rounding flips cascade: see
  # conversion._onnx).
  int8_out = int8_net.apply(int8_variables, x)
  assert relative_error(out, int8_out) < relative_error(net.apply(variables, x), int8_out) / 2


def test_evaluate_runs_an_int8_directory_as_its_int8_model(int8_converted, grey_folder,
                                                          tmp_path):
  _, metadata = checkpoint.load_variables(int8_converted)
  results = {}
  for name, flags in (('int8', []), ('float', ['--float-model'])):
    result = tmp_path / f'{name}.json'
    assert evaluate.main(['--variables', int8_converted, '--dataset', grey_folder,
                          '--batch-size', '4', '--json', str(result), *flags]) == 0
    results[name] = json.loads(result.read_text())
  assert (results['int8']['structure'], results['float']['structure']) == (
      'deploy int8', 'deploy')
  verification = metadata['int8']['verification']
  # The conversion's own verification ran the same split with the same preprocessing
  # (one image of 20 may flip on a near tie between different batch compositions).
  for name in results:
    assert abs(results[name]['top1'] - 100 * verification[f'{name}_top1']) <= 5


@pytest.mark.parametrize('problem', ['no dataset', 'missing folder', 'colour images'])
def test_bad_calibration_data_is_one_line_and_writes_nothing(problem, run, tmp_path, capsys):
  workdir, _ = run
  args = {'no dataset': [],  # the run's run.json names none
          'missing folder': ['--calibration-dataset', f'folder:{tmp_path / "nowhere"}'],
          'colour images': ['--calibration-dataset',
                            write_folder(tmp_path / 'rgb', classes=2, per_class=1,
                                         mode='RGB')]}[problem]
  output = tmp_path / 'out'
  assert convert.main(['deploy', '--workdir', workdir, '--output', str(output), *INT8_ARGS,
                       *args]) == 1
  message = capsys.readouterr().err
  assert message.startswith('convert.py: error:') and len(message.splitlines()) == 1
  assert {'no dataset': 'names no dataset', 'missing folder': 'does not exist',
          'colour images': 'has 2 classes of 3-channel images'}[problem] in message
  assert not output.exists()


def test_int8_agreeing_less_than_min_agreement_is_not_written(run, grey_folder, tmp_path,
                                                              monkeypatch, capsys):
  workdir, _ = run
  # The refusal alone: made-up ranges and agreement spare calibrating and evaluating.
  monkeypatch.setattr(conversion.quantization, 'calibrate',
                      lambda model, variables, *_: dict.fromkeys(
                          quantization.layer_inputs(model, variables,
                                                    np.zeros((1, SIZE, SIZE, CHANNELS))), 1.0))
  monkeypatch.setattr(conversion.calibration, 'compare', lambda *_: {
      'images': 20, 'top1': {'float': 0.5, 'int8': 0.3}, 'agreement': {'int8': 0.5},
      'logits_relative_error': {'int8': 0.2}})
  output = tmp_path / 'out'
  assert convert.main(['deploy', '--workdir', workdir, '--output', str(output), *INT8_ARGS,
                       '--calibration-dataset', grey_folder, '--min-agreement', '0.51']) == 1
  message = capsys.readouterr().err
  assert 'on 50.00% of 20 eval images, below --min-agreement 51.00%; nothing written' in message
  assert len(message.splitlines()) == 1 and not output.exists()


@pytest.mark.parametrize('args, expected', [
    (['--agreement-batches', '2'], '--agreement-batches applies to --quantize int8 only'),
    (INT8_ARGS + ['--min-agreement', '98'], '--min-agreement 98.0: a share in [0, 1]'),
    (['--quantize', 'int4'], "invalid choice: 'int4'"),
    (INT8_ARGS + ['--calibration-method', 'entropy'], "invalid choice: 'entropy'"),
])
def test_int8_flag_mistakes_are_usage_errors(args, expected, capsys):
  with pytest.raises(SystemExit) as exit_info:
    convert.main(['deploy', '--workdir', 'run', '--output', 'out', *args])
  assert exit_info.value.code == 2 and expected in capsys.readouterr().err


def test_int8_refuses_a_winograd_export(run, tmp_path, capsys):
  workdir, _ = run
  assert convert.main(['deploy', '--workdir', workdir, '--output', str(tmp_path / 'o'),
                       *INT8_ARGS, '--conv-impl', 'winograd4']) == 1
  assert "conv_impl 'winograd4' does not apply" in capsys.readouterr().err
  assert os.listdir(tmp_path) == []


def test_a_stablehlo_export_refuses_the_native_kernel(run, tmp_path, capsys):
  workdir, _ = run
  assert convert.main(['deploy', '--workdir', workdir, '--output', str(tmp_path / 'o'),
                       '--export', 'stablehlo', '--conv-impl', 'winograd4-native']) == 1
  assert "export 'winograd4' (the same arithmetic" in capsys.readouterr().err
  assert os.listdir(tmp_path) == []
