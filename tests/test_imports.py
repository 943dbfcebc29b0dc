"""The model, conversion, benchmark and training code import on a machine with only
jax/flax/optax/orbax (the GPU machines have no tensorflow, ml_collections or torch)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

BLOCKER = """
import importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in {'tensorflow', 'tensorflow_datasets', 'ml_collections', 'torch',
                              'timm', 'torchvision'}:
      raise ImportError(f'{name} is blocked in this test')
sys.meta_path.insert(0, Blocker())
"""


@pytest.mark.parametrize('statement', [
    'import repvgg_jax, repvgg_jax.reparam, repvgg_jax.checkpoint, repvgg_jax.torch_io',
    'import repvgg_jax.conversion, repvgg_jax.benchmarking, repvgg_jax.winograd',
    'import repvgg_jax.training.trainer, repvgg_jax.cli',
    'import runpy; runpy.run_path("convert.py", run_name="not_main")',
    'import runpy; runpy.run_path("benchmark.py", run_name="not_main")',
    'import runpy; runpy.run_path("benchmark_train.py", run_name="not_main")',
])
def test_imports_without_tensorflow_ml_collections_or_torch(statement):
  result = subprocess.run([sys.executable, '-c', BLOCKER + statement], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
