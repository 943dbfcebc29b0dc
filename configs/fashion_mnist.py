r"""RepVGG-A0 on Fashion-MNIST: the embedded default (``make train``).

Command::

    python train.py --config configs/fashion_mnist.py --workdir runs/fashion_mnist_a0

Expected: about 91% test accuracy for both the training-time and the deploy model, in
under 10 minutes of wall time on 2 CPU cores (see docs/benchmarks.md). The 28x28 images
are resized to 32x32 (random-resized crops of at least 35% of the image, flips).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = 'RepVGG-A0'
  config.dataset = 'fashion_mnist'
  config.data_dir = ''
  config.image_size = 32
  config.augment = 'simple'
  config.min_crop_scale = 0.35
  config.crop_fraction = 1.0      # eval: the whole image, resized to image_size

  config.batch_size = 128         # global, over all devices and processes
  config.eval_batch_size = 500
  config.num_epochs = 2.0
  config.num_train_steps = 0      # > 0 overrides num_epochs
  config.learning_rate = 0.4      # per 256 images; scaled by batch_size / 256
  config.warmup_epochs = 0.2
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 1e-4
  config.custom_l2 = False
  config.label_smoothing = 0.0
  config.mixup_alpha = 0.0
  config.ema_decay = 0.0          # 0: no EMA of the weights
  config.aux_loss_weight = 0.1    # RepVGGplus only
  config.init_from = ''           # a variables directory written by convert.py

  config.dtype = 'float32'
  # 'patches': convs as im2col matmuls, much faster than XLA:CPU's own on tiny maps.
  config.conv_impl = 'patches'
  config.seed = 0
  config.log_every_steps = 50
  config.eval_every_steps = 0     # 0: evaluate at the end only
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 3
  return config
