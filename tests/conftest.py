"""Shared test set-up: float32 at full precision, fast compiles, a non-square batch.

Random model states and the error measure are the project's own
(``repvgg_jax.equivalence``).

Inputs of the every-variant tests are at least 48 pixels on a side: where a feature map is
smaller than the 3x3 kernel (stage 3 of a 32x40 input is 2x3), XLA swaps the convolution's
operands, and that convolution runs as a plain loop, which the fast compiles
(``jax_disable_most_optimizations``) leave unoptimized: RepVGG-D2se's two forward passes
took 13 s at 32x40 and 5 s at 48x64."""

import gc
import os
import sys

# Several CPU devices for the data-parallel tests; must be set before jax starts.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
# Compilation, not execution, dominates these small graphs on 2 cores.
jax.config.update('jax_disable_most_optimizations', True)


# The project's caches of compiled programs and drawn variables, by module: cleared, with
# JAX's own, after the test modules that build the large variants, so that a worker does
# not hold every variant's executables at once (each of the two workers grew to ~11 GB of
# the VM's 24 GB, which then spent its time on page faults). Other modules keep them: the
# small models they compile serve the next module too.
PROGRAM_CACHES = {'repvgg_jax.models': ('exact_forward',),
                  'repvgg_jax.quantization': ('_statistics',),
                  'repvgg_jax.benchmarking': ('_random_states', '_int8_variables',
                                              '_onnx_graph')}
EVERY_VARIANT_MODULES = ('test_reparam', 'test_qarepvgg', 'test_onnx_export', 'test_models',
                         'test_torch_io', 'test_readme', 'test_winograd')


# The longest modules first (seconds of test time on 2 cores, 2026-11-27: test_train 180,
# test_reparam 165, test_qarepvgg 116, test_models 97, test_convert 78, test_torch_io 74,
# test_benchmark 63, test_gpu_checks 51; all 984): `make test` hands whole modules to its
# two workers in collection order (--dist loadfile), and a long module collected last
# (alphabetically, test_train) ran on one worker while the other sat idle.
LONGEST_MODULES = ('test_train', 'test_reparam', 'test_qarepvgg', 'test_models',
                   'test_convert', 'test_torch_io', 'test_benchmark', 'test_gpu_checks')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: the rest as is


@pytest.fixture(autouse=True, scope='module')
def release_compiled_programs(request):
  yield
  if request.module.__name__.rpartition('.')[2] not in EVERY_VARIANT_MODULES:
    return
  for module_name, functions in PROGRAM_CACHES.items():
    module = sys.modules.get(module_name)
    for function in functions if module is not None else ():
      getattr(module, function).cache_clear()
  jax.clear_caches()
  gc.collect()


@pytest.fixture
def images():
  """A non-square NHWC batch of two images."""
  return jax.random.normal(jax.random.PRNGKey(1), (2, 64, 96, 3), jnp.float32)
