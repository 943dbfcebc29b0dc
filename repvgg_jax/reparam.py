"""Structural re-parameterization (the paper's Figure 4) as pure functions.

A training-time block computes ``BN3(conv(x, K3)) + BN1(conv(x, K1)) + BNid(x)``. Each
``BN(conv(x, K))`` equals ``conv(x, K * t) + (beta - mean * t)`` with
``t = gamma / sqrt(var + eps)``; the 1x1 kernel is the centre of a zero 3x3 kernel and
the identity a 3x3 kernel with a 1 at the centre of each channel's own input. Convolution
is linear in the kernel, so the block is one 3x3 conv with the sum of the three kernels
and biases.

A QARepVGG block (``blocks.QARepVGGBlock``) computes ``BN(BN3(conv(x, K3)) + conv(x, K1)
+ x)``: the branch sum is one conv with kernel ``K3 * t3 + pad(K1) + I`` and bias
``beta3 - mean3 * t3``, and the BatchNorm after it folds into that biased conv the same
way (``fuse_qa_block``).

Everything here is a function of arrays and pytrees: no module instance, no mutation;
``reparameterize`` is jit-able and differentiable with respect to the training params.
Kernels are in Flax's HWIO layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax.blocks import BN_EPSILON

Array = jax.Array
Tree = Mapping[str, Any]

# Names of the branches of a training-time block (blocks.RepVGGBlock), and of the
# BatchNorm after the branch sum of a QARepVGG block (blocks.QARepVGGBlock).
BRANCHES = ('conv3x3', 'conv1x1', 'identity')
POST_BN = 'bn'


def fuse_bn(kernel: Array, bn_params: Tree, bn_stats: Tree, bias: Any = 0.0,
            eps: float = BN_EPSILON) -> tuple[Array, Array]:
  """Fold inference-mode BatchNorm into the preceding conv (bias-free, or with ``bias``):
  ``(K', b')`` with ``K' = K * t``, ``b' = beta + (bias - mean) * t``."""
  t = bn_params['scale'] / jnp.sqrt(bn_stats['var'] + eps)
  return kernel * t, bn_params['bias'] + (bias - bn_stats['mean']) * t


def pad_1x1_to_3x3(kernel: Array) -> Array:
  """A 1x1 kernel as the centre of an otherwise zero 3x3 kernel."""
  return jnp.pad(kernel, ((1, 1), (1, 1), (0, 0), (0, 0)))


def identity_kernel(channels: int, groups: int = 1, dtype: Any = jnp.float32) -> Array:
  """The 3x3 kernel of ``y = x``: output channel i reads its own input at the centre.

  With groups, output channel i sees only the ``channels // groups`` inputs of its
  group, among which its own input has index ``i % (channels // groups)``.
  """
  per_group = channels // groups
  kernel = np.zeros((3, 3, per_group, channels), np.float32)
  outputs = np.arange(channels)
  kernel[1, 1, outputs % per_group, outputs] = 1
  return jnp.asarray(kernel, dtype)


def branch_kernels(params: Tree, stats: Tree) -> list[tuple[Array, Array]]:
  """Each branch of a training-time block as an equivalent 3x3 kernel and bias."""
  k3 = params['conv3x3']['conv']['kernel']
  kernels = [
      fuse_bn(k3, params['conv3x3']['bn'], stats['conv3x3']['bn']),
      fuse_bn(pad_1x1_to_3x3(params['conv1x1']['conv']['kernel']),
              params['conv1x1']['bn'], stats['conv1x1']['bn']),
  ]
  if 'identity' in params:
    channels = k3.shape[-1]
    groups = channels // k3.shape[-2]
    kernels.append(fuse_bn(identity_kernel(channels, groups, k3.dtype),
                           params['identity'], stats['identity']))
  return kernels


def fuse_qa_block(params: Tree, stats: Tree) -> tuple[Array, Array]:
  """A training-time QARepVGG block as one 3x3 kernel and bias: the BN after the sum
  folded into ``K3 * t3 + pad(K1) [+ I]`` with bias ``beta3 - mean3 * t3``."""
  k3, b3 = fuse_bn(params['conv3x3']['conv']['kernel'], params['conv3x3']['bn'],
                   stats['conv3x3']['bn'])
  kernel = k3 + pad_1x1_to_3x3(params['conv1x1']['conv']['kernel'])
  if 'identity' in stats:  # the block's marker of its parameter-free identity branch
    channels = k3.shape[-1]
    kernel = kernel + identity_kernel(channels, channels // k3.shape[-2], k3.dtype)
  return fuse_bn(kernel, params[POST_BN], stats[POST_BN], bias=b3)


def fuse_block(params: Tree, stats: Tree) -> dict[str, Array]:
  """The deploy conv ``{'kernel', 'bias'}`` of one training-time block, RepVGG or
  QARepVGG (which holds a BatchNorm ``bn`` after its branch sum)."""
  if POST_BN in params:
    kernel, bias = fuse_qa_block(params, stats)
    return {'kernel': kernel, 'bias': bias}
  kernels, biases = zip(*branch_kernels(params, stats))
  return {'kernel': sum(kernels), 'bias': sum(biases)}


def reparameterize(variables: Tree) -> dict[str, Any]:
  """Map training-time variables to the deploy variables of the same model.

  Every training-time block (a subtree holding ``conv3x3``/``conv1x1``[/``identity``],
  or a QARepVGG block's ``conv3x3``/``conv1x1``/``bn``) becomes
  ``{'reparam_conv': {'kernel', 'bias'}}``; its other parameters (the SE block) pass
  through unchanged. RepVGGplus's auxiliary heads (``*_aux``), used only in
  training, are dropped. Everything else (stem-less layers, the classifier, or modules
  of a larger model around a RepVGG backbone) passes through, with its ``batch_stats``.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}`` of a training-time model.

  Returns:
    ``{'params': ...}`` (plus ``'batch_stats'`` of any non-RepVGG BatchNorm), with the
    structure, shapes and dtypes of the deploy model's ``init``.

  Raises:
    ValueError: naming the offending path when the tree is not a training-time tree.
  """
  if not isinstance(variables, Mapping) or 'params' not in variables:
    raise ValueError('reparameterize expects the variables of a training-time model, '
                     "{'params': ..., 'batch_stats': ...}; got "
                     f'{_describe(variables)}')
  if 'batch_stats' not in variables:
    if _find_block(variables['params'], 'reparam_conv'):
      raise ValueError(
          'reparameterize got a deploy tree (it holds '
          f"'{_find_block(variables['params'], 'reparam_conv')}/reparam_conv' and no "
          "'batch_stats'); pass the training-time variables instead")
    raise ValueError("reparameterize needs 'batch_stats' (the BatchNorm running "
                     'statistics) next to \'params\'; got only '
                     f'{sorted(variables)}')
  if not _find_block(variables['params'], 'conv3x3'):
    raise ValueError('no training-time RepVGG block (a subtree with conv3x3/conv1x1) in '
                     "variables['params']" + (
                         ' (it holds reparam_conv: already a deploy tree?)'
                         if _find_block(variables['params'], 'reparam_conv') else ''))
  params, stats = _convert(variables['params'], variables['batch_stats'], ())
  return {'params': params, **({'batch_stats': stats} if stats else {})}


def _convert(params: Tree, stats: Tree, path: tuple[str, ...]) -> tuple[dict, dict]:
  """Recursively fuse the blocks under ``params``; returns (params, leftover stats)."""
  if 'conv3x3' in params or 'conv1x1' in params:
    _check_block(params, stats, path)
    extra = {k: v for k, v in params.items() if k not in BRANCHES + (POST_BN,)}
    return {'reparam_conv': fuse_block(params, stats), **extra}, {}
  if 'reparam_conv' in params:
    raise ValueError(f"{_path(path + ('reparam_conv',))}: a deploy block inside a "
                     'training-time tree; pass the variables of the training-time model')
  out_params, out_stats = {}, {}
  for key, value in params.items():
    if key.endswith('_aux'):
      continue  # RepVGGplus auxiliary classifiers exist only for training.
    if isinstance(value, Mapping):
      out_params[key], sub_stats = _convert(
          value, stats.get(key, {}) if isinstance(stats, Mapping) else {}, path + (key,))
      if sub_stats:
        out_stats[key] = sub_stats
    else:
      out_params[key] = value
      if isinstance(stats, Mapping) and key in stats:
        out_stats[key] = stats[key]
  # Statistics of BatchNorms outside RepVGG blocks (a BN layer of an enclosing model).
  for key, value in (stats.items() if isinstance(stats, Mapping) else ()):
    if key not in params and not key.endswith('_aux'):
      out_stats[key] = value
  return out_params, out_stats


def _check_block(params: Tree, stats: Tree, path: tuple[str, ...]) -> None:
  """Raise a ValueError naming the first leaf of a block that is missing or misshapen."""
  def leaf(tree, keys, where):
    for i, key in enumerate(keys):
      if not isinstance(tree, Mapping) or key not in tree:
        raise ValueError(f'{_path(path + keys[:i + 1])}: missing in {where} of the '
                         f'training-time block {_path(path)} (it holds '
                         f'{sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__})')
      tree = tree[key]
    return tree

  k3 = leaf(params, ('conv3x3', 'conv', 'kernel'), 'params')
  if jnp.ndim(k3) != 4 or jnp.shape(k3)[:2] != (3, 3):
    raise ValueError(f"{_path(path + ('conv3x3', 'conv', 'kernel'))}: expected a 3x3 HWIO "
                     f'kernel (3, 3, in/groups, out), got shape {jnp.shape(k3)}')
  per_group, out = jnp.shape(k3)[2:]
  expected = {('conv3x3', 'conv', 'kernel'): (3, 3, per_group, out),
              ('conv1x1', 'conv', 'kernel'): (1, 1, per_group, out)}
  if POST_BN in params:  # QARepVGG: BN on the 3x3 branch and after the sum.
    norms = [('conv3x3', 'bn'), (POST_BN,)]
    identity = 'identity' in stats
  else:
    identity = 'identity' in params
    norms = [('conv3x3', 'bn'), ('conv1x1', 'bn')] + ([('identity',)] if identity else [])
  for prefix in norms:
    for name in ('scale', 'bias'):
      expected[prefix + (name,)] = (out,)
    for name in ('mean', 'var'):
      got = jnp.shape(leaf(stats, prefix + (name,), 'batch_stats'))
      if got != (out,):
        raise ValueError(f'{_path(path + prefix + (name,))} (batch_stats): expected shape '
                         f'{(out,)}, got {got}')
  for keys, shape in expected.items():
    got = jnp.shape(leaf(params, keys, 'params'))
    if got != shape:
      raise ValueError(f'{_path(path + keys)}: expected shape {shape}, got {got}')
  if identity and out % per_group:
    raise ValueError(f'{_path(path)}: an identity branch needs in == out channels, but '
                     f'{out} outputs are not a multiple of {per_group} inputs per group')


def _find_block(tree: Any, key: str, path: tuple[str, ...] = ()) -> str:
  """Path of the first subtree holding ``key``, or '' if none does."""
  if not isinstance(tree, Mapping):
    return ''
  if key in tree:
    return _path(path) or '<root>'
  for k, v in tree.items():
    found = _find_block(v, key, path + (k,))
    if found:
      return found
  return ''


def _path(keys: tuple[str, ...]) -> str:
  return '/'.join(keys)


def _describe(x: Any) -> str:
  return f'keys {sorted(x)}' if isinstance(x, Mapping) else type(x).__name__
