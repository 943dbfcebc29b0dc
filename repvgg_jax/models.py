"""RepVGG and RepVGGplus in both structures, and ``create_model``.

The same module class builds the training-time structure (three branches per block,
BatchNorm statistics in ``batch_stats``) and, with ``deploy=True``, the inference
structure (a plain stack of biased 3x3 convs and ReLUs). ``repvgg_jax.reparameterize``
maps the variables of the first onto those of the second.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from repvgg_jax.blocks import BLOCKS, ConvBN, ModuleDef, RepVGGBlock, batch_norm
from repvgg_jax.convolution import DEFAULT_KERNEL_INIT, ConvLayer, check_conv_impl, conv_layer
from repvgg_jax.variants import (AUX_STAGES, MIN_IMAGE_SIZE, Variant, get_variant,
                                 layer_specs, stage_names)

# Compute dtypes by the names configs and command lines use.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _as_logits(x: jax.Array) -> jax.Array:
  # Losses want at least float32 logits, whatever the compute dtype (bfloat16 included).
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class AuxHead(nn.Module):
  """RepVGGplus auxiliary classifier: 3x3/2 conv-BN-ReLU, global mean, linear."""
  num_classes: int
  conv: ConvLayer
  norm: ModuleDef
  dense: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = ConvBN(x.shape[-1], 3, strides=2, conv=self.conv, norm=self.norm,
               name='downsample')(x, train)
    x = jnp.mean(nn.relu(x), axis=(1, 2))
    return _as_logits(self.dense(self.num_classes, name='fc')(x))


class RepVGG(nn.Module):
  """RepVGG / RepVGGplus classifier (NHWC input).

  Attributes:
    variant: the architecture, see ``repvgg_jax.variants``.
    num_classes: classifier outputs; 0 returns the pooled features instead of logits.
    deploy: build the inference structure.
    dtype: compute dtype (parameters stay float32); logits are returned in float32 or
      wider.
    precision: matmul/conv precision, e.g. ``'highest'`` for exact float32 on GPU/TPU.
    bn_axis_name: mapped axis over which training-time BatchNorm statistics are
      averaged (the ``axis_name`` of ``jax.pmap``/``shard_map``), None for local.
    conv_impl: how convolutions are computed, one of ``convolution.CONV_IMPLS``:
      ``'xla'``; ``'patches'`` (matmuls on tiny maps, for CPU training); deploy only,
      Winograd for the stride-1 convs (``'winograd2'``/``'winograd4'`` as XLA graphs,
      ``'winograd2-native'``/``'winograd4-native'`` in the native CPU kernel), whose
      variables come from ``convolution.transform_kernels``.
    kernel_init: initializer of the training-time conv kernels (Flax's LeCun normal).
    block: the training-time block, ``'repvgg'`` (``blocks.RepVGGBlock``) or
      ``'qarepvgg'`` (``blocks.QARepVGGBlock``, quantization-friendly); both fold into
      the same deploy structure.
  """
  variant: Variant
  num_classes: int = 1000
  deploy: bool = False
  dtype: Any = jnp.float32
  precision: Any = None
  bn_axis_name: Optional[str] = None
  conv_impl: str = 'xla'
  kernel_init: Callable[..., jax.Array] = DEFAULT_KERNEL_INIT
  block: str = 'repvgg'

  def setup(self):
    v = self.variant
    check_conv_impl(self.conv_impl, self.deploy)
    if self.block not in BLOCKS:
      raise ValueError(f'block {self.block!r}: accepted are {", ".join(BLOCKS)}')
    # The layers every block uses, built once.
    conv = conv_layer(self.conv_impl, dtype=self.dtype, precision=self.precision,
                      kernel_init=self.kernel_init)
    norm = batch_norm(self.bn_axis_name, self.dtype)
    dense = functools.partial(nn.Dense, dtype=self.dtype, precision=self.precision)
    block = functools.partial(BLOCKS[self.block], se=v.se, se_reduction=v.se_reduction,
                              deploy=self.deploy, conv=conv, norm=norm, dense=dense)
    stages: dict[str, list[RepVGGBlock]] = {}
    for spec in layer_specs(v):
      stages.setdefault(spec.stage, []).append(
          block(spec.features, strides=spec.strides, groups=spec.groups))
    self.stage0 = stages.pop('stage0')[0]
    for name, blocks in stages.items():
      setattr(self, name, blocks)  # Flax names list members '<attr>_<i>', e.g. 'stage2_3'.
    if self.num_classes:
      self.linear = dense(self.num_classes)
    if v.plus and not self.deploy:
      for name in AUX_STAGES:
        setattr(self, f'{name}_aux', AuxHead(self.num_classes, conv, norm, dense))

  def _stage_outputs(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    if x.ndim != 4:
      raise ValueError(f'expected an NHWC batch of images (4 dims), got shape {x.shape}')
    outputs = {'stage0': self.stage0(x, train)}
    x = outputs['stage0']
    for name in stage_names(self.variant)[1:]:
      for blk in getattr(self, name):
        x = blk(x, train)
      outputs[name] = x
    return outputs

  def features(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    """The feature pyramid: outputs of stage0..stage4, at strides 2, 4, 8, 16, 32.

    Use as ``model.apply(variables, x, method='features')``, in either structure.
    """
    outputs = self._stage_outputs(x, train)
    if 'stage3_second' in outputs:
      outputs['stage3'] = outputs.pop('stage3_second')
      del outputs['stage3_first']
    return {f'stage{i}': outputs[f'stage{i}'] for i in range(5)}

  def __call__(self, x: jax.Array, train: bool = False
               ) -> Union[jax.Array, dict[str, jax.Array]]:
    """Logits ``[N, num_classes]`` (float32, or float64 for a float64 model).

    A training-time RepVGGplus called with ``train=True`` returns a dict with the
    main logits under ``'main'`` and each auxiliary head's under ``'<stage>_aux'``.
    """
    outputs = self._stage_outputs(x, train)
    pooled = jnp.mean(outputs['stage4'], axis=(1, 2))
    logits = _as_logits(self.linear(pooled) if self.num_classes else pooled)
    # The aux heads also run while initializing, so that init(train=False) creates them.
    if self.variant.plus and not self.deploy and (train or self.is_initializing()):
      aux = {f'{name}_aux': getattr(self, f'{name}_aux')(outputs[name], train)
             for name in AUX_STAGES}
      if train:
        return {'main': logits, **aux}
    return logits


def create_model(name: str, *args: Any, **kwargs: Any) -> RepVGG:
  """``RepVGG(get_variant(name), ...)``: the model called ``name`` (see ``list_models()``);
  the other arguments are ``RepVGG``'s fields after ``variant`` (``num_classes``,
  ``deploy``, ``dtype``, ``precision``, ``bn_axis_name``, ``conv_impl``, ``kernel_init``,
  ``block``)."""
  return RepVGG(get_variant(name), *args, **kwargs)


def deploy_macs(name: str, image_size: Union[int, tuple[int, int]] = 224,
                num_classes: int = 1000) -> int:
  """Multiply-accumulates of one forward pass of the deploy structure.

  Counts the 3x3 convs, the SE blocks and the classifier (biases, ReLU and pooling are
  not MACs), i.e. what the paper's tables call FLOPs.
  """
  return _macs(name, image_size, num_classes, deploy=True)


def training_macs(name: str, image_size: Union[int, tuple[int, int]] = 224,
                  num_classes: int = 1000) -> int:
  """Multiply-accumulates of one forward pass of the training-time structure: the 3x3
  and 1x1 branch convs, the SE blocks, the classifier and RepVGGplus's auxiliary heads (a
  training step costs about 3x this: forward, and the gradients of inputs and weights)."""
  return _macs(name, image_size, num_classes, deploy=False)


def _macs(name: str, image_size: Union[int, tuple[int, int]], num_classes: int,
          deploy: bool) -> int:
  v = get_variant(name)
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  channels, macs = 3, 0
  taps = 9 if deploy else 9 + 1  # the 1x1 branch's tap
  for spec in layer_specs(v):
    h, w = -(-h // spec.strides), -(-w // spec.strides)
    macs += h * w * taps * (channels // spec.groups) * spec.features
    if v.se:
      macs += 2 * spec.features * (spec.features // v.se_reduction)
    channels = spec.features
    if v.plus and not deploy and spec.stage in AUX_STAGES and spec.index == max(
        s.index for s in layer_specs(v) if s.stage == spec.stage):
      # The auxiliary head after this stage: a 3x3/2 conv keeping the width, and its fc.
      macs += -(-h // 2) * -(-w // 2) * 9 * channels * channels + channels * num_classes
  return macs + channels * num_classes


@functools.lru_cache(maxsize=16)
def exact_forward(name: str, num_classes: int, deploy: bool = False, conv_impl: str = 'xla',
                  block: str = 'repvgg') -> Callable[..., jax.Array]:
  """The jitted eval-mode ``apply`` of ``create_model(name, ...)`` at float32 and full matmul
  precision: the reference of every equivalence check. Cached, so that checking several
  trees of a model in one process compiles it once."""
  net = create_model(name, num_classes, deploy=deploy, precision='highest',
                     conv_impl=conv_impl, block=block)
  return jax.jit(net.apply)


def variable_shapes(model: nn.Module, channels: int = 3) -> dict[str, Any]:
  """``jax.eval_shape`` of ``model.init``: every variable's shape and dtype, nothing
  computed. Shapes do not depend on the input size, so the smallest input is used."""
  x = jax.ShapeDtypeStruct((1, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE, channels), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)


def check_variables(variables: Any, name: str, num_classes: int, deploy: bool,
                    channels: int = 3, block: str = 'repvgg') -> None:
  """Raise a one-line ValueError naming (up to three of) the leaves that
  ``create_model(name, num_classes, deploy=deploy, block=block)`` for ``channels`` input
  channels does not have with this shape: missing, unexpected or misshapen."""
  expected = variable_shapes(create_model(name, num_classes, deploy=deploy, block=block),
                             channels)
  want = {path: tuple(leaf.shape)
          for path, leaf in traverse_util.flatten_dict(expected, sep='/').items()
          if path.split('/')[0] in ('params', 'batch_stats')}
  got = {path: tuple(np.shape(leaf))
         for path, leaf in traverse_util.flatten_dict(dict(variables), sep='/').items()}
  problems = ([f'{k} missing' for k in want if k not in got]
              + [f'{k} unexpected' for k in got if k not in want]
              + [f'{k} has shape {got[k]}, expected {want[k]}'
                 for k in want if k in got and got[k] != want[k]])
  if problems:
    more = f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''
    raise ValueError(f'not a {"deploy" if deploy else "training-time"} {name} with '
                     f'{num_classes} classes and {channels} input channels: '
                     f'{"; ".join(problems[:3])}{more}')


def num_classes_of(variables: Any) -> int:
  """The outputs of the classifier in a RepVGG variables tree (0: none, pooled features)."""
  linear = variables['params'].get('linear')
  return int(np.shape(linear['kernel'])[-1]) if linear else 0


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree, e.g. ``variables['params']``."""
  return sum(x.size for x in jax.tree_util.tree_leaves(tree))
