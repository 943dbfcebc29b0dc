"""evaluate.py: published-style weights on an image folder give the top-1 of the model run
by hand on the same batches, in both structures; a training run's checkpoint gives the
run's own evaluation (tests/test_train.py); bad sources are one-line errors."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

import evaluate
import repvgg_jax as rv
from repvgg_jax import data, torch_io
from repvgg_jax.equivalence import random_variables

CLASSES, SIZE = ('cat', 'dog', 'emu'), 32


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """3 classes x 3 random RGB images in train/ and in val/."""
  root = tmp_path_factory.mktemp('folder')
  rng = np.random.default_rng(0)
  for split in ('train', 'val'):
    for name in CLASSES:
      for i in range(3):
        (root / split / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(
            root / split / name / f'{i}.jpg', quality=95)
  return f'folder:{root}'


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  """A RepVGG-A0 with 3 classes, random weights and BatchNorm statistics, saved as the
  authors would (official naming, .safetensors: no torch needed)."""
  variables = random_variables(rv.create_model('RepVGG-A0', len(CLASSES)),
                               np.zeros((1, SIZE, SIZE, 3), np.float32))
  path = tmp_path_factory.mktemp('weights') / 'RepVGG-A0-train.safetensors'
  torch_io.save_torch_state_dict(
      torch_io.to_torch_state_dict(jax.device_get(variables), 'RepVGG-A0'), path)
  return str(path), variables


@pytest.mark.parametrize('deploy', [False, True])
def test_published_weights_on_a_folder_give_the_models_own_top1(folder, weights, deploy,
                                                                tmp_path):
  path, variables = weights
  out = tmp_path / 'result.json'
  args = ['--model', 'RepVGG-A0', '--weights', path, '--dataset', folder, '--image-size',
          str(SIZE), '--crop-fraction', '1.0', '--batch-size', '8', '--json', str(out)]
  # (--skip-unreadable-images changes nothing where every file reads.)
  assert evaluate.main(args + (['--deploy', '--skip-unreadable-images'] if deploy else [])) == 0
  result = json.loads(out.read_text())
  # By hand: the same crops, ImageNet's normalization (the published weights'), the model.
  forward = jax.jit(rv.create_model('RepVGG-A0', len(CLASSES)).apply)
  hits, count = 0, 0
  for batch in data.eval_batches(folder, global_batch_size=8, image_size=SIZE,
                                 crop_fraction=1.0, mean=rv.IMAGENET_MEAN,
                                 std=rv.IMAGENET_STD):
    predictions = np.argmax(forward(variables, batch['image']), -1)
    hits += int(np.sum((predictions == batch['label']) * batch['mask']))
    count += int(batch['mask'].sum())
  assert result['count'] == count == 9 and result['skipped_images'] == 0
  assert result['top1'] == pytest.approx(100 * hits / count)
  assert result['top5'] == 100.0  # 3 classes
  assert result['structure'] == ('deploy' if deploy else 'train')


@pytest.mark.parametrize('argv, message', [
    (['--dataset', 'fashion_mnist'], 'give exactly one source of weights'),
    (['--weights', 'x.pth', '--dataset', 'fashion_mnist'], '--weights needs --model'),
    (['--weights', 'nowhere.pth', '--model', 'RepVGG-A0', '--dataset', 'fashion_mnist'],
     'nowhere.pth: no such file'),
    (['--variables', '/nowhere', '--dataset', 'fashion_mnist'], 'no such checkpoint directory'),
])
def test_bad_sources_are_one_line_errors(argv, message, capsys):
  assert evaluate.main(argv) == 1
  err = capsys.readouterr().err
  assert err.startswith('evaluate.py: error:') and len(err.splitlines()) == 1
  assert message in err


def test_a_model_with_other_classes_than_the_dataset_is_refused(folder, tmp_path, capsys):
  variables = random_variables(rv.create_model('RepVGG-A0', 5),
                               np.zeros((1, SIZE, SIZE, 3), np.float32))
  path = tmp_path / 'five.safetensors'
  torch_io.save_torch_state_dict(
      torch_io.to_torch_state_dict(jax.device_get(variables), 'RepVGG-A0'), path)
  assert evaluate.main(['--model', 'RepVGG-A0', '--weights', str(path), '--dataset',
                        folder, '--batch-size', '8']) == 1
  assert 'a classifier of 5 classes' in capsys.readouterr().err
