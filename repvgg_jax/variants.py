"""The RepVGG model zoo as data: depths, widths, groups and SE per variant, and the blocks
each variant is made of (``layer_specs``). Plain Python: no JAX, no Flax.

Everything here follows the official definitions (DingXiaoH/RepVGG, ``repvgg.py``
and ``repvggplus.py``), which match the paper's Table 2 and Table 3:

* stage widths ``min(64, 64a), 64a, 128a, 256a, 512b`` for width multipliers ``a, b``;
* blocks per stage ``1, 2, 4, 14, 1`` (A), ``1, 4, 6, 16, 1`` (B), ``1, 8, 14, 24, 1`` (D2se,
  RepVGGplus-L2pse), where the leading 1 is the stride-2 stem (``stage0``);
* the ``g2``/``g4`` variants use groupwise 3x3 convolutions on the even global layer
  indices 2, 4, ..., 26 (the stem is layer 0).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Literal, NamedTuple, Optional

# The input normalization of the published ImageNet weights, ``(pixel - mean) / std`` on RGB
# pixels in [0, 255]: ImageNet's statistics.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# RepVGG downsamples 32x: the smallest input every variant accepts, and the one used where
# only parameter shapes matter (they do not depend on the input size).
MIN_IMAGE_SIZE = 32

# Global layer indices that the g2/g4 variants make groupwise (stage0 is layer 0).
GROUPWISE_LAYERS = tuple(range(2, 27, 2))

SEPosition = Optional[Literal['pre', 'post']]


class EvalPreprocessing(NamedTuple):
  """How the released weights' published top-1 was measured: the shorter side resized to
  ``image_size / crop_fraction`` (``interpolation``), the centre ``image_size`` square
  kept, then normalized with ``IMAGENET_MEAN``/``IMAGENET_STD``."""
  image_size: int
  crop_fraction: float
  interpolation: str = 'bilinear'


@dataclasses.dataclass(frozen=True)
class Variant:
  """One RepVGG architecture.

  Attributes:
    name: the official name, e.g. ``'RepVGG-B1g4'``.
    depths: number of blocks in stages 1..4 (the stem, stage0, is one block).
    width_multipliers: ``(a, a, a, b)`` scaling 64, 128, 256 and 512 channels.
    groups: groups of the 3x3/1x1 convolutions at the layers in ``GROUPWISE_LAYERS``.
    se: ``'pre'`` puts a squeeze-excite block between the branch sum and the ReLU
      (RepVGG-D2se, reduction 16); ``'post'`` after the ReLU (RepVGGplus, reduction 4).
    plus: RepVGGplus: stage 3 is split in two halves and three auxiliary classifiers
      are attached (after stage 1, stage 2 and the first half of stage 3) for training.
    top1: published ImageNet top-1 (%) of the authors' released weights, if any.
    eval_preprocessing: the preprocessing that top-1 was measured with (A/B: 224 with
      crop fraction 0.875, the authors' test.py; D2se and L2pse: 320 with 1.0, their README
      and Swin-based trainer's ``TEST_SIZE 320`` without ``TEST.CROP``; all bilinear).
  """
  name: str
  depths: tuple[int, int, int, int]
  width_multipliers: tuple[float, float, float, float]
  groups: int = 1
  se: SEPosition = None
  plus: bool = False
  top1: Optional[float] = None
  eval_preprocessing: EvalPreprocessing = EvalPreprocessing(224, 0.875)

  @property
  def se_reduction(self) -> int:
    return {'pre': 16, 'post': 4}.get(self.se, 0)

  @property
  def stem_width(self) -> int:
    return min(64, int(64 * self.width_multipliers[0]))

  @property
  def stage_widths(self) -> tuple[int, int, int, int]:
    a0, a1, a2, b = self.width_multipliers
    return (int(64 * a0), int(128 * a1), int(256 * a2), int(512 * b))

  @property
  def num_features(self) -> int:
    """Channels of the last stage, the input of the classifier."""
    return self.stage_widths[-1]

  def layer_groups(self, layer_index: int) -> int:
    """Groups of the block at global ``layer_index`` (0 is the stem)."""
    return self.groups if layer_index in GROUPWISE_LAYERS else 1


_A = (2, 4, 14, 1)
_B = (4, 6, 16, 1)
_D = (8, 14, 24, 1)

VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant('RepVGG-A0', _A, (0.75, 0.75, 0.75, 2.5), top1=72.41),
    Variant('RepVGG-A1', _A, (1, 1, 1, 2.5), top1=74.46),
    Variant('RepVGG-A2', _A, (1.5, 1.5, 1.5, 2.75), top1=76.48),
    Variant('RepVGG-B0', _B, (1, 1, 1, 2.5), top1=75.14),
    Variant('RepVGG-B1', _B, (2, 2, 2, 4), top1=78.37),
    Variant('RepVGG-B1g2', _B, (2, 2, 2, 4), groups=2, top1=77.78),
    Variant('RepVGG-B1g4', _B, (2, 2, 2, 4), groups=4, top1=77.58),
    Variant('RepVGG-B2', _B, (2.5, 2.5, 2.5, 5), top1=78.78),
    Variant('RepVGG-B2g2', _B, (2.5, 2.5, 2.5, 5), groups=2),
    Variant('RepVGG-B2g4', _B, (2.5, 2.5, 2.5, 5), groups=4, top1=79.38),
    Variant('RepVGG-B3', _B, (3, 3, 3, 5), top1=80.52),
    Variant('RepVGG-B3g2', _B, (3, 3, 3, 5), groups=2),
    Variant('RepVGG-B3g4', _B, (3, 3, 3, 5), groups=4, top1=80.21),
    Variant('RepVGG-D2se', _D, (2.5, 2.5, 2.5, 5), se='pre', top1=83.55,
            eval_preprocessing=EvalPreprocessing(320, 1.0)),
    Variant('RepVGGplus-L2pse', _D, (2.5, 2.5, 2.5, 5), se='post', plus=True, top1=84.06,
            eval_preprocessing=EvalPreprocessing(320, 1.0)),
]}


def list_models() -> list[str]:
  """Names accepted by ``create_model``, in the order of the official tables."""
  return list(VARIANTS)


def get_variant(name: str) -> Variant:
  """The ``Variant`` called ``name``; a ValueError listing the valid names otherwise."""
  try:
    return VARIANTS[name]
  except (KeyError, TypeError):
    raise ValueError(
        f'unknown model {name!r}; valid names: {", ".join(VARIANTS)}') from None


# ------------------------------------------------------------------------------------------
# The blocks of a variant, in order: what the model builds and where its parameters live.


class LayerSpec(NamedTuple):
  """One RepVGG block: where it sits and what it computes."""
  stage: str       # parameter-tree name of its stage, e.g. 'stage2' or 'stage3_first'
  index: int       # position within the stage
  features: int
  strides: int
  groups: int

  @property
  def module_name(self) -> str:
    """The block's name in the parameter tree: 'stage0' for the stem, else
    '<stage>_<index>' (how Flax names the members of a stage's list)."""
    return self.stage if self.stage == 'stage0' else f'{self.stage}_{self.index}'


def layer_specs(variant: Variant) -> Iterator[LayerSpec]:
  """The blocks of ``variant`` in order, the stem first (global layer index 0)."""
  yield LayerSpec('stage0', 0, variant.stem_width, 2, 1)
  layer = 1
  for stage, (width, depth) in enumerate(zip(variant.stage_widths, variant.depths), 1):
    for i in range(depth):
      name, index = f'stage{stage}', i
      if variant.plus and stage == 3:
        # RepVGGplus splits stage 3 in halves to hang an auxiliary head in the middle.
        half = depth // 2
        name, index = ('stage3_first', i) if i < half else ('stage3_second', i - half)
      yield LayerSpec(name, index, width, 2 if i == 0 else 1, variant.layer_groups(layer))
      layer += 1


def stage_names(variant: Variant) -> list[str]:
  """The parameter-tree names of the stages, in order ('stage0' ... 'stage4')."""
  return list(dict.fromkeys(spec.stage for spec in layer_specs(variant)))


# Stages after which RepVGGplus attaches an auxiliary classifier during training.
AUX_STAGES = ('stage1', 'stage2', 'stage3_first')
