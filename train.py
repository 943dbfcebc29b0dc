"""Train RepVGG: ``python train.py --config configs/<file>.py[:arg] --workdir DIR``.

Any config field can be overridden, e.g. ``--config.batch_size=128``; see
``configs/imagenet_a_b.py`` for the fields. Re-running the same command resumes from the
last checkpoint in ``--workdir``. On several hosts give every process the same
``--coordinator-address`` and ``--num-processes`` and its own ``--process-id`` (or let
``jax.distributed`` detect the cluster).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from repvgg_jax import checkpoint, cli, xla_backend
from repvgg_jax.training import parallel, trainer

FLAGS = flags.FLAGS
# ml_collections' --config FILE[:ARG] and its --config.<field>=value overrides.
config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                lock_config=True)


def parse_args(argv: Sequence[str]):
  parser = cli.ArgumentParser(__doc__, prog='train.py')
  parser.add_argument('--config', required=True, metavar='FILE[:ARG]',
                      help='the configuration (configs/*.py), then --config.<field>=value '
                      'overrides')
  cli.add_workdir(parser, required=True,
                  help='the run\'s directory: checkpoints, metrics and the result')
  parser.add_argument('--coordinator-address', metavar='HOST:PORT',
                      help='process 0\'s address, for training over several processes')
  parser.add_argument('--num-processes', type=cli.positive_int,
                      help='number of processes of a multi-process run')
  parser.add_argument('--process-id', type=int, help='this process, 0 .. num_processes - 1')
  args, rest = parser.parse_known_args(argv[1:])
  unknown = [a for a in rest if not a.startswith('--config.')]
  if unknown:
    parser.error(f'unrecognized arguments: {" ".join(unknown)}')
  try:
    FLAGS([argv[0], f'--config={args.config}', *rest])
  except (flags.Error, AttributeError, ValueError, OSError) as e:
    parser.error(f'--config: {e}')
  return args


def main(args) -> int:
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  xla_backend.set_cpu_flags()  # XLA:CPU's YNNPACK fusions slow the training step by ~20%
  try:
    parallel.initialize_distributed(args.coordinator_address, args.num_processes,
                                    args.process_id)
    trainer.train_and_evaluate(FLAGS.config, args.workdir)
  except (trainer.TrainingError, checkpoint.CheckpointError, ValueError) as e:
    return cli.fail(None, e)
  return 0


def run() -> None:
  app.run(main, flags_parser=parse_args)


if __name__ == '__main__':
  run()
