"""The project's own CPU kernel, called from jitted JAX through XLA's FFI.

``kernels/winograd_cpu.cc`` computes a stride-1 3x3 convolution + bias by
Winograd F(2x2,3x3) or F(4x4,3x3) in one custom call, its matmuls spread over XLA's
intra-op threads. It backs ``conv_impl='winograd2-native'``/``'winograd4-native'``
(``winograd.py``): at batch 1 on CPU, XLA's own graph of the same algorithm leaves a core
idle and re-reads its intermediates, and XLA:CPU's convolution runs below the ONNX
runtimes (docs/benchmarks.md, "Batch 1 on CPU").

The kernel is compiled on first use with the machine's C++ compiler (``$CXX``, else
``c++``) for the machine's own instruction set (``-march=native``; ``$CXXFLAGS`` come
after, e.g. ``-march=x86-64-v3`` for a cluster of mixed CPUs) against the FFI headers of
the installed jaxlib, into ``$REPVGG_JAX_CACHE`` (default ``~/.cache/repvgg_jax``), keyed
by the source, the jax version, the compiler command and the CPU, and loaded from there
afterwards. CPU only, float32 only.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shlex
import subprocess
import tempfile
from typing import Any

import jax
import jax.numpy as jnp

SOURCE = pathlib.Path(__file__).parent / 'kernels' / 'winograd_cpu.cc'
FFI_TARGET = 'repvgg_winograd_conv3x3'
CXX_FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC')


class NativeKernelError(RuntimeError):
  """The native kernel could not be built or loaded on this machine."""


@functools.cache
def library() -> ctypes.CDLL:
  """The compiled kernel, built on the first call and registered with XLA:CPU."""
  path = _build()
  try:
    lib = ctypes.CDLL(str(path))
  except OSError as e:
    raise NativeKernelError(f'loading the native Winograd kernel {path} failed: {e}') from e
  jax.ffi.register_ffi_target(FFI_TARGET, jax.ffi.pycapsule(lib.RepvggWinogradConv3x3),
                              platform='cpu')
  return lib


@functools.cache
def available() -> bool:
  """Whether the native kernel builds and loads here (it is built if it was not); the
  answer is kept for the process, so a failing build is tried once."""
  try:
    library()
  except NativeKernelError:
    return False
  return True


def lanes() -> int:
  """Floats per vector of the build: out channels are padded to a multiple of it."""
  return int(library().RepvggWinogradLanes())


def panel_width() -> int:
  """Out channels per contiguous kernel panel of the build (a multiple of ``lanes``)."""
  return int(library().RepvggWinogradPanelVectors()) * lanes()


def _out_pad(cout: int) -> int:
  """``cout`` rounded up to whole vectors: the out channels the packed kernel holds."""
  return -(-cout // lanes()) * lanes()


def pack_kernel(transformed: Any) -> jax.Array:
  """The ``(m+2)^2 x (in * out_pad)`` kernel the native conv reads, from a Winograd-domain
  kernel ``(m+2, m+2, in, out)`` (``winograd.transform_kernel``).

  For each position, the out channels are zero-padded to ``out_pad`` (a multiple of
  ``lanes()``) and cut into panels of ``panel_width()``; each panel is stored as a
  contiguous ``[in, width]`` block, in order. Runs on traced kernels too (Flax's init).
  The layout is this machine's build's (AVX-512 and AVX2 differ): store the
  ``reparameterize`` variables, and pack them where they run.
  """
  a, a2, cin, cout = jnp.shape(transformed)
  if a != a2 or a not in (4, 6):
    raise ValueError(f'pack_kernel needs a (4|6, 4|6, in, out) Winograd-domain kernel, got '
                     f'shape {jnp.shape(transformed)}')
  out_pad = _out_pad(cout)
  width = panel_width()
  k = jnp.reshape(jnp.asarray(transformed), (a * a, cin, cout))
  k = jnp.pad(k, ((0, 0), (0, 0), (0, out_pad - cout)))
  return jnp.concatenate([k[:, :, n0:n0 + width].reshape(a * a, -1)
                          for n0 in range(0, out_pad, width)], axis=1)


def unpack_kernel(packed: jax.Array, cout: int) -> jax.Array:
  """The ``(m+2, m+2, in, out)`` Winograd-domain kernel that ``pack_kernel`` packed into
  ``packed`` (jax.numpy: it also runs on traced kernels)."""
  positions, size = packed.shape
  a = round(positions ** 0.5)
  out_pad = _out_pad(cout)
  cin = size // out_pad
  panels, offset = [], 0
  for n0 in range(0, out_pad, panel_width()):
    width = min(panel_width(), out_pad - n0)
    panels.append(packed[:, offset:offset + cin * width].reshape(positions, cin, width))
    offset += cin * width
  return jnp.concatenate(panels, axis=2)[:, :, :cout].reshape(a, a, cin, cout)


def winograd_conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """Stride-1, padding-1 3x3 conv of NHWC float32 ``x`` plus ``bias``, with a
  ``pack_kernel`` kernel: F(2x2,3x3) for 16 positions, F(4x4,3x3) for 36. Under
  ``jax.vmap`` it runs once per mapped element; it has no derivative of its own
  (``winograd.WinogradConv3x3`` gives it the XLA graph's)."""
  library()
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32 or bias.dtype != jnp.float32:
    raise ValueError(f'the native Winograd kernel computes in float32, got x {x.dtype}, '
                     f'kernel {kernel.dtype}, bias {bias.dtype}')
  out = jax.ShapeDtypeStruct(x.shape[:3] + bias.shape, x.dtype)
  return jax.ffi.ffi_call(FFI_TARGET, out, vmap_method='sequential')(x, kernel, bias)


def _build() -> pathlib.Path:
  """Compile ``SOURCE`` into the cache unless it is there; its path."""
  command = (shlex.split(os.environ.get('CXX', 'c++')) + list(CXX_FLAGS)
             + shlex.split(os.environ.get('CXXFLAGS', '')))
  try:
    key = hashlib.sha256(b'\0'.join([
        SOURCE.read_bytes(), jax.__version__.encode(), ' '.join(command).encode(),
        _cpu_signature().encode()])).hexdigest()[:16]
    cache = pathlib.Path(os.environ.get('REPVGG_JAX_CACHE',
                                        pathlib.Path.home() / '.cache' / 'repvgg_jax'))
    path = cache / 'native' / key / 'libwinograd_cpu.so'
    if path.exists():
      return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Compiled to a temporary name and renamed: a concurrent build or an interrupted one
    # never leaves a half-written library under the final name.
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
      built = pathlib.Path(tmp) / path.name
      _compile(command + ['-I', jax.ffi.include_dir(), str(SOURCE), '-o', str(built)])
      os.replace(built, path)
  except NativeKernelError:
    raise
  except (OSError, RuntimeError) as e:  # the cache, the source, jaxlib's headers
    raise NativeKernelError(f'building the native Winograd kernel failed: {e} (the cache '
                            'directory is $REPVGG_JAX_CACHE; the XLA Winograd graph '
                            "'winograd4' needs no build)") from e
  return path


def _compile(command: list[str]) -> None:
  try:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
  except OSError as e:
    raise NativeKernelError(f'the native Winograd kernel needs a C++17 compiler ({command[0]}: '
                            f'{e.strerror}); set CXX, or use the XLA Winograd graph '
                            "('winograd4')") from e
  if result.returncode != 0:
    errors = ([l for l in result.stderr.splitlines() if 'error' in l]
              or [result.stderr.strip()[-300:] or f'exit status {result.returncode}'])
    raise NativeKernelError(f'compiling the native Winograd kernel failed '
                            f'({" ".join(command)}): {errors[0].strip()}')


def _cpu_signature() -> str:
  """What ``-march=native`` compiles for: a library built on one CPU may not run on
  another that shares the cache (a cluster's home directory)."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      flags = next((l for l in f if l.startswith(('flags', 'Features'))), '')
  except OSError:
    flags = ''
  return f'{platform.machine()} {platform.processor()} {flags.strip()}'
