"""Trains a tree of classifier heads (collaborative learning) from a config.

  python -m collab_jax.main --config=configs/default.py --workdir=runs/default

Any config value can be overridden, e.g. `--config.num_epochs=1` or
`--config.model.splits='((1, 2),)'` (collab_jax/recipes.py lists every key);
of a key given twice, the last value wins.
Rerunning with the same workdir resumes from its last checkpoint; a finished
run is not trained again. Head 1's test error is the headline result, written
to <workdir>/results.json; head 1 is exported to <workdir>/export/head_1.
"""

import contextlib
import glob
import logging as pylogging
import os
import re
import signal
import sys
import threading
import traceback


_EXITING = threading.Lock()


def _interrupted(signum=None, frame=None):
  """Ctrl-C outside the training loop: nothing to save, so end at once (130)."""
  del signum, frame
  if not _EXITING.acquire(blocking=False):
    return  # the other thread (handler or watcher) is ending the process
  try:
    sys.stdout.flush()
    print('interrupted.', file=sys.stderr, flush=True)
  finally:
    # Not a KeyboardInterrupt: unwinding through a half-done import of
    # TensorFlow, an XLA compilation or orbax's threads can print tracebacks
    # or crash at exit. The workdir lock is the kernel's (flock); everything
    # in the workdir is written atomically or cleaned up at the next start.
    os._exit(130)  # pylint: disable=protected-access


def _exit_on_interrupt():
  """Installs `_interrupted` for SIGINT, effective even inside C++ calls.

  Python runs signal handlers only between bytecodes, i.e. after a minutes-long
  XLA compilation returns. The wakeup fd is written at once by the C-level
  handler, so a thread waiting on it ends the process immediately, unless the
  training loop's handler (a checkpoint, then exit 0) is installed instead.
  """
  signal.signal(signal.SIGINT, _interrupted)
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  signal.set_wakeup_fd(write_fd)

  def watch():
    while True:
      received = os.read(read_fd, 64)
      if (signal.SIGINT in received
          and signal.getsignal(signal.SIGINT) is _interrupted):
        _interrupted()
  threading.Thread(target=watch, daemon=True, name='sigint-watch').start()


if __name__ == '__main__':
  _exit_on_interrupt()

_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'configs')
if os.path.isdir(_CONFIG_DIR):  # a source checkout: list the configs in --help
  __doc__ += '\nConfigs (one per row of the paper\'s tables; see their docstrings):\n'
  __doc__ += ''.join(f'  configs/{os.path.basename(p)}\n'
                     for p in sorted(glob.glob(os.path.join(_CONFIG_DIR, '*.py'))))

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


@contextlib.contextmanager
def _train_extra():
  """A missing trainer dependency ends in one line naming the extra to install."""
  try:
    yield
  except ImportError as e:
    print(f'error: the trainer needs the [train] extra ({e.name or e} is not '
          "installed): pip install 'collab_jax[train]', or in a checkout "
          "pip install -e '.[train]'.", file=sys.stderr)
    sys.exit(2)


with _train_extra():
  from absl import app  # noqa: E402
  from absl import flags  # noqa: E402
  from absl import logging  # noqa: E402
  import jax  # noqa: E402
  import ml_collections  # noqa: E402
  from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs, '
                    'results: a local path or gs://BUCKET/PATH.')
flags.DEFINE_bool('break_lock', False, 'Take over the lock of a workdir on '
                  'gs:// that a trainer killed without warning left behind '
                  '(check first that it is gone).')
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


def use_cpu_devices(config):
  """Gives the CPU backend `config.cpu_devices` devices, before JAX starts it.

  On a CPU host the batch is then sharded over that many devices, each
  running its part of the step on its own thread (data parallelism), instead
  of one device splitting each operation over the cores. No effect on GPUs
  and TPUs.
  """
  n = config.get('cpu_devices', 1)
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    _fail(f'config.cpu_devices: {n!r} must be an integer >= 1.')
  if n > 1:
    jax.config.update('jax_num_cpu_devices', n)


def _fail(message):
  """How an input mistake ends: one `error:` line and exit status 2."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _summary(message):
  """One line of an error message: the last line of a traceback dump in it."""
  lines = [l.strip() for l in str(message).splitlines() if l.strip()]
  if any(l.startswith('Traceback') for l in lines):
    return lines[-1]
  return ' '.join(lines)


def last_override_wins(argv):
  """`argv` with only the last of repeated `--config.KEY=VALUE` overrides.

  absl appends the values of a repeated flag, and ml_collections' tuple
  parser then merges them: `--config.model.splits='((1, 2),)'` given twice
  would become `((1, 2), (1, 2))`. A later override replaces an earlier one
  instead (experiments/sweep.py appends the user's overrides last). The
  `--config.KEY VALUE` form, repeated, is refused rather than guessed at.
  """
  end = argv.index('--') if '--' in argv else len(argv)
  files = [a for a in argv[1:end] if a == '--config' or a.startswith('--config=')]
  if len(files) > 1:
    _fail(f'--config is given {len(files)} times; give one config file '
          '(override its values with --config.KEY=VALUE).')
  where = {}
  for i, arg in enumerate(argv[1:end], 1):
    if arg.startswith('--config.'):
      where.setdefault(arg.split('=', 1)[0], []).append(i)
  drop = set()
  for key, places in where.items():
    if len(places) > 1:
      if any('=' not in argv[i] for i in places):
        _fail(f'{key} is given {len(places)} times; give it once, as '
              f'{key}=VALUE.')
      drop.update(places[:-1])
  return [a for i, a in enumerate(argv) if i not in drop]


def parse_flags(argv):
  """absl's flag parsing, with each mistake reported as one `error:` line.

  Bad values (`--config.batch_size=abc`, a bad `--config.model.splits`
  literal, an unknown `--config.KEY`) and config files that are missing or
  raise would otherwise end in a traceback or a multi-line dump.
  """
  path = next((a.split('=', 1)[1].split(':')[0] for a in argv[1:]
               if a.startswith('--config=')), '')
  logging.set_verbosity(logging.ERROR)  # ml_collections' parse-time warnings
  argv = last_override_wins(argv)
  try:
    return FLAGS(argv)
  except flags.Error as e:
    if 'Error whilst parsing config file' in str(e):  # get_config() raised
      _fail(f'config file {path}: {_summary(e)}')
    if 'Flag --config must have a value other than None' in str(e) and path:
      _fail(f'config file {path}: get_config() returned None; it must return '
            'an ml_collections.ConfigDict.')
    _fail(f'{_summary(e)} (see --help)')
  except Exception as e:  # pylint: disable=broad-except
    # Raised by the config file (other than TypeError/ValueError), or by an
    # override of a key it does not have.
    if path and not os.path.exists(path):
      _fail(f'config file {path} does not exist (--config=).')
    if isinstance(e, (AttributeError, KeyError)):
      # ml_collections: "'key'\nDid you mean "other" instead of "key"?",
      # sometimes as the repr of that text.
      text = str(e)
      if text[:1] in '"\'' and text[-1:] == text[:1]:
        text = text[1:-1].encode().decode('unicode_escape')
      lines = text.splitlines() or ['']
      key = lines[0].strip('"\'')
      hint = re.search(r'Did you mean "([^"]+)"', text)
      hint = f' (did you mean {hint.group(1)!r}?)' if hint else ''
      bad = [a.split('=')[0] for a in argv[1:]
             if a.startswith('--config.') and a.split('=')[0].split('.')[-1] == key]
      if bad:
        _fail(f'{bad[0]}: the config of {path} has no key {key!r}{hint}.')
    if isinstance(e, SyntaxError):
      where, what = e.lineno, e.msg
    else:
      where = next((f.lineno for f in traceback.extract_tb(e.__traceback__)[::-1]
                    if os.path.abspath(f.filename) == os.path.abspath(path)),
                   None)
      what = _summary(e)
    line = f' line {where}' if where else ''
    _fail(f'config file {path}{line}: {type(e).__name__}: {what}')


def load_config():
  """The parsed --config, or exit with one line if its file did not load."""
  config = FLAGS.config
  if isinstance(config, ml_collections.ConfigDict):
    return config
  path = config_flags.get_config_filename(FLAGS['config']).split(':')[0]
  if not os.path.exists(path):
    _fail(f'config file {path} does not exist (--config=).')
  try:
    config.lock()  # a file that failed to load re-raises its error here
  except OSError as e:
    _fail(f'cannot load config file {path}: {_summary(e.__cause__ or e)}')
  except AttributeError:
    pass
  _fail(f'config file {path}: get_config() must return an '
        f'ml_collections.ConfigDict, not {type(config).__name__}.')


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])} (options are '
          '--config=FILE, --workdir=DIR and --config.KEY=VALUE).')
  if not FLAGS.workdir.strip():
    _fail('--workdir is empty; name a directory.')
  config = load_config()
  # Import late so that --help answers without loading TensorFlow or JAX backends.
  with _train_extra():
    from collab_jax import errors  # pylint: disable=g-import-not-at-top
    from collab_jax.trainer import train  # pylint: disable=g-import-not-at-top
  # Library warnings (absl's, and Python's, which captureWarnings routes
  # there) would come before an `error:` line; the trainer says what matters
  # on the console itself.
  logging.set_verbosity(logging.ERROR)
  pylogging.captureWarnings(True)
  use_cpu_devices(config)
  maybe_initialize_distributed()
  try:
    train.train_and_evaluate(config, FLAGS.workdir, break_lock=FLAGS.break_lock)
  except (errors.ConfigError, errors.WorkdirError, errors.NonFiniteError,
          errors.DatasetError) as e:
    _fail(e)
  except KeyboardInterrupt:  # Ctrl-C twice in the training loop
    _interrupted()


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
