"""PyTorch weights in and out: logits parity with timm, both namings, clear errors.

Nothing is downloaded: timm's models are built on the meta device and given random
weights and random, far-from-default BatchNorm state, then put in eval mode.
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
from timm.utils.model import reparameterize_model  # noqa: E402

import repvgg_jax as rv  # noqa: E402
from repvgg_jax import torch_io  # noqa: E402
from repvgg_jax.equivalence import relative_error  # noqa: E402
from repvgg_jax.models import variable_shapes  # noqa: E402

# Plain, grouped and squeeze-excite; small inputs (non-square where cheap) keep CI fast.
PARITY_CASES = [
    ('RepVGG-A0', 'repvgg_a0', (2, 3, 64, 48)),
    ('RepVGG-B1g4', 'repvgg_b1g4', (1, 3, 32, 48)),
    ('RepVGG-D2se', 'repvgg_d2se', (1, 3, 32, 32)),
]


def random_timm_model(timm_name: str, seed: int = 0):
  """timm's model with random weights and BatchNorm state, in eval mode.

  Built on the meta device and filled with ``assign=True``, skipping timm's slow init
  (D2se has 133M parameters). BatchNorm state is drawn like equivalence.randomize_batch_norm:
  means in [-3, 3], variances in [2, 8], gammas in [0.5, 1.5], betas that re-centre.
  """
  with torch.device('meta'):
    model = timm.create_model(timm_name, pretrained=False)
  rng = np.random.default_rng(seed)
  meta = model.state_dict()
  bn_prefixes = {k[:-len('running_mean')] for k in meta if k.endswith('running_mean')}
  state = {}
  for key, t in meta.items():
    shape = tuple(t.shape)
    if key.endswith('num_batches_tracked'):
      state[key] = torch.zeros((), dtype=torch.int64)
      continue
    prefix, leaf = key.rsplit('.', 1)
    if prefix + '.' in bn_prefixes:
      continue  # drawn together below
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 0
    value = rng.standard_normal(shape, dtype=np.float32)
    state[key] = torch.from_numpy(value / np.float32(np.sqrt(fan_in) if fan_in else 10))
  for prefix in bn_prefixes:
    shape = tuple(meta[prefix + 'running_mean'].shape)
    mean, var = rng.uniform(-3, 3, shape), rng.uniform(2, 8, shape)
    gamma = rng.uniform(0.5, 1.5, shape)
    beta = mean * gamma / np.sqrt(var + 1e-5) + rng.normal(0, 0.2, shape)
    for leaf, value in (('running_mean', mean), ('running_var', var), ('weight', gamma),
                        ('bias', beta)):
      state[prefix + leaf] = torch.from_numpy(value.astype(np.float32))
  model.load_state_dict(state, strict=True, assign=True)
  return model.eval()


def timm_from_state_dict(timm_name: str, state_dict, deploy: bool = False):
  """timm's model (deploy structure if asked) loaded from ``state_dict`` with strict=True."""
  with torch.device('meta'):
    model = timm.create_model(timm_name, pretrained=False)
    if deploy:
      model = reparameterize_model(model, inplace=True)
  model.load_state_dict(state_dict, strict=True, assign=True)
  return model.eval()


def torch_logits(model, x_nchw: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(x_nchw)).numpy()


def nhwc(x_nchw: np.ndarray) -> jax.Array:
  return jnp.asarray(x_nchw.transpose(0, 2, 3, 1))


def assert_trees_equal(a, b):
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  assert [p for p, _ in flat_a] == list(flat_b)
  for path, value in flat_a:
    np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_b[path]),
                                  err_msg=jax.tree_util.keystr(path))


def random_tree(model, seed: int = 0):
  """Random float32 variables with the structure of ``model`` (values, not a trained
  network: for key/shape round trips, where no forward pass is run)."""
  rng = np.random.default_rng(seed)
  shapes = variable_shapes(model)
  return jax.tree_util.tree_map(
      lambda s: rng.standard_normal(s.shape, dtype=np.float32), shapes)


def official_keys(name: str, deploy: bool, num_classes: int = 1000) -> set[str]:
  """The state-dict keys of the official repvgg.py/repvggplus.py model, written from
  their definitions (not from repvgg_jax)."""
  v = rv.get_variant(name)
  blocks = [('stage0', 3, v.stem_width, 2)]
  channels = v.stem_width
  for s, (width, depth) in enumerate(zip(v.stage_widths, v.depths), 1):
    for i in range(depth):
      if v.plus and s == 3:
        half = depth // 2
        stage, index = ('stage3_first', i) if i < half else ('stage3_second', i - half)
        prefix = f'{stage}.blocks.{index}'
      else:
        prefix = f'stage{s}.blocks.{i}' if v.plus else f'stage{s}.{i}'
      blocks.append((prefix, channels, width, 2 if i == 0 else 1))
      channels = width
  bn = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
  keys = {'linear.weight', 'linear.bias'}
  for prefix, cin, cout, stride in blocks:
    if deploy:
      keys |= {f'{prefix}.rbr_reparam.weight', f'{prefix}.rbr_reparam.bias'}
    else:
      for branch in ('rbr_dense', 'rbr_1x1'):
        keys |= {f'{prefix}.{branch}.conv.weight'} | {f'{prefix}.{branch}.bn.{b}' for b in bn}
      if cin == cout and stride == 1:
        keys |= {f'{prefix}.rbr_identity.{b}' for b in bn}
    if v.se:
      se = 'post_se' if v.plus else 'se'
      keys |= {f'{prefix}.{se}.{conv}.{p}' for conv in ('down', 'up') for p in ('weight', 'bias')}
  if v.plus and not deploy:
    for aux in ('stage1_aux', 'stage2_aux', 'stage3_first_aux'):
      keys |= {f'{aux}.0.conv.weight', f'{aux}.3.weight', f'{aux}.3.bias'}
      keys |= {f'{aux}.0.bn.{b}' for b in bn}
  return keys


# Official -> timm key renames, from the two codebases' module names.
OFFICIAL_TO_TIMM = [
    (r'^stage0\.', 'stem.'),
    (r'^stage(\d)\.(\d+)\.', lambda m: f'stages.{int(m[1]) - 1}.{m[2]}.'),
    (r'\.rbr_dense\.', '.conv_kxk.'), (r'\.rbr_1x1\.', '.conv_1x1.'),
    (r'\.rbr_identity\.', '.identity.'), (r'\.rbr_reparam\.', '.reparam_conv.'),
    (r'\.se\.down\.', '.attn.fc1.'), (r'\.se\.up\.', '.attn.fc2.'), (r'^linear\.', 'head.fc.'),
]


def official_to_timm(key: str) -> str:
  for pattern, replacement in OFFICIAL_TO_TIMM:
    key = re.sub(pattern, replacement, key)
  return key


@pytest.fixture(scope='module', params=PARITY_CASES, ids=[c[0] for c in PARITY_CASES])
def case(request):
  """A random timm model, its reparameterized twin, an input and the imports of both."""
  name, timm_name, input_shape = request.param
  train = random_timm_model(timm_name)
  x = np.random.default_rng(1).normal(size=input_shape).astype(np.float32)
  train_state = train.state_dict()
  logits = torch_logits(train, x)
  deploy = reparameterize_model(train, inplace=True)  # train_state keeps the branches
  return dict(name=name, timm_name=timm_name, x=x, train_state=train_state, logits=logits,
              deploy_state=deploy.state_dict(), deploy_logits=torch_logits(deploy, x),
              imported=torch_io.load_torch_weights(train_state, name),
              imported_deploy=torch_io.load_torch_weights(deploy.state_dict(), name))


def test_imported_training_weights_give_timm_logits(case):
  assert set(case['imported']) == {'params', 'batch_stats'}
  logits = jax.jit(rv.create_model(case['name']).apply)(case['imported'], nhwc(case['x']))
  assert np.std(case['logits']) > 0.1  # a signal survives the random network
  assert relative_error(logits, case['logits']) <= 1e-5


def test_imported_deploy_weights_give_timm_deploy_logits(case):
  assert set(case['imported_deploy']) == {'params'}
  model = rv.create_model(case['name'], deploy=True)
  logits = jax.jit(model.apply)(case['imported_deploy'], nhwc(case['x']))
  assert relative_error(logits, case['deploy_logits']) <= 1e-5


def test_reparameterize_of_imported_weights_equals_timms_tensor_by_tensor(case):
  fused = jax.jit(rv.reparameterize)(case['imported'])
  ours = jax.tree_util.tree_flatten_with_path(fused)[0]
  theirs = dict(jax.tree_util.tree_flatten_with_path(case['imported_deploy'])[0])
  assert [p for p, _ in ours] == list(theirs)
  for path, value in ours:
    assert relative_error(value, theirs[path]) <= 1e-6, jax.tree_util.keystr(path)


@pytest.mark.parametrize('structure', ['train', 'deploy'])
def test_timm_round_trip_is_exact_and_loads_strictly(case, structure):
  imported = case['imported'] if structure == 'train' else case['imported_deploy']
  original = case['train_state'] if structure == 'train' else case['deploy_state']
  exported = torch_io.to_torch_state_dict(imported, case['name'], 'timm', framework='torch')
  assert set(exported) == set(original)
  for key, value in original.items():
    torch.testing.assert_close(exported[key], value, rtol=0, atol=0, msg=key)
  model = timm_from_state_dict(case['timm_name'], exported, deploy=structure == 'deploy')
  expected = case['logits'] if structure == 'train' else case['deploy_logits']
  np.testing.assert_array_equal(torch_logits(model, case['x']), expected)


@pytest.mark.parametrize('structure', ['train', 'deploy'])
def test_official_naming_round_trip(case, structure):
  imported = case['imported'] if structure == 'train' else case['imported_deploy']
  original = case['train_state'] if structure == 'train' else case['deploy_state']
  official = torch_io.to_torch_state_dict(imported, case['name'], 'official')
  assert set(official) == official_keys(case['name'], deploy=structure == 'deploy')
  # Renamed to timm's names, the official tensors are timm's, whose logits match above.
  renamed = {official_to_timm(k): v for k, v in official.items()}
  assert set(renamed) == set(original)
  for key, value in original.items():
    np.testing.assert_array_equal(renamed[key], value.numpy(), err_msg=key)
  assert_trees_equal(torch_io.load_torch_weights(official, case['name']), imported)


def test_every_timm_repvgg_matches_our_key_table():
  covered = {torch_io.timm_model_name(n): n for n in rv.list_models()}
  for timm_name in timm.list_models('repvgg*'):
    assert timm_name in covered, f'timm has {timm_name}, unknown here'
    with torch.device('meta'):
      state = timm.create_model(timm_name, pretrained=False).state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items()
                if not k.endswith('num_batches_tracked')}
    assert torch_io.torch_state_dict_shapes(covered[timm_name], 'timm') == expected


@pytest.mark.parametrize('deploy', [False, True])
def test_repvggplus_official_keys_shapes_and_round_trip(deploy):
  name = 'RepVGGplus-L2pse'
  shapes = torch_io.torch_state_dict_shapes(name, 'official', deploy)
  assert set(shapes) == {k for k in official_keys(name, deploy)
                         if not k.endswith('num_batches_tracked')}
  assert shapes['stage0.post_se.down.weight'] == (16, 64, 1, 1)
  assert shapes['stage4.blocks.0.post_se.up.weight'] == (2560, 640, 1, 1)
  if not deploy:
    assert shapes['stage1_aux.0.conv.weight'] == (160, 160, 3, 3)
    assert shapes['stage3_first_aux.3.weight'] == (1000, 640)
  # Structure round trip on zeros (133M parameters: values are covered by the parity
  # tests above, which share the conversion code).
  model = rv.create_model(name, deploy=deploy)
  tree = jax.tree_util.tree_map(
      lambda s: np.zeros(s.shape, s.dtype),
      variable_shapes(model))
  state = torch_io.to_torch_state_dict(tree, name, 'official')
  assert set(state) == official_keys(name, deploy)
  assert {k: v.shape for k, v in state.items() if k in shapes} == shapes
  back = torch_io.load_torch_weights(state, name)
  assert jax.tree_util.tree_map(np.shape, back) == jax.tree_util.tree_map(np.shape, tree)
  with pytest.raises(ValueError, match='timm has no RepVGGplus'):
    torch_io.to_torch_state_dict(tree, name, 'timm')


@pytest.fixture(scope='module')
def a0_tree():
  return random_tree(rv.create_model('RepVGG-A0'))


@pytest.mark.parametrize('wrap', ['model', 'state_dict'])
def test_wrapped_and_data_parallel_checkpoints_load(a0_tree, tmp_path, wrap):
  state = torch_io.to_torch_state_dict(a0_tree, 'RepVGG-A0', 'official', framework='torch')
  path = tmp_path / 'ckpt.pth'
  torch.save({wrap: {f'module.{k}': v for k, v in state.items()}, 'epoch': 3}, path)
  assert_trees_equal(torch_io.load_torch_weights(path, 'RepVGG-A0'), a0_tree)


def test_safetensors_round_trip_does_not_import_torch(a0_tree, tmp_path):
  path = tmp_path / 'a0.safetensors'
  torch_io.save_torch_state_dict(torch_io.to_torch_state_dict(a0_tree, 'RepVGG-A0', 'timm'),
                                 path)
  np.save(tmp_path / 'stem.npy', a0_tree['params']['stage0']['conv3x3']['conv']['kernel'])
  script = (
      'import sys, numpy as np, repvgg_jax as rv\n'
      f'v = rv.load_torch_weights({str(path)!r}, "RepVGG-A0")\n'
      f'stem = np.load({str(tmp_path / "stem.npy")!r})\n'
      'np.testing.assert_array_equal(v["params"]["stage0"]["conv3x3"]["conv"]["kernel"], stem)\n'
      'assert "torch" not in sys.modules, "torch was imported"\n')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  subprocess.run([sys.executable, '-c', script], check=True, env=env,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class RunsCodeWhenUnpickled:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.mkdir, (str(self.marker),)


def test_a_pickle_that_carries_code_is_refused_unrun(tmp_path):
  marker = tmp_path / 'code-ran'
  path = tmp_path / 'evil.pth'
  torch.save({'model': RunsCodeWhenUnpickled(marker)}, path)
  with pytest.raises(ValueError, match=r'refused: the pickle references code.*mkdir'):
    torch_io.load_torch_weights(path, 'RepVGG-A0')
  assert not marker.exists()


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_a_truncated_file_is_reported(a0_tree, tmp_path, suffix):
  path = tmp_path / f'a0{suffix}'
  torch_io.save_torch_state_dict(torch_io.to_torch_state_dict(a0_tree, 'RepVGG-A0'), path)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=f'{re.escape(str(path))}: not a readable .*truncated'):
    torch_io.load_torch_weights(path, 'RepVGG-A0')


def test_weights_of_another_variant_name_the_keys_and_the_variant():
  a1 = torch_io.to_torch_state_dict(random_tree(rv.create_model('RepVGG-A1')), 'RepVGG-A1')
  with pytest.raises(ValueError) as error:
    torch_io.load_torch_weights(a1, 'RepVGG-A0')
  message = str(error.value)
  assert 'does not fit RepVGG-A0 (training-time, official naming, 1000 classes)' in message
  assert 'stage0.rbr_dense.conv.weight (expected (48, 3, 3, 3), found (64, 3, 3, 3))' in message
  assert message.endswith('the file looks like RepVGG-A1')


def test_missing_and_unexpected_keys_are_named(a0_tree):
  state = torch_io.to_torch_state_dict(a0_tree, 'RepVGG-A0')
  state['stage1.0.extra.weight'] = state.pop('stage4.0.rbr_1x1.conv.weight')
  with pytest.raises(ValueError, match=r'1 missing keys: stage4\.0\.rbr_1x1\.conv\.weight; '
                                       r'1 unexpected keys: stage1\.0\.extra\.weight; '
                                       r'it matches no known variant'):
    torch_io.load_torch_weights(state, 'RepVGG-A0')
  with pytest.raises(ValueError, match='not a RepVGG state dict'):
    torch_io.load_torch_weights({'fc.weight': np.zeros((2, 2))}, 'RepVGG-A0')


def test_pretrained_offline_says_what_to_download_and_where(a0_tree, tmp_path, monkeypatch):
  huggingface_hub = pytest.importorskip('huggingface_hub')

  def offline(*args, **kwargs):
    raise OSError('network is unreachable')

  monkeypatch.setattr(huggingface_hub, 'hf_hub_download', offline)
  cached = tmp_path / 'repvgg_a0.rvgg_in1k.safetensors'
  with pytest.raises(FileNotFoundError) as error:
    rv.pretrained('RepVGG-A0', cache_dir=tmp_path)
  assert ('download https://huggingface.co/timm/repvgg_a0.rvgg_in1k/resolve/main/'
          f'model.safetensors and save it as {cached}') in str(error.value)
  with pytest.raises(FileNotFoundError, match=r'DingXiaoH/RepVGG.*path='):
    rv.pretrained('RepVGG-B2g2', cache_dir=tmp_path)
  # Once the file is where the message says, it loads without the hub.
  torch_io.save_torch_state_dict(torch_io.to_torch_state_dict(a0_tree, 'RepVGG-A0', 'timm'),
                                 cached)
  assert_trees_equal(rv.pretrained('RepVGG-A0', cache_dir=tmp_path), a0_tree)


def test_pretrained_with_other_classes_gets_a_zero_classifier(a0_tree, tmp_path):
  path = tmp_path / 'RepVGG-A0-train.pth'
  torch_io.save_torch_state_dict(torch_io.to_torch_state_dict(a0_tree, 'RepVGG-A0'), path)
  variables = rv.pretrained('RepVGG-A0', path=path, num_classes=10)
  assert variables['params']['linear']['kernel'].shape == (1280, 10)
  assert not np.any(variables['params']['linear']['kernel'])
  np.testing.assert_array_equal(variables['params']['stage4_0']['conv3x3']['conv']['kernel'],
                                a0_tree['params']['stage4_0']['conv3x3']['conv']['kernel'])
  assert 'linear' not in rv.pretrained('RepVGG-A0', path=path, num_classes=0)['params']
