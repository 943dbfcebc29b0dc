r"""RepVGGplus-L2pse on ImageNet with its auxiliary classifiers.

The official RepVGGplus recipe: 300 epochs, batch 256, learning rate 0.1 per 256 with 5
warm-up epochs and cosine decay, weight decay 1e-4 through the custom L2 on the equivalent
kernels, label smoothing 0.1, AutoAugment, 320x320; the loss adds 0.1 x the cross-entropy of
each of the three auxiliary heads (after stage 1, stage 2 and the first half of stage 3)::

    python train.py --config configs/imagenet_repvggplus.py --workdir runs/l2pse \
        --config.data_dir ~/tensorflow_datasets

Expected: about 84.06% top-1 (the released RepVGGplus-L2pse).
"""

from configs import imagenet_autoaugment


def get_config():
  config = imagenet_autoaugment.get_config('RepVGGplus-L2pse')
  config.num_epochs = 300.0
  config.image_size = 320
  config.mixup_alpha = 0.0
  config.custom_l2 = True
  config.aux_loss_weight = 0.1
  config.dtype = 'bfloat16'
  return config
