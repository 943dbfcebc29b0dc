"""Train RepVGG: ``python train.py --config configs/<file>.py[:arg] --workdir DIR``.

Any config field can be overridden, e.g. ``--config.batch_size=128``; see
``configs/fashion_mnist.py`` for the fields. Re-running the same command resumes from the
last checkpoint in ``--workdir``. On several hosts give every process the same
``--coordinator_address`` and ``--num_processes`` and its own ``--process_id`` (or let
``jax.distributed`` detect the cluster).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the result.')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0, for training over several processes.')
flags.DEFINE_integer('num_processes', None, 'Number of processes of a multi-process run.')
flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  from repvgg_jax import bench, checkpoint, train_lib
  bench.set_cpu_flags()  # XLA:CPU's YNNPACK fusions slow the training step by ~20%
  try:
    train_lib.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                     FLAGS.process_id)
    train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (train_lib.TrainingError, checkpoint.CheckpointError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 1
  return 0


if __name__ == '__main__':
  app.run(main)
