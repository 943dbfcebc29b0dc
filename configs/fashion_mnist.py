r"""RepVGG-A0 on Fashion-MNIST: the embedded default (``make train``).

Command::

    python train.py --config configs/fashion_mnist.py --workdir runs/fashion_mnist_a0

Expected: 90.53% test accuracy for both the training-time and the deploy model (90.52%
with seed 1), in 463 s of wall time from a fresh clone on the 2-core development VM, about
540 s at the slowest speed that VM has shown; 90.59% on another 2-core VM, whose CPU gives
XLA other kernels (docs/benchmarks.md).

The full-width RepVGG-A0 sees the 28x28 grey images resized to 32x32 (the largest size
whose stage 3 still runs on 2x2 maps, so no slower than 28x28), flipped at random; the
paper's SGD recipe, shortened to 2.7 epochs with a short warm-up, at a higher learning rate
made stable by clipping the gradient norm (it averages 15 over the first 10 steps, about
0.5 from step 100 on).
"""

from configs import imagenet_a_b


def get_config():
  config = imagenet_a_b.get_config('RepVGG-A0')
  config.dataset = 'fashion_mnist'
  config.image_size = 32
  config.min_crop_scale = 1.0     # crops of the whole image: flips only
  config.crop_fraction = 1.0      # eval: the whole image, resized to image_size
  config.batch_size = 256
  config.eval_batch_size = 500
  config.num_epochs = 2.7
  config.learning_rate = 0.4      # per 256 images; without clipping 0.4 spiked, 0.3 did not
  config.grad_clip_norm = 1.0
  config.warmup_epochs = 0.2
  config.nesterov = True
  # XLA:CPU is slow on the 2x2 and 1x1 maps of stages 3-4: matmuls there (convolution.py).
  config.conv_impl = 'patches'
  config.log_every_steps = 50
  config.eval_every_steps = 0     # evaluate at the end only
  config.checkpoint_every_steps = 200
  return config
