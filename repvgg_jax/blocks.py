"""Building blocks: conv-BN, squeeze-excite, and the RepVGG block in both structures.

Parameter names mirror the three branches of the paper's Figure 4 so that the pure
functions in ``reparam.py`` can find them: a training-time block holds ``conv3x3``
(conv + BN), ``conv1x1`` (conv + BN) and, when input and output shapes agree,
``identity`` (a BN); a deploy block holds a single biased 3x3 conv, ``reparam_conv``.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from repvgg_jax.convolution import WINOGRAD_IMPLS, conv_general_dilated
from repvgg_jax.variants import SEPosition
from repvgg_jax.winograd import WinogradConv3x3

# PyTorch's BatchNorm2d defaults (eps 1e-5, momentum 0.1 = Flax momentum 0.9): the same
# constants make imported statistics and the folded kernels exact.
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

Dtype = Any
Precision = Any
Initializer = Any
# Flax's default for convolution kernels (variance 1/fan_in); train_lib scales it with the
# config's conv_init_scale.
DEFAULT_KERNEL_INIT = nn.initializers.lecun_normal()


def _padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  # Explicit symmetric padding, as in PyTorch: with stride 2, 'SAME' would pad (0, 1)
  # and shift the 3x3 window off the 1x1 branch's sampling grid.
  p = kernel_size // 2
  return ((p, p), (p, p))


def batch_norm(train: bool, axis_name: Optional[str], dtype: Dtype, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(
      use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
      axis_name=axis_name if train else None, dtype=dtype, name=name)


class ConvBN(nn.Module):
  """A bias-free convolution followed by BatchNorm (``conv`` and ``bn``); ``conv_impl``:
  ``'xla'`` or ``'patches'`` (see ``convolution.py``)."""
  features: int
  kernel_size: int
  strides: int = 1
  groups: int = 1
  dtype: Dtype = jnp.float32
  precision: Precision = None
  bn_axis_name: Optional[str] = None
  conv_impl: str = 'xla'
  kernel_init: Initializer = DEFAULT_KERNEL_INIT

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    k = self.kernel_size
    x = nn.Conv(self.features, (k, k), strides=self.strides, padding=_padding(k),
                feature_group_count=self.groups, use_bias=False, dtype=self.dtype,
                precision=self.precision, kernel_init=self.kernel_init,
                conv_general_dilated=conv_general_dilated(self.conv_impl), name='conv')(x)
    return batch_norm(train, self.bn_axis_name, self.dtype, 'bn')(x)


class SqueezeExcite(nn.Module):
  """Squeeze-and-excitation: channel gates from the global mean of the feature map.

  ``down`` and ``up`` are the official 1x1 convs with bias, held as Dense layers. The
  mean is taken over the whole map of any shape (the official code pools with a
  square window of the map's width and breaks on non-square inputs).
  """
  reduction: int
  dtype: Dtype = jnp.float32
  precision: Precision = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.Dense(channels // self.reduction, dtype=self.dtype, precision=self.precision,
                 name='down')(s)
    s = nn.relu(s)
    s = nn.Dense(channels, dtype=self.dtype, precision=self.precision, name='up')(s)
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
    conv_impl: how the convolutions are computed (``convolution.CONV_IMPLS``): ``'xla'``,
      ``'patches'``, or in a deploy block ``'winograd2'``/``'winograd4'``, whose stride-1
      conv is a ``winograd.WinogradConv3x3`` with a Winograd-domain kernel (see
      ``winograd.transform_kernels``; stride-2 blocks keep XLA's conv).
    kernel_init: initializer of the training-time branch kernels.
  """
  features: int
  strides: int = 1
  groups: int = 1
  se: SEPosition = None
  se_reduction: int = 16
  deploy: bool = False
  dtype: Dtype = jnp.float32
  precision: Precision = None
  bn_axis_name: Optional[str] = None
  conv_impl: str = 'xla'
  kernel_init: Initializer = DEFAULT_KERNEL_INIT

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.deploy and self.conv_impl in WINOGRAD_IMPLS and self.strides == 1:
      y = WinogradConv3x3(self.features, self.conv_impl, self.groups, self.dtype,
                          self.precision, name='reparam_conv')(x)
    elif self.deploy:
      y = nn.Conv(self.features, (3, 3), strides=self.strides, padding=_padding(3),
                  feature_group_count=self.groups, use_bias=True, dtype=self.dtype,
                  precision=self.precision,
                  conv_general_dilated=conv_general_dilated(self.conv_impl),
                  name='reparam_conv')(x)
    else:
      branch = dict(features=self.features, strides=self.strides, groups=self.groups,
                    dtype=self.dtype, precision=self.precision,
                    bn_axis_name=self.bn_axis_name, conv_impl=self.conv_impl,
                    kernel_init=self.kernel_init)
      y = ConvBN(kernel_size=3, name='conv3x3', **branch)(x, train)
      y = y + ConvBN(kernel_size=1, name='conv1x1', **branch)(x, train)
      if x.shape[-1] == self.features and self.strides == 1:
        y = y + batch_norm(train, self.bn_axis_name, self.dtype, 'identity')(x)
    se = SqueezeExcite(self.se_reduction, self.dtype, self.precision, name='se') if self.se else None
    if self.se == 'pre':
      y = se(y)
    y = nn.relu(y)
    if self.se == 'post':
      y = se(y)
    return y
