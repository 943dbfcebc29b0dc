"""Every ImageNet config is its published recipe, field by field: each expected value
below names its source (the paper, arXiv 2101.03697, or the authors' README and trainer,
DingXiaoH/RepVGG), or says that the authors publish none and what is used instead."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import (imagenet_a_b, imagenet_autoaugment, imagenet_d2se,  # noqa: E402
                     imagenet_repvggplus)
from repvgg_jax import variants  # noqa: E402

# The original RepVGG models (paper Sec. 4.1; README "Reproduce original RepVGG results").
A_B = {
    'num_epochs': 120.0,            # README: "trained in 120 epochs"
    'batch_size': 256,              # README: "global batch size of 256"
    'learning_rate': 0.1,           # README: "cosine learning rate decay from 0.1 to 0"
    'warmup_epochs': 0.0,           # paper Sec. 4.1: no warm-up mentioned for 120 epochs
    'momentum': 0.9,                # paper Sec. 4.1: "momentum coefficient of 0.9"
    'nesterov': False,              # train.py: torch.optim.SGD without nesterov
    'weight_decay': 1e-4,           # README: "weight decay of 1e-4"
    'weight_decay_rule': 'repvgg',  # README: no decay on fc.bias, bn.bias, rbr_dense.bn.weight,
                                    # rbr_1x1.bn.weight; decay on rbr_identity.weight
    'custom_l2': False,             # README: the custom L2 is a later, deprecated option
    'label_smoothing': 0.0,         # README: "use no mixup nor RandAug" (simple preprocessing)
    'mixup_alpha': 0.0,             # README: no mixup
    'augment': 'simple',            # README: RandomResizedCrop(224) + RandomHorizontalFlip
    'min_crop_scale': 0.08,         # torchvision RandomResizedCrop's default scale (0.08, 1)
    'image_size': 224,              # README: RandomResizedCrop(224)
    'eval_image_size': 224,         # test.py: CenterCrop(224)
    'crop_fraction': 0.875,         # test.py: Resize(256) then CenterCrop(224)
    'aux_loss_weight': 0.1,         # unused by A/B (no auxiliary heads)
    'skip_unreadable_images': False,  # train.py: torchvision's ImageFolder raises on an
                                      # unreadable image
}

# B2g4, B3g4, B3 (paper Sec. 4.1 and Table 4: "200 epochs ... Autoaugment, label smoothing,
# mixup"); the paper gives neither values nor a warm-up.
LONG = dict(A_B, **{
    'num_epochs': 200.0,            # paper Table 4: 200 epochs
    'augment': 'autoaugment',       # paper Sec. 4.1: AutoAugment
    'label_smoothing': 0.1,         # not in the paper: 0.1, as the authors' later commands
    'mixup_alpha': 0.2,             # not in the paper: 0.2, as the authors' L2pse command
    'warmup_epochs': 5.0,           # not in the paper: 5, as the authors' later commands
})

# RepVGG-D2se: README "trained with 224x224 but tested with 320x320"; the weights file
# says 200 epochs; no training command is published (the 200-epoch recipe above is used).
D2SE = dict(LONG, **{
    'image_size': 224,              # README: "trained with 224x224"
    'eval_image_size': 320,         # README: "tested with 320x320"
    'crop_fraction': 1.0,           # timm's pretrained config for repvgg_d2se: crop_pct 1.0
})

# RepVGGplus-L2pse: README "Reproduce RepVGGplus-L2pse" command and the trainer it runs.
L2PSE = {
    'num_epochs': 300.0,            # README command: TRAIN.EPOCHS 300
    'batch_size': 256,              # README command: 8 GPUs x --batch-size 32
    'learning_rate': 0.1,           # README command: TRAIN.BASE_LR 0.1 (main.py scales by
                                    # batch / 256)
    'warmup_epochs': 5.0,           # README command: TRAIN.WARMUP_EPOCHS 5
    'momentum': 0.9,                # train/config.py: TRAIN.OPTIMIZER.MOMENTUM 0.9
    'nesterov': True,               # train/optimizer.py: optim.SGD(..., nesterov=True)
    'weight_decay': 4e-5,           # README command: TRAIN.WEIGHT_DECAY 4e-5
    'weight_decay_rule': 'swin',    # train/optimizer.py set_weight_decay
    'custom_l2': False,             # README: the custom L2 is deprecated, not in the command
    'label_smoothing': 0.1,         # README command: MODEL.LABEL_SMOOTHING 0.1
    'mixup_alpha': 0.2,             # README command: AUG.MIXUP 0.2
    'augment': 'randaugment',       # README command: AUG.PRESET raug15 (data/build.py:
                                    # RandAugPolicy(magnitude=15), two operations per image)
    'min_crop_scale': 0.08,         # data/build.py: RandomResizedCrop's default scale
    'image_size': 256,              # README command: DATA.IMG_SIZE 256
    'eval_image_size': 320,         # README command: DATA.TEST_SIZE 320
    'crop_fraction': 1.0,           # data/build.py: Resize(TEST_SIZE) + CenterCrop(TEST_SIZE)
    'aux_loss_weight': 0.1,         # main.py: loss += 0.1 * criterion(aux output)
    'skip_unreadable_images': False,  # data/build.py: torchvision's ImageFolder raises on
                                      # an unreadable image
}

CONFIGS = [
    *[(f'imagenet_a_b:{name}', imagenet_a_b.get_config(name), A_B) for name in (
        'RepVGG-A0', 'RepVGG-A1', 'RepVGG-A2', 'RepVGG-B0', 'RepVGG-B1', 'RepVGG-B1g2',
        'RepVGG-B1g4', 'RepVGG-B2')],
    *[(f'imagenet_autoaugment:{name}', imagenet_autoaugment.get_config(name), LONG)
      for name in ('RepVGG-B2g4', 'RepVGG-B3g4', 'RepVGG-B3')],
    ('imagenet_d2se', imagenet_d2se.get_config(), D2SE),
    ('imagenet_repvggplus', imagenet_repvggplus.get_config(), L2PSE),
]


@pytest.mark.parametrize('name, config, recipe', CONFIGS, ids=[c[0] for c in CONFIGS])
def test_config_is_the_published_recipe_field_by_field(name, config, recipe):
  differences = {field: (config[field], value) for field, value in recipe.items()
                 if config[field] != value}
  assert not differences, f'{name}: (config, published) {differences}'


@pytest.mark.parametrize('name, config, recipe', CONFIGS, ids=[c[0] for c in CONFIGS])
def test_evaluation_is_that_of_the_released_weights(name, config, recipe):
  # The published top-1 is measured with the released weights' preprocessing.
  preprocessing = variants.get_variant(config.model).eval_preprocessing
  assert (config.eval_image_size, config.crop_fraction) == (
      preprocessing.image_size, preprocessing.crop_fraction), name


def test_eval_image_size_follows_image_size_unless_set():
  config = imagenet_a_b.get_config('RepVGG-A0')
  config.image_size = 192
  assert config.eval_image_size == 192
  config.eval_image_size = 256
  assert (config.image_size, config.eval_image_size) == (192, 256)
