"""benchmark.py: one record per measurement, a table, JSON and a plot."""

import json
import os
import subprocess
import sys

import pytest

import benchmark
from repvgg_jax import benchmarking, onnx_export, xla_backend
from repvgg_jax.equivalence import TOLERANCE

REQUIRED = {'model', 'structure', 'batch_size', 'dtype', 'image_size', 'images_per_second',
            'latency_ms_p50', 'compile_seconds', 'device'}


def run_tiny(tmp_path, *argv):
  """benchmark.py on RepVGG-A0 at 32x32, one thread, one timed call per candidate, plus
  ``argv``; its JSON records."""
  json_path = tmp_path / 'r.json'
  assert benchmark.main([
      '--models', 'RepVGG-A0', '--image-size', '32', '--threads', '1', '--min-calls', '1',
      '--min-seconds', '0', '--json', str(json_path), *argv]) == 0
  return json.loads(json_path.read_text())


def error_vs_jax(stderr, structure):
  """The error against the JAX model that benchmark.py printed for an ONNX ``structure``
  when it checked the graph, before timing it."""
  line = stderr.split(f'RepVGG-A0 {structure}: ready in ')[1]
  return float(line.split('error vs JAX ')[1].split()[0])


def test_measures_both_graphs_and_torch_and_writes_table_json_and_plot(tmp_path, capsys):
  pytest.importorskip('timm')
  png_path = tmp_path / 'r.png'
  records = run_tiny(tmp_path, '--batch-sizes', '2', '--structures', 'train,deploy',
                     '--torch', '--torch-variants', 'torch-channels_last',
                     '--plot', str(png_path))
  assert [r['structure'] for r in records] == ['train', 'deploy', 'torch-channels_last']
  for r in records:
    assert REQUIRED <= set(r)
    assert (r['model'], r['batch_size'], r['dtype'], r['image_size']) == (
        'RepVGG-A0', 2, 'float32', 32)
    assert r['images_per_second'] > 0 and r['latency_ms_p50'] > 0
    assert r['top1'] == 72.41 and r['gmacs'] > 0 and r['matmul_fraction'] > 0
  train, deploy = records[0], records[1]
  assert deploy['params'] < train['params']  # the branches are folded away
  table = capsys.readouterr().out
  assert table.count('| RepVGG-A0 |') == 3 and '| torch-channels_last |' in table
  assert png_path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_timm_exported_by_torch_runs_verified_beside_our_onnx_export(tmp_path, capsys):
  pytest.importorskip('timm')
  pytest.importorskip('onnxruntime')
  records = run_tiny(tmp_path, '--batch-sizes', '2', '--structures', 'deploy',
                     '--onnx-runtimes', 'onnxruntime', '--onnx-exporters', 'jax,torch')
  assert [(r['structure'], r['framework']) for r in records] == [
      ('deploy', 'jax'), ('onnxruntime', 'onnxruntime'),
      ('onnxruntime (torch export)', 'onnxruntime')]
  assert records[1]['params'] == records[2]['params'] == records[0]['params']
  out, err = capsys.readouterr()
  assert '| RepVGG-A0 | onnxruntime (torch export) | 2 |' in out
  # Both graphs were checked against the JAX deploy model before they were timed.
  for structure in ('onnxruntime', 'onnxruntime (torch export)'):
    assert error_vs_jax(err, structure) <= TOLERANCE


def test_int8_model_in_jax_and_its_qdq_graph_run_verified(tmp_path, capsys):
  """The JAX int8 structure and the int8 QDQ graph in onnxruntime, the graph checked
  against that JAX model within INT8_TOLERANCE before it is timed."""
  pytest.importorskip('onnxruntime')
  records = run_tiny(tmp_path, '--batch-sizes', '1', '--structures', 'deploy-int8',
                     '--onnx-runtimes', 'onnxruntime', '--onnx-exporters', 'int8')
  assert [(r['structure'], r['framework']) for r in records] == [
      ('deploy-int8', 'jax'), ('onnxruntime int8', 'onnxruntime')]
  assert all(r['images_per_second'] > 0 for r in records)
  error = error_vs_jax(capsys.readouterr().err, 'onnxruntime int8')
  # Not the float model's 1e-5: the int8 graph's one-step rounding flips cascade.
  assert TOLERANCE < error <= onnx_export.INT8_TOLERANCE


def test_onnx_exporters_flag():
  parse = benchmark.parse_args
  assert parse(['--onnx-runtimes', 'openvino']).onnx_exporters == ['jax']
  assert parse(['--onnx-runtimes', 'onnxruntime,openvino', '--onnx-exporters',
                'jax,torch']).onnx_exporters == ['jax', 'torch']
  assert parse(['--onnx_exporters', 'torch']).onnx_exporters == ['torch']


def test_onnxruntime_threads_sleep_between_runs():
  # Spinning threads would slow whichever candidate the round-robin times next.
  pytest.importorskip('onnxruntime')
  options = benchmarking.ort_session_options(threads=2)
  assert options.intra_op_num_threads == 2
  assert options.get_session_config_entry('session.intra_op.allow_spinning') == '0'


def test_cpu_flag_is_accepted_by_this_jaxlib():
  # XLA aborts on an unknown flag; the child also shows set_cpu_flags runs before jax.
  script = ('import os; from repvgg_jax import xla_backend; assert xla_backend.set_cpu_flags(); '
            'import jax; jax.numpy.ones(2).block_until_ready(); '
            'print(os.environ["XLA_FLAGS"])')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = subprocess.run([sys.executable, '-c', script], env=env, check=True,
                       capture_output=True, text=True).stdout
  assert xla_backend.CPU_FAST_FLAGS in out


def test_training_benchmark_times_both_frameworks():
  # bfloat16: JAX's compute dtype and PyTorch's autocast (float32 is the same path).
  pytest.importorskip('timm')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [sys.executable, os.path.join(repo, 'benchmark_train.py'), '--batch_size', '4',
       '--image_size', '16', '--steps', '1', '--rounds', '2', '--threads', '1',
       '--dtype', 'bfloat16'],
      cwd=repo, check=True, capture_output=True, text=True, timeout=600).stdout
  rows = [line for line in out.splitlines()
          if 'RepVGG-A0, batch 4, 16x16x1, bfloat16' in line]
  assert [row.split('|')[1].split()[0] for row in rows] == ['JAX', 'PyTorch']
  assert all(float(row.split('|')[3]) > 0 for row in rows)


@pytest.mark.parametrize('argv, message', [
    (['--models', 'RepVGG-Z9'], "unknown model 'RepVGG-Z9'"),
    (['--batch-sizes', '0,8'], 'positive integers'),
    (['--structures', 'deploy,fast'], 'accepted are train, deploy'),
    (['--image-size', '16'], 'at least 32'),
    (['--onnx-exporters', 'jax,tf'], 'accepted are jax, torch'),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    benchmark.main(argv)
  assert exit_info.value.code == 2 and message in capsys.readouterr().err
