r"""RepVGG-D2se on ImageNet.

The recipe of the paper's longer runs (``imagenet_autoaugment.py``: 200 epochs,
AutoAugment, label smoothing 0.1, mixup 0.2, 5 warm-up epochs) at the 320x320 resolution
of the released D2se weights, with the custom L2 on the equivalent kernels and bfloat16
compute::

    python train.py --config configs/imagenet_d2se.py --workdir runs/d2se \
        --config.data_dir ~/tensorflow_datasets

Expected: close to the released weights' 83.55% top-1 at 320x320 (not reproduced here:
this needs a GPU/TPU cluster).
"""

from configs import imagenet_autoaugment


def get_config():
  config = imagenet_autoaugment.get_config('RepVGG-D2se')
  config.image_size = 320
  config.custom_l2 = True
  config.dtype = 'bfloat16'
  return config
