"""Building blocks: conv-BN, squeeze-excite, and the RepVGG and QARepVGG blocks in both
structures.

Parameter names mirror the three branches of the paper's Figure 4 so that the pure
functions in ``reparam.py`` can find them: a training-time RepVGG block holds ``conv3x3``
(conv + BN), ``conv1x1`` (conv + BN) and, when input and output shapes agree,
``identity`` (a BN). A training-time QARepVGG block holds ``conv3x3`` (conv + BN),
``conv1x1`` (a conv, no BN) and ``bn``, the BatchNorm after the sum; its identity branch
has no parameters, so the block records it as the constant ``identity`` in
``batch_stats`` (the stride, which decides it, is not in the variables). A deploy block
of either kind holds a single biased 3x3 conv, ``reparam_conv``.

As in the Flax ImageNet example, the model builds its layers once and hands them to every
block: ``conv`` (``convolution.conv_layer``: how convolutions are computed, their dtype,
precision and initializer), ``norm`` (``batch_norm``: BatchNorm with PyTorch's constants
and the model's replica axis) and ``dense`` (``nn.Dense`` in the model's dtype and
precision). The defaults build a float32 block with XLA's convolutions.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from repvgg_jax.convolution import ConvLayer, conv_layer
from repvgg_jax.variants import SEPosition

# PyTorch's BatchNorm2d defaults (eps 1e-5, momentum 0.1 = Flax momentum 0.9): the same
# constants make imported statistics and the folded kernels exact.
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

ModuleDef = Callable[..., nn.Module]


def batch_norm(axis_name: Optional[str] = None, dtype: Any = jnp.float32) -> ModuleDef:
  """The model's BatchNorm: ``norm(name=...)(x, use_running_average=not train)``; in
  training its statistics are averaged over the mapped axis ``axis_name`` (None: local)."""
  return functools.partial(nn.BatchNorm, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                           axis_name=axis_name, dtype=dtype)


class ConvBN(nn.Module):
  """A bias-free convolution followed by BatchNorm (``conv`` and ``bn``); with
  ``norm=None`` the convolution alone (QARepVGG's 1x1 branch)."""
  features: int
  kernel_size: int
  strides: int = 1
  groups: int = 1
  conv: ConvLayer = conv_layer()
  norm: Optional[ModuleDef] = batch_norm()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = self.conv(self.features, self.kernel_size, self.strides, self.groups,
                  name='conv')(x)
    if self.norm is None:
      return x
    return self.norm(name='bn')(x, use_running_average=not train)


class SqueezeExcite(nn.Module):
  """Squeeze-and-excitation: channel gates from the global mean of the feature map.

  ``down`` and ``up`` are the official 1x1 convs with bias, held as Dense layers. The
  mean is taken over the whole map of any shape (the official code pools with a
  square window of the map's width and breaks on non-square inputs).
  """
  reduction: int
  dense: ModuleDef = nn.Dense

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.relu(self.dense(channels // self.reduction, name='down')(s))
    s = self.dense(channels, name='up')(s)
    return x * nn.sigmoid(s)


class RepVGGBlock(nn.Module):
  """One RepVGG layer: ``ReLU(3x3 conv-BN + 1x1 conv-BN + BN)`` or its fused 3x3 conv.

  Attributes:
    features: output channels.
    strides: 1 or 2.
    groups: groups of the 3x3 and 1x1 convolutions.
    se: None, ``'pre'`` (SE on the branch sum, before the ReLU: RepVGG-D2se) or
      ``'post'`` (SE after the ReLU: RepVGGplus).
    se_reduction: channel reduction inside the SE block.
    deploy: build the inference structure (one biased 3x3 conv) instead of the branches.
    conv, norm, dense: the model's layers (see the module docstring).
  """
  features: int
  strides: int = 1
  groups: int = 1
  se: SEPosition = None
  se_reduction: int = 16
  deploy: bool = False
  conv: ConvLayer = conv_layer()
  norm: ModuleDef = batch_norm()
  dense: ModuleDef = nn.Dense

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.deploy:
      y = self.conv(self.features, 3, self.strides, self.groups, use_bias=True,
                    name='reparam_conv')(x)
    else:
      y = self.branches(x, train)
    se = SqueezeExcite(self.se_reduction, self.dense, name='se') if self.se else None
    if self.se == 'pre':
      y = se(y)
    y = nn.relu(y)
    if self.se == 'post':
      y = se(y)
    return y

  def has_identity(self, x: jax.Array) -> bool:
    """Whether the block has an identity branch: same channels in and out, stride 1."""
    return x.shape[-1] == self.features and self.strides == 1

  def branches(self, x: jax.Array, train: bool) -> jax.Array:
    """The training-time block before SE and ReLU: the sum of its branches."""
    branch = functools.partial(ConvBN, self.features, strides=self.strides,
                               groups=self.groups, conv=self.conv, norm=self.norm)
    y = branch(3, name='conv3x3')(x, train) + branch(1, name='conv1x1')(x, train)
    if self.has_identity(x):
      y = y + self.norm(name='identity')(x, use_running_average=not train)
    return y


class QARepVGGBlock(RepVGGBlock):
  """One QARepVGG layer (Chu et al., "Make RepVGG Greater Again: A Quantization-aware
  Approach", 2022): ``ReLU(BN(3x3 conv-BN + 1x1 conv + x))``, or its fused 3x3 conv.

  As ``QARepVGGBlockV2`` of the authors' code (cxxgtxy/QARepVGG) and YOLOv6's
  ``QARepVGGBlock``: the 1x1 and identity branches carry no BatchNorm (theirs made the
  fused kernel's weights and the activations too spread out for int8), and one BatchNorm
  (``bn``) normalizes the sum, in every block, with or without the identity (which needs
  equal channels in and out and stride 1). With ``se='pre'`` the SE block comes after
  that BatchNorm (the authors' code puts it before, which the fused conv cannot express).
  Same attributes and deploy structure as ``RepVGGBlock``.
  """

  def branches(self, x: jax.Array, train: bool) -> jax.Array:
    y = (ConvBN(self.features, 3, self.strides, self.groups, self.conv, self.norm,
                name='conv3x3')(x, train)
         + ConvBN(self.features, 1, self.strides, self.groups, self.conv, None,
                  name='conv1x1')(x))
    if self.has_identity(x):
      # A constant that tells reparam.py the sum holds x (see the module docstring).
      self.variable('batch_stats', 'identity', lambda: jnp.ones((), jnp.float32))
      y = y + x.astype(y.dtype)
    return self.norm(name='bn')(y, use_running_average=not train)


# The training-time blocks by the names of the model's ``block`` field.
BLOCKS = {'repvgg': RepVGGBlock, 'qarepvgg': QARepVGGBlock}
