r"""RepVGGplus-L2pse on ImageNet: the authors' command for the released 84.06% model.

Their README's "Reproduce RepVGGplus-L2pse" command (8 GPUs x 32 images)::

    main.py --arch RepVGGplus-L2pse --batch-size 32 --opts TRAIN.EPOCHS 300 TRAIN.BASE_LR 0.1
        TRAIN.WEIGHT_DECAY 4e-5 TRAIN.WARMUP_EPOCHS 5 MODEL.LABEL_SMOOTHING 0.1
        AUG.PRESET raug15 AUG.MIXUP 0.2 DATA.DATASET imagenet DATA.IMG_SIZE 256
        DATA.TEST_SIZE 320

with their Swin-Transformer-based trainer's defaults: SGD with Nesterov momentum 0.9,
cosine decay to 0 after a linear warm-up from 0, the learning rate scaled by the global
batch / 256, no weight decay on biases and 1-D parameters but the identity BN's scale,
0.1 x the cross-entropy of each auxiliary head, mixup (timm's, label smoothing applied to
the mixed targets), evaluation by resizing the shorter side to 320 and keeping the centre
320 (``TEST.CROP`` off), bilinear. Here::

    python train.py --config configs/imagenet_repvggplus.py --workdir runs/l2pse \
        --config.data_dir ~/tensorflow_datasets

Expected: about 84.06% top-1 at 320 (the released RepVGGplus-L2pse; not reproduced here:
this needs a GPU/TPU cluster). bfloat16 compute is this project's choice for speed on
accelerators (the authors trained in float32). Each value's source is pinned by
tests/test_recipes.py.
"""

from configs import imagenet_a_b


def get_config():
  config = imagenet_a_b.get_config('RepVGGplus-L2pse')
  config.num_epochs = 300.0
  config.batch_size = 256
  config.learning_rate = 0.1
  config.warmup_epochs = 5.0
  config.nesterov = True
  config.weight_decay = 4e-5
  config.weight_decay_rule = 'swin'
  config.label_smoothing = 0.1
  config.augment = 'randaugment'  # raug15: magnitude 15, two operations per image
  config.mixup_alpha = 0.2
  config.image_size = 256
  config.eval_image_size = 320
  config.crop_fraction = 1.0
  config.aux_loss_weight = 0.1
  config.dtype = 'bfloat16'
  return config
