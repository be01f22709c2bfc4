"""Command line: `python -m collab_jax.main --config=configs/X.py --workdir=W`.

Any config value can be overridden, e.g. `--config.num_epochs=1` or
`--config.model.splits='((1, 2),)'`. Rerunning with the same workdir resumes
from its last checkpoint; a finished run is not trained again.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs, results.')
config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/*.py); override values '
    'with --config.KEY=VALUE.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def maybe_initialize_distributed():
  """Joins a multi-process run when the usual cluster variables are set."""
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS'):
    jax.distributed.initialize(
        coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
        num_processes=int(env['JAX_NUM_PROCESSES']),
        process_id=int(env['JAX_PROCESS_ID']))
  elif int(env.get('SLURM_NTASKS', '1')) > 1 or env.get('TPU_WORKER_HOSTNAMES'):
    jax.distributed.initialize()  # cluster auto-detection (SLURM, Cloud TPU)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  # Import late so that --help answers without loading TensorFlow or JAX backends.
  from collab_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from collab_jax import train  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  maybe_initialize_distributed()
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (train.ConfigError, train.WorkdirError, train.NonFiniteError,
          input_pipeline.DatasetError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)



if __name__ == '__main__':
  app.run(main)
