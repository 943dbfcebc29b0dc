r"""RepVGG-B2g4/B3g4/B3 on ImageNet with the paper's longer recipe.

200 epochs, AutoAugment, label smoothing 0.1 and mixup 0.2, otherwise as
``imagenet_a_b.py`` (5 warm-up epochs). The argument selects the model::

    python train.py --config configs/imagenet_autoaugment.py:RepVGG-B3 --workdir runs/b3 \
        --config.data_dir ~/tensorflow_datasets

Expected top-1 (the paper's Table 4, 200-epoch rows): B2g4 79.38, B3g4 80.21, B3 80.52.
"""

from configs import imagenet_a_b


def get_config(model: str = 'RepVGG-B3'):
  config = imagenet_a_b.get_config(model or 'RepVGG-B3')
  config.num_epochs = 200.0
  config.warmup_epochs = 5.0
  config.augment = 'autoaugment'
  config.label_smoothing = 0.1
  config.mixup_alpha = 0.2
  return config
