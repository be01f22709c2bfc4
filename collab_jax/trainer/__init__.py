"""The trainer: `python -m collab_jax.main` (needs the `[train]` extra).

  train.py          the loop: `train_and_evaluate(config, workdir)`
  steps.py          model, optimizer, train state and the jitted steps
  methods.py        the training methods, one registry entry each
  parallel.py       the device mesh and shardings
  metrics.py        metric names and their (sum, count) arithmetic
  checkpointing.py  the workdir's records (config, data), checkpoints, export
  fs.py             workdir paths (local or gs://), atomic writes, the lock
  config_lib.py     checks of the config that no single component sees
  recipes.py        every config key with its default, and the recipes
  logging_utils.py  metrics, TensorBoard, the console, run records
  signals.py        stopping between steps (pre-emption, SIGTERM, Ctrl-C)
"""
