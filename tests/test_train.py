"""Training: data-parallel equivalence, multi-process, kill -9 and resume, clear errors,
the paper's weight-decay rules, RepVGGplus's auxiliary loss.

Full runs happen in subprocesses (each with its own device count) on a test-only model,
``test-tiny`` (one block per stage, widths 8..64), registered inside the subprocess so the
public model list stays unchanged; Fashion-MNIST at 16x16 keeps them to seconds.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import repvgg_jax as rv
from repvgg_jax import checkpoint as ckpt
from repvgg_jax import data
from repvgg_jax.training import metrics, optimization, steps, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
# REPVGG_TRAIN_TEST_PLATFORM=cuda (tools/gpu_train_check.sh): one-device runs, the reference
# among them, train on the GPU; runs on several devices on the CPU's virtual devices. So
# "one device matches four" compares the GPU with the CPU, and resuming is checked on the GPU.
ON_GPU = os.environ.get('REPVGG_TRAIN_TEST_PLATFORM', 'cpu') != 'cpu'
REFERENCE_DEVICES = 1 if ON_GPU else 4

pytestmark = pytest.mark.skipif(not data.debian_fashion_mnist_present(),
                                reason='needs the Debian Fashion-MNIST files')

# Runs train.py on the tiny model. With SIGNAL_AFTER_FIRST_CHECKPOINT=KILL (or TERM) the
# process sends itself that signal once its first checkpoint is complete on disk; with
# STREAM_FOLDERS=1 image folders of any size are streamed (decoded by worker processes).
DRIVER = textwrap.dedent('''
    import os, signal, sys
    import jax
    from repvgg_jax import checkpoint as ckpt, variants
    variants.VARIANTS['test-tiny'] = variants.Variant(
        'test-tiny', (1, 1, 1, 1), (0.125, 0.125, 0.125, 0.125))
    if os.environ.get('STREAM_FOLDERS'):
      from repvgg_jax.data import folders
      folders.IN_MEMORY_LIMIT_BYTES = 0
    if os.environ.get('SIGNAL_AFTER_FIRST_CHECKPOINT'):
      signum = getattr(signal, 'SIG' + os.environ['SIGNAL_AFTER_FIRST_CHECKPOINT'])
      make_manager = ckpt.checkpoint_manager
      def signalling_manager(*args, **kwargs):
        manager = make_manager(*args, **kwargs)
        save = manager.save
        def save_then_signal(*a, **k):
          result = save(*a, **k)
          manager.wait_until_finished()
          manager.save = save
          os.kill(os.getpid(), signum)
          return result
        manager.save = save_then_signal
        return manager
      ckpt.checkpoint_manager = signalling_manager
    sys.argv[0] = 'train.py'
    sys.path.insert(0, os.getcwd())
    import train
    train.run()
''')


def tiny_flags(**overrides):
  config = dict(model='test-tiny', image_size=16, batch_size=8, eval_batch_size=2000,
                num_train_steps=STEPS, log_every_steps=1, checkpoint_every_steps=2,
                learning_rate=0.1, warmup_epochs=0, mixup_alpha=0.2, label_smoothing=0.1,
                ema_decay=0.9)
  config.update(overrides)
  return [f'--config.{k}={v}' for k, v in config.items()]


# The CPU runs of this module share JAX's persistent compilation cache (set by
# `compilation_cache`): most compile the same programs, and compiling is most of a run. Not
# on a GPU, where the cache also holds autotuning results: there a resumed run must choose
# its kernels afresh, as a real one does.
COMPILATION_CACHE = {}


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  if not ON_GPU:
    COMPILATION_CACHE.update(
        JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('jax_cache')),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  yield
  COMPILATION_CACHE.clear()


def run_training(workdir, devices=4, extra=(), env=None, process=None, wait=True):
  gpu = ON_GPU and devices == 1
  environ = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}'
                 + (' --xla_gpu_deterministic_ops=true' if gpu else ''),
                 JAX_DISABLE_MOST_OPTIMIZATIONS='1', JAX_PLATFORMS='cuda' if gpu else 'cpu',
                 **COMPILATION_CACHE,
                 **({'JAX_DEFAULT_MATMUL_PRECISION': 'highest'} if ON_GPU else {}), **(env or {}))
  command = [sys.executable, '-c', DRIVER, '--config', 'configs/fashion_mnist.py',
             '--workdir', str(workdir), *tiny_flags(), *extra]
  if process is not None:
    command += process
  proc = subprocess.Popen(command, cwd=REPO, env=environ, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  if not wait:
    return proc
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err


def read_metrics(workdir):
  with open(os.path.join(workdir, metrics.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def train_losses(metrics):
  return {m['step']: m['train_loss'] for m in metrics if 'train_loss' in m}


def final_eval(metrics):
  return [m for m in metrics if 'deploy_eval_accuracy' in m][-1]


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  """The uninterrupted run on 4 devices in one process (on one GPU with ON_GPU)."""
  workdir = tmp_path_factory.mktemp('reference')
  code, _, err = run_training(workdir, devices=REFERENCE_DEVICES)
  assert code == 0, err
  return workdir


def test_reference_run_writes_the_documented_workdir(reference_run):
  metrics = read_metrics(reference_run)
  assert sorted(train_losses(metrics)) == list(range(1, STEPS + 1))
  summary = final_eval(metrics)
  # The deploy structure computes what the training-time one does.
  assert summary['deploy_eval_accuracy'] == pytest.approx(summary['eval_accuracy'], abs=2e-3)
  variables, step, metadata = ckpt.restore_training_variables(str(reference_run))
  assert step == STEPS and metadata['model'] == 'test-tiny' and metadata['num_classes'] == 10
  _, deploy_metadata = ckpt.load_variables(str(reference_run / trainer.DEPLOY_DIR))
  assert deploy_metadata['structure'] == 'deploy'
  # TensorBoard reads the scalars of every logged step.
  from tensorboard.backend.event_processing import event_accumulator
  events = event_accumulator.EventAccumulator(str(reference_run))
  events.Reload()
  assert [e.step for e in events.Scalars('train_loss')] == list(range(1, STEPS + 1))
  assert events.Scalars('deploy_eval_accuracy')[-1].value == pytest.approx(
      summary['deploy_eval_accuracy'])


def test_one_device_matches_four_devices(reference_run, tmp_path):
  code, _, err = run_training(tmp_path, devices=4 if ON_GPU else 1)
  assert code == 0, err
  ours, reference = read_metrics(tmp_path), read_metrics(reference_run)
  for step, loss in train_losses(reference).items():
    assert train_losses(ours)[step] == pytest.approx(loss, rel=1e-5), step
  assert final_eval(ours)['eval_loss'] == pytest.approx(final_eval(reference)['eval_loss'],
                                                        rel=1e-4)


@pytest.mark.parametrize('source', ['workdir', 'deploy variables'])
def test_evaluate_py_on_the_runs_checkpoint_gives_the_runs_own_evaluation(
    reference_run, tmp_path, monkeypatch, source):
  import evaluate
  from repvgg_jax import variants
  monkeypatch.setitem(variants.VARIANTS, 'test-tiny', variants.Variant(
      'test-tiny', (1, 1, 1, 1), (0.125, 0.125, 0.125, 0.125)))
  out = tmp_path / 'result.json'
  # The run evaluates the whole image (crop_fraction 1), not the variant's published
  # 0.875 crop: the deploy variables directory must say so too.
  args = (['--workdir', str(reference_run)] if source == 'workdir' else
          ['--variables', str(reference_run / trainer.DEPLOY_DIR), '--conv-impl',
           'winograd4-native'])
  assert evaluate.main(args + ['--dataset', 'fashion_mnist', '--batch-size', '2000',
                               '--json', str(out)]) == 0
  result, reference = json.loads(out.read_text()), final_eval(read_metrics(reference_run))
  prefix = '' if source == 'workdir' else 'deploy_'
  assert (result['count'], result['image_size'], result['crop_fraction']) == (10000, 16, 1.0)
  assert result['top1'] == pytest.approx(100 * reference[f'{prefix}eval_accuracy'], abs=0.02)
  assert result['loss'] == pytest.approx(reference[f'{prefix}eval_loss'], rel=1e-4)


def test_two_processes_match_one_process(reference_run, tmp_path):
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  procs = [run_training(tmp_path, devices=2, wait=False, process=[
      f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}'])
      for i in range(2)]
  results = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
  ours, reference = read_metrics(tmp_path), read_metrics(reference_run)
  for step, loss in train_losses(reference).items():
    assert train_losses(ours)[step] == pytest.approx(loss, rel=1e-5), step
  assert final_eval(ours)['eval_accuracy'] == final_eval(reference)['eval_accuracy']


def test_killed_run_resumes_to_the_same_result(reference_run, tmp_path):
  code, _, _ = run_training(tmp_path, devices=REFERENCE_DEVICES,
                            env={'SIGNAL_AFTER_FIRST_CHECKPOINT': 'KILL'})
  assert code == -signal.SIGKILL
  assert ckpt.checkpoint_manager(str(tmp_path), read_only=True).all_steps() == [2]
  code, _, err = run_training(tmp_path, devices=REFERENCE_DEVICES)
  assert code == 0, err
  ours, reference = read_metrics(tmp_path), read_metrics(reference_run)
  assert train_losses(ours) == train_losses(reference)
  assert final_eval(ours) == final_eval(reference)


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  """3 classes of random JPEGs: 6 training and 3 validation images each."""
  from PIL import Image
  root = tmp_path_factory.mktemp('folder')
  rng = np.random.default_rng(0)
  for split, count in (('train', 6), ('val', 3)):
    for name in ('ant', 'bee', 'cow'):
      os.makedirs(root / split / name)
      for i in range(count):
        Image.fromarray(rng.integers(0, 256, (20, 24 + i, 3), dtype=np.uint8)).save(
            root / split / name / f'{i}.jpg')
  return f'folder:{root}'


def test_a_killed_run_on_a_streamed_folder_resumes_to_the_same_result(image_folder,
                                                                       tmp_path):
  extra = [f'--config.dataset={image_folder}', '--config.eval_batch_size=8']
  env = {'STREAM_FOLDERS': '1'}
  code, _, err = run_training(tmp_path / 'whole', extra=extra, env=env)
  assert code == 0, err
  code, _, _ = run_training(tmp_path / 'resumed', extra=extra,
                            env={**env, 'SIGNAL_AFTER_FIRST_CHECKPOINT': 'KILL'})
  assert code == -signal.SIGKILL
  code, _, err = run_training(tmp_path / 'resumed', extra=extra, env=env)
  assert code == 0, err
  whole, resumed = read_metrics(tmp_path / 'whole'), read_metrics(tmp_path / 'resumed')
  assert sorted(train_losses(resumed)) == list(range(1, STEPS + 1))
  assert train_losses(resumed) == train_losses(whole)
  assert final_eval(resumed) == final_eval(whole)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  code, out, err = run_training(tmp_path, env={'SIGNAL_AFTER_FIRST_CHECKPOINT': 'TERM'})
  assert code == 0, err
  assert 'stopped by SIGTERM at step 2 of 6' in out
  assert ckpt.checkpoint_manager(str(tmp_path), read_only=True).all_steps() == [2]


def test_cli_errors_are_one_line(tmp_path):
  for flag, expected in [('--config.model=RepVGG-Z9', "unknown model 'RepVGG-Z9'"),
                         ('--config.dataset=no_such_dataset', 'no_such_dataset'),
                         ('--config.batch_size=6', 'multiple of the 4 devices'),
                         ('--config.conv_impl=winograd4', 'Winograd only with deploy=True'),
                         ('--config.conv_init_scale=0', 'conv_init_scale must be positive'),
                         ('--config.grad_clip_norm=-1', 'grad_clip_norm must be 0 (off)')]:
    code, _, err = run_training(tmp_path / 'run', extra=[flag])
    lines = [line for line in err.splitlines() if line.startswith('error:')]
    assert code == 1 and len(lines) == 1 and expected in lines[0], err
    assert 'Traceback' not in err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  code, _, err = run_training(tmp_path, extra=[
      '--config.learning_rate=1e30', '--config.checkpoint_every_steps=1',
      '--config.mixup_alpha=0'])
  assert code == 1, err
  message = [line for line in err.splitlines() if line.startswith('error:')][0]
  kept = ckpt.checkpoint_manager(str(tmp_path), read_only=True).latest_step()
  assert kept is not None and f'NaN/inf at step {kept + 1}' in message
  assert f'last good checkpoint is step {kept}' in message
  variables, _, _ = ckpt.restore_training_variables(str(tmp_path))
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(variables))


# ------------------------------------------------------------------------------------------
# The optimizer rules, against the official PyTorch formulas.


def block_tree(rng, cin=3, cout=4):
  """One training-time RepVGG block's params and batch stats (Flax names, HWIO)."""
  bn = lambda: {'scale': rng.uniform(0.5, 2, cout), 'bias': rng.normal(size=cout)}
  params = {'conv3x3': {'conv': {'kernel': rng.normal(size=(3, 3, cin, cout))}, 'bn': bn()},
            'conv1x1': {'conv': {'kernel': rng.normal(size=(1, 1, cin, cout))}, 'bn': bn()},
            'identity': {'scale': rng.uniform(0.5, 2, cout), 'bias': rng.normal(size=cout)}}
  stats = {b: {'bn': {'mean': rng.normal(size=cout), 'var': rng.uniform(0.5, 2, cout)}}
           for b in ('conv3x3', 'conv1x1')}
  return params, stats


def test_weight_decay_mask_follows_the_official_names():
  params, _ = block_tree(np.random.default_rng(0))
  params = {'stage1_0': params, 'linear': {'kernel': np.ones((4, 2)), 'bias': np.ones(2)}}
  decayed = lambda mask: sorted('/'.join(k.key for k in p) for p, v in
                                jax.tree_util.tree_flatten_with_path(mask)[0] if v)
  # Official: decay unless the name contains 'bias' or 'bn'; custwd also exempts
  # rbr_dense (conv3x3) and rbr_1x1 (conv1x1).
  assert decayed(optimization.weight_decay_mask(params)) == [
      'linear/kernel', 'stage1_0/conv1x1/conv/kernel', 'stage1_0/conv3x3/conv/kernel',
      'stage1_0/identity/scale']
  assert decayed(optimization.weight_decay_mask(params, custom_l2=True)) == [
      'linear/kernel', 'stage1_0/identity/scale']


def official_name(path):
  """The official PyTorch name of a Flax path of ``block_tree`` (repvgg.py's modules)."""
  names = {'conv3x3': 'rbr_dense', 'conv1x1': 'rbr_1x1', 'identity': 'rbr_identity',
           'kernel': 'weight', 'scale': 'weight', 'stage1_0': 'stage1.0'}
  return '.'.join(names.get(k.key, k.key) for k in path)


@pytest.mark.parametrize('rule', optimization.WEIGHT_DECAY_RULES)
def test_each_weight_decay_rule_is_its_trainers_formula(rule):
  params, _ = block_tree(np.random.default_rng(0))
  params['se'] = {'down': {'kernel': np.ones((4, 1)), 'bias': np.ones(1)}}
  # A 1-D parameter named neither 'bias' nor 'bn': the two rules disagree on it.
  params = {'stage1_0': params, 'linear': {'kernel': np.ones((4, 2)), 'bias': np.ones(2)},
            'gain': np.ones(3)}
  mask = optimization.weight_decay_mask(params, rule=rule)
  for path, decays in jax.tree_util.tree_flatten_with_path(mask)[0]:
    name = official_name(path)
    value = params
    for k in path:
      value = value[k.key]
    if rule == 'repvgg':  # train.py: 'bias' or 'bn' in the name -> no decay
      official = 'bias' not in name and 'bn' not in name
    else:  # train/optimizer.py set_weight_decay
      official = 'identity.weight' in name or not (np.ndim(value) == 1
                                                     or name.endswith('.bias'))
    assert decays == official, (rule, name)
  with pytest.raises(ValueError, match="weight_decay_rule 'adamw': accepted are repvgg, swin"):
    optimization.weight_decay_mask(params, rule='adamw')


def test_gradient_clipping_bounds_the_global_norm_before_weight_decay():
  sys.path.insert(0, REPO)
  from configs import fashion_mnist
  config = fashion_mnist.get_config()
  config.weight_decay, config.momentum, config.warmup_epochs = 0.5, 0.0, 0.0
  params = {'conv': {'kernel': jnp.ones((2, 2))}, 'bn': {'bias': jnp.ones(2)}}
  grads = {'conv': {'kernel': jnp.full((2, 2), 3.0)}, 'bn': {'bias': jnp.full(2, 4.0)}}
  lr = config.learning_rate  # batch 256: the peak, at step 0 without warm-up
  for clip, scale in [(0.0, 1.0), (50.0, 1.0), (2.0, 2.0 / np.sqrt(4 * 9 + 2 * 16))]:
    config.grad_clip_norm = clip
    tx, _ = optimization.create_optimizer(config, steps_per_epoch=10, total_steps=10)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Clipped gradient, then decay on the kernel only (the BN bias is exempt).
    np.testing.assert_allclose(updates['conv']['kernel'], -lr * (3.0 * scale + 0.5), rtol=1e-6)
    np.testing.assert_allclose(updates['bn']['bias'], -lr * 4.0 * scale, rtol=1e-6)


def test_custom_l2_is_the_official_get_custom_l2():
  rng = np.random.default_rng(1)
  params, stats = block_tree(rng)
  # repvgg.py RepVGGBlock.get_custom_L2, on OIHW kernels as in PyTorch.
  k3 = params['conv3x3']['conv']['kernel'].transpose(3, 2, 0, 1)
  k1 = params['conv1x1']['conv']['kernel'].transpose(3, 2, 0, 1)
  t3 = (params['conv3x3']['bn']['scale'] /
        np.sqrt(stats['conv3x3']['bn']['var'] + 1e-5)).reshape(-1, 1, 1, 1)
  t1 = (params['conv1x1']['bn']['scale'] /
        np.sqrt(stats['conv1x1']['bn']['var'] + 1e-5)).reshape(-1, 1, 1, 1)
  circle = (k3 ** 2).sum() - (k3[:, :, 1:2, 1:2] ** 2).sum()
  eq_kernel = k3[:, :, 1:2, 1:2] * t3 + k1 * t1
  official = (eq_kernel ** 2 / (t3 ** 2 + t1 ** 2)).sum() + circle
  tree = lambda t: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), t)
  ours = optimization.custom_l2_penalty({'stage0': tree(params)}, {'stage0': tree(stats)})
  assert float(ours) == pytest.approx(official, rel=1e-5)
  # Two blocks count twice; BN factors are constants (no gradient into gamma).
  grads = jax.grad(optimization.custom_l2_penalty)(
      {'a': tree(params), 'b': tree(params)}, {'a': tree(stats), 'b': tree(stats)})
  assert not np.any(grads['a']['conv3x3']['bn']['scale'])


def test_repvggplus_step_trains_the_auxiliary_heads():
  variant = rv.Variant('test-plus', (1, 1, 2, 1), (0.125, 0.125, 0.125, 0.125), se='post',
                       plus=True)
  model = rv.RepVGG(variant, num_classes=3, bn_axis_name=steps.AXIS)
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), images[:1])
  tx, schedule = optax.sgd(0.1), optax.constant_schedule(0.1)
  state = {'step': jnp.int32(0), 'params': variables['params'],
           'batch_stats': variables['batch_stats'], 'opt_state': tx.init(variables['params'])}
  batch = {'image': images, 'label': jnp.array([0, 1, 2, 0])}

  def one_step(weight):
    options = steps.StepOptions(num_classes=3, aux_loss_weight=weight)
    step = lambda s, b: steps.train_step(s, b, jax.random.PRNGKey(2), model=model,
                                             tx=tx, schedule=schedule, options=options)
    # A plain function of one replica: vmap with the axis name stands in for pmap.
    add_axis = lambda t: jax.tree_util.tree_map(lambda x: x[None], t)
    new_state, metrics = jax.jit(jax.vmap(step, axis_name=steps.AXIS))(add_axis(state),
                                                                           add_axis(batch))
    return new_state['params'], metrics

  params, metrics = one_step(0.1)
  assert np.isfinite(metrics['train_loss']) and metrics['finite'][0] == 1
  head = params['stage2_aux']['fc']['kernel'][0]
  assert not np.allclose(head, variables['params']['stage2_aux']['fc']['kernel'])
  untouched, _ = one_step(0.0)
  np.testing.assert_array_equal(untouched['stage2_aux']['fc']['kernel'][0],
                                variables['params']['stage2_aux']['fc']['kernel'])
