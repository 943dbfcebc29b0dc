"""Shared test set-up: float32 at full precision, fast compiles, a non-square batch.

Random model states and the error measure are the project's own
(``repvgg_jax.equivalence``)."""

import os

# Several CPU devices for the data-parallel tests; must be set before jax starts.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
# Compilation, not execution, dominates these small graphs on 2 cores.
jax.config.update('jax_disable_most_optimizations', True)


@pytest.fixture
def images():
  """A non-square NHWC batch of two images."""
  return jax.random.normal(jax.random.PRNGKey(1), (2, 64, 96, 3), jnp.float32)
