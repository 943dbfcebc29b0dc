"""How the model computes its convolutions: the ``conv_impl`` of ``create_model``.

The one place that maps a ``conv_impl`` to the conv layers the blocks build
(``conv_layer``) and to the deploy kernels those layers want (``transform_kernels``). The
implementations give the same function with the same variables, except that Winograd wants
its kernels transformed:

- ``'xla'``: ``lax.conv_general_dilated`` everywhere (the default).
- ``'patches'``: convolutions whose output map has at most ``PATCHES_MAX_OUTPUT_PIXELS``
  pixels as one matmul each, XLA's convolution elsewhere; both structures. A CPU
  work-around (``conv_by_patches``), used to train at 28-32 pixels on CPU.
- ``'winograd2'``, ``'winograd4'``: the deploy structure only; its stride-1 3x3 convs by
  Winograd F(2x2,3x3) / F(4x4,3x3) (``winograd.py``) as XLA graphs.
- ``'winograd2-native'``, ``'winograd4-native'``: the same in the project's compiled CPU
  kernel (``native.py``): the fastest on CPU at float32, built on first use (a C++
  compiler is needed); CPU and float32 only, and not for ``jax.export``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from repvgg_jax import native, winograd

CONV_IMPLS = ('xla', 'patches') + winograd.IMPLS
# conv_impl='patches' computes the convs with an output map up to this size by im2col.
PATCHES_MAX_OUTPUT_PIXELS = 4


def check_conv_impl(conv_impl: str, deploy: bool) -> None:
  """Raise ValueError unless ``conv_impl`` can build the structure (deploy or not)."""
  accepted = CONV_IMPLS if deploy else tuple(c for c in CONV_IMPLS if c not in winograd.IMPLS)
  if conv_impl not in accepted:
    raise ValueError(f'conv_impl {conv_impl!r}: accepted for the '
                     f'{"deploy" if deploy else "training-time"} structure are '
                     f'{", ".join(accepted)} (Winograd only with deploy=True)')


def default_conv_impl(platform: str, dtype: Any = jnp.float32, portable: bool = False) -> str:
  """The fastest measured conv implementation of the deploy model on ``platform``.

  On CPU at float32, Winograd F(4x4,3x3), with a logits error of ~5e-7 relative to the
  training-time model: in the native CPU kernel where it builds here (RepVGG-A0 at 224,
  batch 1: 1.5-1.6x XLA's convolution, docs/benchmarks.md), else as an XLA graph (1.6-2x
  faster than XLA's convolution for the layers with 96 or more channels at batch 8, level
  at 48). ``portable=True`` leaves out the native kernel, for graphs that ``jax.export``
  serializes. Elsewhere (and in reduced precision, where the larger F(4x4) transforms
  cost accuracy) XLA's own convolution.
  """
  if platform != 'cpu' or jnp.dtype(dtype) != jnp.float32:
    return 'xla'
  return 'winograd4' if portable or not native.available() else 'winograd4-native'


# Flax's default for convolution kernels (variance 1/fan_in); training scales it with the
# config's conv_init_scale.
DEFAULT_KERNEL_INIT = nn.initializers.lecun_normal()

# conv(features, kernel_size, strides=1, groups=1, use_bias=False, name=None) -> a module.
ConvLayer = Callable[..., nn.Module]


def conv_layer(conv_impl: str = 'xla', *, dtype: Any = jnp.float32, precision: Any = None,
               kernel_init: Callable[..., jax.Array] = DEFAULT_KERNEL_INIT) -> ConvLayer:
  """The conv layer a model hands to its blocks, built once (as the Flax examples' ``conv
  = partial(nn.Conv, ...)``): ``conv(features, kernel_size, strides=1, groups=1,
  use_bias=False, name=None)`` is a square convolution with PyTorch's symmetric padding,
  computed as ``conv_impl`` says; with Winograd, a biased stride-1 3x3 conv holds its
  kernel in the Winograd domain (``winograd.WinogradConv3x3``)."""

  def conv(features: int, kernel_size: int, strides: int = 1, groups: int = 1,
           use_bias: bool = False, name: Optional[str] = None) -> nn.Module:
    if conv_impl in winograd.IMPLS and (kernel_size, strides, use_bias) == (3, 1, True):
      return winograd.WinogradConv3x3(features, conv_impl, groups, dtype, precision,
                                      name=name)
    # Explicit symmetric padding, as in PyTorch: with stride 2, 'SAME' would pad (0, 1)
    # and shift the 3x3 window off the 1x1 branch's sampling grid.
    pad = kernel_size // 2
    return nn.Conv(features, (kernel_size, kernel_size), strides=strides,
                   padding=((pad, pad), (pad, pad)), feature_group_count=groups,
                   use_bias=use_bias, dtype=dtype, precision=precision,
                   kernel_init=kernel_init,
                   conv_general_dilated=conv_by_patches if conv_impl == 'patches' else None,
                   name=name)
  return conv


def transform_kernels(variables: Mapping[str, Any], model: str,
                      conv_impl: str) -> dict[str, Any]:
  """The deploy variables of ``model`` (``rv.reparameterize``'s) as a deploy model built
  with ``conv_impl`` wants them: Winograd-domain kernels for the Winograd implementations
  (``winograd.transform_kernels``), the tree unchanged otherwise."""
  check_conv_impl(conv_impl, deploy=True)
  if conv_impl in winograd.IMPLS:
    return winograd.transform_kernels(variables, model, conv_impl)
  return dict(variables)


def conv_by_patches(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                    dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                    precision=None, preferred_element_type=None) -> jax.Array:
  """``lax.conv_general_dilated`` for Flax's NHWC/HWIO convs, as matmuls on tiny maps.

  XLA:CPU (jaxlib 0.10) convolves feature maps of 2x2 or less (stages 3 and 4 of a 32x32
  input) at a tenth of its usual speed (5 instead of 40-60 GFLOP/s on a 2-core VM), and
  the input gradient of the stride-2 stage-4 conv (1280 channels) is slower still. The
  same arithmetic as one matmul runs at full speed: im2col (``_conv_by_im2col``), or,
  when the input map has fewer pixels than the kernel, the whole map times a kernel
  matrix (``_conv_as_dense_matmul``), which spends no multiply on padding. Larger maps,
  grouped and dilated convs keep XLA's convolution, which is fast there and compiles
  faster.
  """
  plain = (_small_output(lhs.shape, rhs.shape, window_strides, padding)
           and feature_group_count == 1 and batch_group_count == 1
           and all(d == 1 for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1)))
           and _is_nhwc(lhs.shape, rhs.shape, dimension_numbers))
  if not plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type)
  matmul = functools.partial(jnp.matmul, precision=precision,
                             preferred_element_type=preferred_element_type)
  if lhs.shape[1] * lhs.shape[2] < rhs.shape[0] * rhs.shape[1]:
    return _conv_as_dense_matmul(lhs, rhs, window_strides, padding, matmul)
  return _conv_by_im2col(lhs, rhs, window_strides, padding, matmul)


def _conv_by_im2col(lhs, rhs, window_strides, padding, matmul) -> jax.Array:
  """Every output pixel's padded window of taps, times the flattened kernel."""
  kh, kw, cin, cout = rhs.shape
  (sh, sw), ((pt, pb), (pl, pr)) = window_strides, padding
  x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  taps = [x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
          for i in range(kh) for j in range(kw)]
  patches = jnp.concatenate(taps, axis=-1) if len(taps) > 1 else taps[0]
  return matmul(patches, rhs.reshape(kh * kw * cin, cout))


def _conv_as_dense_matmul(lhs, rhs, window_strides, padding, matmul) -> jax.Array:
  """The flattened input map times a (in pixels * cin, out pixels * cout) matrix whose
  block (input pixel q, output pixel p) is the kernel tap that q falls on in p's window,
  or zero. A 3x3 conv on a 2x2 map costs 16 instead of im2col's 36 products per pair of
  channels (RepVGG's stage 3 at 32x32 input); its gradient is two matmuls and a
  scatter-add of the (small) matrix into the kernel."""
  kh, kw, cin, cout = rhs.shape
  n, h, w, _ = lhs.shape
  (sh, sw), ((pt, pb), (pl, pr)) = window_strides, padding
  ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
  no_tap = kh * kw  # the index of an all-zero tap appended to the kernel's taps
  tap = np.full((h, w, ho, wo), no_tap)
  for qi, qj, pi, pj in np.ndindex(h, w, ho, wo):
    ti, tj = qi - pi * sh + pt, qj - pj * sw + pl
    if 0 <= ti < kh and 0 <= tj < kw:
      tap[qi, qj, pi, pj] = ti * kw + tj
  taps = jnp.concatenate([rhs.reshape(kh * kw, cin, cout), jnp.zeros((1, cin, cout), rhs.dtype)])
  matrix = taps[tap.reshape(h * w, ho * wo)].transpose(0, 2, 1, 3)  # (q, cin, p, cout)
  y = matmul(lhs.reshape(n, h * w * cin), matrix.reshape(h * w * cin, ho * wo * cout))
  return y.reshape(n, ho, wo, cout)


def _is_nhwc(lhs_shape, rhs_shape, dimension_numbers) -> bool:
  as_given = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
  return as_given == lax.conv_dimension_numbers(lhs_shape, rhs_shape, ('NHWC', 'HWIO', 'NHWC'))


def _small_output(lhs_shape, rhs_shape, window_strides, padding) -> bool:
  """Whether the NHWC conv's output map has at most ``PATCHES_MAX_OUTPUT_PIXELS`` pixels."""
  if isinstance(padding, str) or len(lhs_shape) != 4:
    return False
  pixels = 1
  for size, kernel, stride, (low, high) in zip(lhs_shape[1:3], rhs_shape[:2], window_strides,
                                               padding):
    pixels *= (size + low + high - kernel) // stride + 1
  return pixels <= PATCHES_MAX_OUTPUT_PIXELS
