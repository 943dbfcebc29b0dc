"""The GPU check scripts (tools/gpu_check.sh, tools/gpu_train_check.sh) work before a GPU
is lent: every step of the inference check runs on the CPU in its quick mode, and every
command line the scripts would run on the GPU is one their programs accept."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'tools'))
sys.path.insert(0, REPO)

import benchmark  # noqa: E402
import benchmark_train  # noqa: E402
import gpu_check  # noqa: E402
import gpu_train_check  # noqa: E402


def test_inference_check_runs_every_step_on_the_cpu(tmp_path):
  env = dict(os.environ, PYTHON=sys.executable, JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  result = subprocess.run(['bash', 'tools/gpu_check.sh', str(tmp_path), '--quick'], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['failures'] == {}
  (row,) = summary['exactness']
  assert row['model'] == 'RepVGG-A0' and row['error_highest'] < 1e-5
  assert row['timm_error'] is None or row['timm_error'] < 1e-5
  structures = {r['structure'] for r in summary['benchmark']}
  assert {'train', 'deploy'} <= structures
  assert all(error < 1e-5 for error in summary['export']['errors_by_batch'].values())
  assert '| RepVGG-A0 |' in (tmp_path / 'summary.md').read_text()


def test_the_gpu_command_lines_are_accepted(tmp_path):
  for command, _ in gpu_check.benchmark_commands(str(tmp_path), quick=False, torch=True):
    args = benchmark.parse_args(command[2:])
    assert args.dtype in ('bfloat16', 'float32') and args.image_size == 224
  for command, _ in gpu_train_check.throughput_commands(str(tmp_path), quick=False):
    args = benchmark_train.parse_args(command[2:])
    assert (args.batch_size, args.image_size, args.channels_last) == (256, 224, True)
  for command, dtype, _ in gpu_train_check.recipe_commands(str(tmp_path), False, '/data'):
    assert command[1] == 'train.py' and f'--config.dtype={dtype}' in command


@pytest.mark.parametrize('script', ['gpu_check.sh', 'gpu_train_check.sh'])
def test_usage_without_an_output_directory_is_an_error(script):
  result = subprocess.run(['bash', f'tools/{script}'], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHON=sys.executable))
  assert result.returncode == 2 and 'OUT_DIR' in result.stderr
