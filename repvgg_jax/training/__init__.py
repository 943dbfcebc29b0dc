"""Training RepVGG: ``trainer.train_and_evaluate(config, workdir)`` is the run
(``train.py`` is its command line).

Modules, each importing only those above it:

* ``optimization``: learning-rate schedule, weight decay with the paper's exemptions,
  the custom L2, the optimizer of a config;
* ``steps``: the train and evaluation steps of one replica (collectives over ``AXIS``;
  run them under ``jax.pmap`` or ``shard_map`` with that axis name);
* ``parallel``: processes and devices: ``jax.distributed``, sharding batches, replicating
  state, a stop that every process agrees on;
* ``compilation``: the steps mapped over the devices, compiled ahead of time from shapes;
* ``metrics``: metrics.jsonl, TensorBoard (no TensorFlow needed), throughput, the summary;
* ``trainer``: the run, top to bottom.
"""
