"""XLA's backend as the command lines start it: whether it has started (it reads
``XLA_FLAGS`` only then), and the XLA:CPU flags this project's graphs run fastest with."""

from __future__ import annotations

import importlib.metadata
import os

try:
  # jax has no public "has a backend started?" (XLA reads XLA_FLAGS only then); without
  # this private query, set_cpu_flags assumes none has and sets the flags anyway.
  from jax._src.xla_bridge import backends_are_initialized  # pylint: disable=g-importing-member
except ImportError:
  def backends_are_initialized() -> bool:
    return False

# XLA:CPU's YNNPACK fusions made the RepVGG graphs 1.5-2x slower than XLA's own
# convolution emitter on the 2-core benchmark machine (docs/benchmarks.md); an empty fusion
# type list turns them off. XLA reads XLA_FLAGS once, when the first backend starts.
CPU_FAST_FLAGS = '--xla_cpu_experimental_ynn_fusion_type='


def set_cpu_flags(enable: bool = True) -> bool:
  """Add ``CPU_FAST_FLAGS`` to ``XLA_FLAGS``; True when they are (or already were) set.

  XLA reads the flags when its first backend starts: once JAX has computed anything, this
  changes nothing and returns False. Nor does it where a GPU/TPU plugin is installed: the
  CPU is not the device there, and an XLA that does not know a flag refuses to start.
  """
  if CPU_FAST_FLAGS.split('=')[0] in os.environ.get('XLA_FLAGS', ''):
    return True
  if not enable or backends_are_initialized() or _accelerator_plugin_installed():
    return False
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_FAST_FLAGS}".strip()
  return True


def _accelerator_plugin_installed() -> bool:
  names = ((d.metadata.get('Name') or '').lower() for d in importlib.metadata.distributions())
  return any(n.startswith(('jax-cuda', 'jax_cuda', 'jax-rocm', 'jax_rocm', 'libtpu'))
             for n in names)
