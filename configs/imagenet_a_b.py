r"""RepVGG-A/B on ImageNet, the paper's recipe (Sec. 4.1; official README).

120 epochs, batch 256, SGD momentum 0.9, learning rate 0.1 per 256 images with cosine
decay to 0, weight decay 1e-4 (not on biases nor on the BN of the 3x3/1x1 branches), simple
augmentation (random-resized-crop + flip), 224x224; evaluation resizes the shorter side to
256 and centre-crops 224. The argument selects the model::

    python train.py --config configs/imagenet_a_b.py:RepVGG-B1 --workdir runs/b1 \
        --config.data_dir ~/tensorflow_datasets

Expected top-1 (the paper's Table 4): A0 72.41, A1 74.46, A2 76.48, B0 75.14, B1 78.37,
B1g2 77.78, B1g4 77.58, B2 78.78. ``imagenet2012`` must be prepared in ``data_dir`` first
(the run says how when it is not). Multi-host: add ``--coordinator-address``,
``--num-processes``, ``--process-id`` (or let the cluster be detected).

Each value's source is pinned by tests/test_recipes.py.
"""

import ml_collections


def get_config(model: str = 'RepVGG-A0') -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = model or 'RepVGG-A0'
  # 'qarepvgg': QARepVGG blocks (no BN on the 1x1 and identity branches, one BN after their
  # sum), which lose little accuracy under int8 post-training quantization. Their authors'
  # recipe keeps the plain weight decay below (on every conv kernel, the 1x1 ones included,
  # not on BN nor biases), without custom_l2.
  config.block = 'repvgg'
  config.dataset = 'imagenet2012'
  config.data_dir = ''            # the TFDS data_dir holding imagenet2012
  # An image folder's file that cannot be read (corrupt, truncated): False, an error naming
  # it; True, skipped, logged and counted (metrics.jsonl's skipped_images): its training
  # row reads the next readable file of the split, evaluation leaves it out.
  config.skip_unreadable_images = False
  config.image_size = 224         # training
  # Evaluation; follows image_size until set (a derived reference, not a shared one).
  config.eval_image_size = config.get_ref('image_size') * 1
  # 'crop' (no flip), 'simple' (crop + flip), 'autoaugment', 'randaugment' (the authors'
  # raug15: magnitude 15, two operations per image)
  config.augment = 'simple'
  config.min_crop_scale = 0.08
  config.crop_fraction = 0.875    # evaluation: shorter side to eval_image_size / this

  config.batch_size = 256         # global, over all devices and processes
  config.eval_batch_size = 0      # 0: batch_size
  config.num_epochs = 120.0
  config.num_train_steps = 0      # > 0 overrides num_epochs
  config.learning_rate = 0.1      # per 256 images; scaled by batch_size / 256
  config.warmup_epochs = 0.0
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 1e-4
  # Which parameters decay: 'repvgg' (the original models' rule: names without 'bias' or
  # 'bn') or 'swin' (the authors' later trainer: no 1-D parameters but the identity BN's
  # scale); see training/optimization.py.
  config.weight_decay_rule = 'repvgg'
  config.grad_clip_norm = 0.0     # > 0: clip the global gradient norm to this (0: off)
  config.custom_l2 = False        # the official get_custom_L2 instead of plain decay
  config.label_smoothing = 0.0
  config.mixup_alpha = 0.0
  config.ema_decay = 0.0          # 0: no EMA of the weights
  config.aux_loss_weight = 0.1    # RepVGGplus only
  config.init_from = ''           # a variables directory written by convert.py
  # Variance of the conv kernels' initialization in units of 1/fan_in (1: Flax's LeCun
  # normal). Every conv feeds a BatchNorm, so the model is scale-invariant in its kernels
  # and a larger init is a smaller effective learning rate for them (not for the BN and
  # classifier parameters).
  config.conv_init_scale = 1.0

  config.dtype = 'float32'        # 'bfloat16': bfloat16 compute, float32 parameters
  config.conv_impl = 'xla'        # 'patches' helps only on CPU with tiny feature maps
  config.seed = 0
  config.log_every_steps = 100
  config.eval_every_steps = 5000  # 0: evaluate at the end only
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  return config
