"""The package is layered: each module imports only modules of layers before its own, at
the top of the file (no import inside a function to dodge a cycle)."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'repvgg_jax'

# Dependency order, lowest first: a module may import modules of earlier layers only
# (modules of one layer do not import each other).
LAYERS = [
    ['variants', 'equivalence', 'autoaugment', 'xla_backend', 'native', 'data.pool',
     'data.decoding'],
    ['winograd', 'checkpoint', 'randaugment', 'data.info'],
    ['convolution', 'data.randomness', 'data.prefetch'],
    ['blocks', 'data.transforms', 'data.batching'],
    ['models', 'reparam', 'data.memory'],
    ['data.fashion_mnist', 'data.folders', 'data.tfds'],
    ['torch_io', 'onnx_export', 'quantization', 'data'],
    ['cli', 'calibration', 'benchmarking', 'model_table', 'training.optimization'],
    ['conversion', 'training.steps'],
    ['training.parallel', 'training.state'],
    ['training.compilation', 'training.metrics'],
    ['evaluation'],
    ['training.trainer'],
]
LAYER = {module: i for i, layer in enumerate(LAYERS) for module in layer}


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def is_module(name: str) -> bool:
  path = PACKAGE / name.replace('.', '/')
  return path.with_suffix('.py').exists() or (path / '__init__.py').exists()


def project_imports(node: ast.AST) -> set[str]:
  """The repvgg_jax modules an import statement imports ('': the package's facade)."""
  names = set()
  if isinstance(node, ast.Import):
    names = {alias.name for alias in node.names}
  elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
    # 'from repvgg_jax.training import steps' imports the module training.steps,
    # 'from repvgg_jax.models import create_model' the module models.
    for alias in node.names:
      submodule = f'{node.module}.{alias.name}'
      names.add(submodule if is_module(submodule[len('repvgg_jax.'):]) else node.module)
  return {name[len('repvgg_jax.'):] if name != 'repvgg_jax' else ''
          for name in names if name == 'repvgg_jax' or name.startswith('repvgg_jax.')}


def modules():
  return {module_name(p): p for p in PACKAGE.rglob('*.py')
          if p.name != '__init__.py' or p.parent != PACKAGE}


def test_every_module_has_a_layer():
  unplaced = sorted(m for m in modules() if m not in LAYER and not m.endswith('training'))
  assert not unplaced, f'add these modules to LAYERS: {unplaced}'


def test_modules_import_only_earlier_layers_and_only_at_the_top():
  problems = []
  for module, path in sorted(modules().items()):
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
      for imported in project_imports(node):
        where = f'{path.relative_to(ROOT)}:{node.lineno}'
        if imported == '':
          problems.append(f'{where}: imports the repvgg_jax facade; import the module itself')
        elif id(node) not in top_level:
          problems.append(f'{where}: imports repvgg_jax.{imported} inside a function')
        elif module in LAYER and imported in LAYER and LAYER[imported] >= LAYER[module]:
          problems.append(f'{where}: {module} (layer {LAYER[module]}) imports {imported} '
                          f'(layer {LAYER[imported]})')
  assert not problems, '\n'.join(problems)


def test_each_module_imports_in_dependency_order_in_a_fresh_interpreter():
  ordered = [m for layer in LAYERS for m in layer]
  script = ''.join(f'import repvgg_jax.{m}\n' for m in ordered)
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
