"""Winograd F(2x2,3x3) and F(4x4,3x3) for the stride-1 3x3 convs of the deploy model.

A 3x3 convolution producing an ``m x m`` output tile from an ``(m+2) x (m+2)`` input tile
is ``Y = A^T [(G g G^T) * (B^T d B)] A`` (Lavin & Gray, "Fast Algorithms for Convolutional
Neural Networks", 2016): ``G g G^T`` transforms each 3x3 kernel once (here, at conversion
time), ``B^T d B`` each input tile, ``*`` is a channel contraction per tile position (one
batched matmul over the ``(m+2)^2`` positions), and ``A^T . A`` maps back. F(2x2,3x3)
needs 16 instead of 36 multiplies per output tile (2.25x fewer), F(4x4,3x3) 36 instead
of 144 (4x fewer). The larger transforms of F(4x4) can cost float32 accuracy; with the
kernels transformed in float64 the RepVGG logits stay within ~5e-7 of the training-time
model's, as close as XLA's convolution (docs/benchmarks.md).

Use it through the model's ``conv_impl`` attribute (``convolution.py`` maps it to the
modules here)::

    deploy = rv.create_model('RepVGG-A0', deploy=True, conv_impl='winograd4')
    variables = winograd.transform_kernels(deploy_vars, 'RepVGG-A0', 'winograd4')
    logits = deploy.apply(variables, x)

``transform_kernels`` keeps the tree structure (``reparam_conv/{kernel, bias}``) and
replaces the kernel of every stride-1 3x3 conv by its Winograd-domain kernel, shape
``(m+2, m+2, in/groups, out)``; stride-2 convs (and everything else) are unchanged.

``'winograd2-native'``/``'winograd4-native'`` compute the same F(2x2)/F(4x4) in the
project's compiled CPU kernel (``native.py``), one custom call per conv with the bias
added in it; their kernels are packed for it (``native.pack_kernel``, shape
``((m+2)^2, in * out_pad)``). Grouped convs keep the XLA graph and its kernels. The
native kernel runs on CPU at float32 only, and a ``jax.export`` artifact cannot carry it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax import native
from repvgg_jax.variants import get_variant, layer_specs

# (B^T, G, A^T) of F(m x m, 3x3) with the interpolation points of Lavin & Gray.
_TRANSFORMS = {
    'winograd2': (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    'winograd4': (
        [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}


NATIVE_SUFFIX = '-native'
# The Winograd implementations, by their ``conv_impl`` names: XLA graphs, then the same
# algorithms in the native CPU kernel.
IMPLS = tuple(_TRANSFORMS) + tuple(f'{impl}{NATIVE_SUFFIX}' for impl in _TRANSFORMS)


def _check_impl(conv_impl: str) -> None:
  if conv_impl not in IMPLS:
    raise ValueError(f'conv_impl {conv_impl!r}: the Winograd implementations are '
                     f'{", ".join(IMPLS)}')


def is_native(conv_impl: str) -> bool:
  """Whether ``conv_impl`` runs the native CPU kernel (``'winograd4-native'``)."""
  return conv_impl in IMPLS and conv_impl.endswith(NATIVE_SUFFIX)


def portable(conv_impl: str) -> str:
  """The implementation computing the same as ``conv_impl`` as an XLA graph, which any
  platform runs and a ``jax.export`` artifact carries (``'winograd4-native'`` ->
  ``'winograd4'``; any other ``conv_impl`` is returned as it is)."""
  return conv_impl.removesuffix(NATIVE_SUFFIX) if is_native(conv_impl) else conv_impl


def output_tile(conv_impl: str) -> int:
  """``m``: the side of the output tile of ``conv_impl`` ('winograd2' -> 2)."""
  _check_impl(conv_impl)
  return len(_TRANSFORMS[portable(conv_impl)][2])


def _native_layer(conv_impl: str, groups: int) -> bool:
  """Whether the native kernel computes this layer: grouped convs keep the XLA graph."""
  return is_native(conv_impl) and groups == 1


def transform_kernel(kernel: jax.Array, conv_impl: str, groups: int = 1) -> jax.Array:
  """``G g G^T`` of an HWIO 3x3 kernel: shape ``(m+2, m+2, in/groups, out)``; for a
  native ``conv_impl`` with ``groups=1``, packed for the native kernel
  (``native.pack_kernel``).

  Computed in float64 by numpy when the kernel is concrete, so the transform itself adds
  no rounding beyond the final cast to the kernel's dtype.
  """
  _check_impl(conv_impl)
  if jnp.shape(kernel)[:2] != (3, 3) or jnp.ndim(kernel) != 4:
    raise ValueError(f'Winograd needs a 3x3 HWIO kernel, got shape {jnp.shape(kernel)}')
  transformed = _transform(kernel, portable(conv_impl))
  return native.pack_kernel(transformed) if _native_layer(conv_impl, groups) else transformed


def _transform(kernel: jax.Array, conv_impl: str) -> jax.Array:
  g = np.asarray(_TRANSFORMS[conv_impl][1], np.float64)
  if isinstance(kernel, jax.core.Tracer):
    return jnp.einsum('ik,klco,jl->ijco', g.astype(kernel.dtype), kernel, g.astype(kernel.dtype))
  k = np.asarray(kernel, np.float64)
  return jnp.asarray(np.einsum('ik,klco,jl->ijco', g, k, g), jnp.asarray(kernel).dtype)


def transform_kernels(variables: Mapping[str, Any], model: str,
                      conv_impl: str) -> dict[str, Any]:
  """Deploy variables of RepVGG ``model`` for a model built with Winograd ``conv_impl``.

  The kernel of every stride-1 block (``<stage>_<i>/reparam_conv/kernel``, located with
  ``variants.layer_specs``) is replaced by its Winograd-domain kernel; every other leaf,
  stride-2 blocks included, is unchanged (``convolution.transform_kernels`` accepts every
  ``conv_impl``).

  Args:
    variables: ``{'params': ...}`` of the deploy model, e.g. ``rv.reparameterize(...)``.
    model: the model name, e.g. ``'RepVGG-A0'``.
    conv_impl: one of ``IMPLS``.
  """
  _check_impl(conv_impl)
  params = variables.get('params') if isinstance(variables, Mapping) else None
  if not isinstance(params, Mapping):
    raise ValueError("transform_kernels expects deploy variables {'params': ...}, got "
                     f'{type(variables).__name__}')
  params = dict(params)
  for spec in layer_specs(get_variant(model)):
    if spec.strides != 1:
      continue
    name = spec.module_name
    block = params.get(name)
    if not isinstance(block, Mapping) or 'reparam_conv' not in block:
      raise ValueError(f"params/{name}/reparam_conv: missing; transform_kernels needs the "
                       f'deploy variables of {model} (the output of rv.reparameterize)')
    conv = block['reparam_conv']
    params[name] = {**block, 'reparam_conv': {
        **conv, 'kernel': transform_kernel(conv['kernel'], conv_impl, spec.groups)}}
  return {**variables, 'params': params}


def winograd_conv3x3(x: jax.Array, kernel: jax.Array, conv_impl: str, groups: int = 1,
                     precision: Any = None) -> jax.Array:
  """Stride-1, padding-1 3x3 convolution of NHWC ``x`` with a transformed kernel.

  Args:
    x: ``[N, H, W, C]``.
    kernel: ``transform_kernel(k, conv_impl, groups)`` unpacked, shape
      ``(m+2, m+2, C/groups, out)``.
    conv_impl: one of ``IMPLS``; this is the XLA graph of its algorithm.
    groups: feature groups, as in ``lax.conv_general_dilated``.
  """
  m = output_tile(conv_impl)
  a = m + 2
  bt, _, at = (np.asarray(t, np.float32) for t in _TRANSFORMS[portable(conv_impl)])
  if kernel.shape[:2] != (a, a):
    raise ValueError(f'{conv_impl} needs a ({a}, {a}, in/groups, out) kernel from '
                     f'transform_kernel, got shape {kernel.shape}')
  n, h, w, c = x.shape
  out = kernel.shape[-1]
  th, tw = -(-h // m), -(-w // m)
  # Pad by the conv's 1 on top/left and enough below/right for whole tiles.
  x = jnp.pad(x, ((0, 0), (1, th * m + 1 - h), (1, tw * m + 1 - w), (0, 0)))
  # B^T d B without gathering overlapping tiles: row r of every tile along an axis is a
  # strided slice, and each row of B^T is a linear combination of those slices.
  rows = _combine(bt, lambda r: x[:, r:r + th * m:m], axis=0)            # a, N, th, W', C
  tiles = _combine(bt, lambda r: rows[:, :, :, r:r + tw * m:m], axis=1)  # a, a, N, th, tw, C
  # One matmul per tile position and group: [tiles, C/g] x [C/g, out/g]. The batch
  # dimensions lead in both operands, so XLA transposes nothing (with the groups axis
  # between tiles and channels it copies the kernel, the tiles and the product).
  tiles = tiles.reshape(a, a, n * th * tw, groups, c // groups)
  k = kernel.reshape(a, a, c // groups, groups, out // groups).astype(tiles.dtype)
  if groups == 1:
    prod = jnp.einsum('ijtc,ijco->ijto', tiles[:, :, :, 0], k[:, :, :, 0], precision=precision)
  else:  # groups lead too; this costs copies of the tiles, kernel and product
    prod = jnp.einsum('ijgtc,ijgco->ijtgo', tiles.transpose(0, 1, 3, 2, 4),
                      k.transpose(0, 1, 3, 2, 4), precision=precision)
  prod = prod.reshape(a, a, n, th, tw, out)
  # A^T M A, again as elementwise combinations (a dot with a contraction of a = 4 or 6
  # runs far below the matmul rate), then the tiles back into the image.
  y = _combine(at, lambda i: prod[i], axis=0)   # m, a, N, th, tw, out
  y = _combine(at, lambda j: y[:, j], axis=1)   # m, m, N, th, tw, out
  y = y.transpose(2, 3, 0, 4, 1, 5).reshape(n, th * m, tw * m, out)
  return y[:, :h, :w]


def _combine(matrix: np.ndarray, part: Callable[[int], jax.Array], axis: int) -> jax.Array:
  """``stack_i sum_r matrix[i, r] * part(r)`` along a new leading ``axis``, skipping zeros."""
  parts = [part(r) for r in range(matrix.shape[1])]
  combined = []
  for row in matrix:
    terms = [coef * p if coef != 1 else p for coef, p in zip(row, parts) if coef != 0]
    combined.append(sum(terms[1:], terms[0]))
  return jnp.stack(combined, axis=axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _native_conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                    conv_impl: str) -> jax.Array:
  """``native.winograd_conv3x3``, differentiable: its derivative is that of the XLA graph
  of the same algorithm (the deploy model stays usable for saliency maps, attacks, ...)."""
  del conv_impl  # the packed kernel's shape says which F(m x m)
  return native.winograd_conv3x3(x, kernel, bias)


def _native_conv3x3_forward(x, kernel, bias, conv_impl):
  return _native_conv3x3(x, kernel, bias, conv_impl), (x, kernel)


def _native_conv3x3_backward(conv_impl, residuals, output_cotangent):
  x, kernel = residuals
  unpacked = native.unpack_kernel(kernel, output_cotangent.shape[-1])
  _, vjp = jax.vjp(lambda x, k: winograd_conv3x3(x, k, conv_impl), x, unpacked)
  x_cotangent, kernel_cotangent = vjp(output_cotangent)
  return (x_cotangent, native.pack_kernel(kernel_cotangent),
          jnp.sum(output_cotangent, axis=(0, 1, 2)))


_native_conv3x3.defvjp(_native_conv3x3_forward, _native_conv3x3_backward)


class WinogradConv3x3(nn.Module):
  """A biased stride-1 3x3 conv (padding 1) holding its kernel in the Winograd domain.

  Parameters ``kernel`` (``(m+2, m+2, in/groups, out)``, or packed for the native kernel:
  see ``transform_kernel``) and ``bias`` (``(out,)``): the names of the ``nn.Conv`` it
  replaces.
  """
  features: int
  conv_impl: str
  groups: int = 1
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_per_group = x.shape[-1] // self.groups
    on_native = _native_layer(self.conv_impl, self.groups)

    def init_kernel(key: jax.Array) -> jax.Array:
      spatial = nn.initializers.lecun_normal()(key, (3, 3, in_per_group, self.features))
      return transform_kernel(spatial, self.conv_impl, self.groups)

    if self.has_variable('params', 'kernel'):
      # Flax would refuse another shape too, but without saying where the right one
      # comes from (untransformed kernels, another Winograd implementation's).
      expected = jax.eval_shape(init_kernel, jax.random.PRNGKey(0)).shape
      got = jnp.shape(self.get_variable('params', 'kernel'))
      if got != expected:
        raise ValueError(f'{self.conv_impl} kernel must have shape {expected} '
                         f'(convolution.transform_kernels of the deploy variables for '
                         f'{self.conv_impl!r}), got {got}')
    kernel = self.param('kernel', init_kernel)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    if on_native:
      if jnp.dtype(self.dtype) != jnp.float32:
        raise ValueError(f'conv_impl {self.conv_impl!r} computes in float32 (the native '
                         f'CPU kernel), not {jnp.dtype(self.dtype).name}; use '
                         f'{portable(self.conv_impl)!r} or xla')
      return _native_conv3x3(x.astype(jnp.float32), kernel, bias, self.conv_impl)
    x = x.astype(self.dtype)
    y = winograd_conv3x3(x, kernel.astype(self.dtype), self.conv_impl, self.groups,
                         self.precision)
    return y + bias.astype(self.dtype)
