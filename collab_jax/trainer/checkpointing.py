"""The workdir: its lock, its record of the config, checkpoints and the export.

A workdir holds one run: `config.json` (the config that made it),
`checkpoints/` (orbax), `metrics.jsonl`, `results.json` once finished and
`export/head_1` (head 1 as plain target-network variables).
"""

import contextlib
import errno
import fcntl
import json
import math
import os
import socket
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from collab_jax import errors
from collab_jax import heads as heads_lib
from collab_jax.trainer import logging_utils

# Keys that may change between a run and its resumption without changing what
# is computed (logging, checkpoint cadence, where data lives, when to stop).
RESUMABLE_KEYS = ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
                  'data_dir', 'halt_after_steps', 'progress', 'allow_config_change',
                  'eval_every_epochs', 'max_nonfinite_streak', 'cpu_devices',
                  'eval_train_clean')
LOCK_FILE = 'trainer.lock'


# ----------------------------------------------------------------------------
# One trainer per workdir.


@contextlib.contextmanager
def workdir_lock(workdir):
  """Holds `<workdir>/trainer.lock` for the life of a run: one trainer per workdir.

  `fcntl.flock` is released by the kernel when the process ends, however it
  ends (kill -9 included), so a lock left by a dead process is never stale:
  the next run simply takes it. The holder's pid and host are written into the
  file for the refusal message only. Several processes (multi-host): each
  process takes its own file (`trainer.lock` for process 0, `trainer.lock.<i>`
  for process i), so a second multi-process run on the same workdir is refused
  by every one of its processes. flock works on local file systems and on NFS
  (Linux emulates it there with byte-range locks).

  Raises:
    WorkdirError: another live process holds the lock.
  """
  name = LOCK_FILE if jax.process_index() == 0 else (
      f'{LOCK_FILE}.{jax.process_index()}')
  path = os.path.join(workdir, name)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise errors.WorkdirError(
        f'cannot open the lock file {path}: {e.strerror}.') from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = ''
      for _ in range(20):  # the holder writes its pid just after locking
        holder = os.pread(fd, 200, 0).decode('utf-8', 'replace').strip()
        if holder:
          break
        time.sleep(0.05)
      raise errors.WorkdirError(
          f'workdir {workdir} is in use by another trainer '
          f'({holder or "pid unknown"}; lock {path}); wait for it to end or '
          'use another --workdir.') from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'pid {os.getpid()} on host {socket.gethostname()}'.encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock


def disk_full(error):
  """The ENOSPC/EDQUOT OSError behind `error` (orbax wraps them), or None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC,
                                                      errno.EDQUOT):
      return error
    error = error.__cause__ or error.__context__
  return None


# ----------------------------------------------------------------------------
# The config and results records.


def read_json(path, what, fix):
  """JSON from a workdir file, or WorkdirError naming the file and `fix`."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except IsADirectoryError:
    raise errors.WorkdirError(f'{path} is a directory, not a file ({what}): '
                              f'{fix}.') from None
  except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
    raise errors.WorkdirError(f'{path} is not valid JSON ({what}): {fix}.') from None
  except OSError as e:
    raise errors.WorkdirError(
        f'cannot read {path} ({what}): {e.strerror}.') from None


def config_record(config):
  """The config as written to `config.json`."""
  return json.loads(config.to_json_best_effort())


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def check_workdir(config, workdir):
  """Refuses a workdir made by a different config (unless allowed).

  Returns:
    {flattened key: (old, new)} of the allowed changes (empty if none).
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return {}
  old = read_json(path, 'the config of the run in this workdir',
                  'repair it, or remove it if the run never started')
  if not isinstance(old, dict):
    raise errors.WorkdirError(f'{path} is not a config record (a JSON object): '
                              'repair it, or use a new --workdir.')
  old = _flatten(old)
  new = _flatten(config_record(config))
  diff = sorted(k for k in set(old) | set(new)
                if k not in RESUMABLE_KEYS and old.get(k) != new.get(k))
  if diff and not config.allow_config_change:
    shown = ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in diff[:4])
    raise errors.WorkdirError(
        f'workdir {workdir} was made by a different config ({shown}'
        f'{" ..." if len(diff) > 4 else ""}); use a new --workdir, or pass '
        '--config.allow_config_change=True to continue it anyway.')
  return {k: (old.get(k), new.get(k)) for k in diff}


def record_config(workdir, config, step=None, changes=None):
  """Writes `config.json`; with `changes` (allowed on resuming at `step`),
  appends them to `config_changes.jsonl` first."""
  if changes:
    with open(os.path.join(workdir, 'config_changes.jsonl'), 'a') as f:
      f.write(json.dumps({'step': step, 'changes': {
          k: list(v) for k, v in changes.items()}}) + '\n')
  logging_utils.write_json_atomic(os.path.join(workdir, 'config.json'),
                                  config_record(config))


def finished_results(workdir):
  """The results of a finished run in `workdir` (announced), or None."""
  path = os.path.join(workdir, 'results.json')
  if not os.path.exists(path):
    return None
  results = read_json(path, 'results.json of a finished run',
                      'remove it (and export/) to evaluate the last checkpoint '
                      'again')
  try:
    error = float(results['head_1_test_error'])
  except (KeyError, TypeError, ValueError):
    raise errors.WorkdirError(
        f'{path} has no head_1_test_error: it is not the results of a run; '
        'remove it (and export/) to evaluate the last checkpoint again.'
    ) from None
  logging_utils.console(f'{workdir} already finished: head 1 test error '
                        f'{error:.2f}% (nothing to do).')
  return results


def forget_logs_after(workdir, step):
  """Drops `metrics.jsonl` records past `step`: a resumed run redoes them."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return
  def step_of(line):
    try:
      return json.loads(line)['step']
    except (ValueError, KeyError, TypeError):  # e.g. cut short by a kill
      return math.inf
  if not os.path.isfile(path):
    raise errors.WorkdirError(f'{path} (the run\'s metric log) is not a file: '
                              'move it away and rerun.')
  # Undecodable bytes (a damaged line) become U+FFFD: that line is dropped.
  with open(path, encoding='utf-8', errors='replace') as f:
    lines = f.readlines()
  keep = [l for l in lines if step_of(l) <= step]
  if len(keep) < len(lines):
    with open(path + '.tmp', 'w') as f:
      f.writelines(keep)
    os.replace(path + '.tmp', path)


# ----------------------------------------------------------------------------
# Checkpoints.


def checkpoint_manager(workdir, config, cleanup=False):
  """The run's CheckpointManager; `cleanup` is for the training run only.

  It saves every `config.checkpoint_every_steps` steps (orbax's fixed-interval
  policy alone: its default would also save at the first step of a run and on
  a pre-emption notice). `cleanup` removes the `<step>.orbax-checkpoint-tmp-*`
  folders of saves that a killed run left half-written (orbax never lists
  them as steps).
  """
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise errors.WorkdirError(
        f'{directory} is a file, not the checkpoint folder: move it away and '
        'rerun (the run then starts over).')
  manager = ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.keep_checkpoints, create=True,
          save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(
              config.checkpoint_every_steps),
          cleanup_tmp_directories=cleanup))
  if cleanup:
    # Orbax removes the folders in a background thread, and waits for it only
    # at the first save. Wait now: anything that patches file access in the
    # meantime (tfds.testing.mock_data does, process-wide) would redirect the
    # thread's paths, and a slow cleanup would race the restore.
    wait = getattr(manager, '_maybe_await_cleanup_tmp_directory', None)
    if wait is not None:
      wait()
  return manager


def restore_latest(manager, abstract_state, *, sharding, corrupt_dir=None):
  """Restores the newest readable checkpoint; falls back past corrupt ones.

  Args:
    manager: the run's `CheckpointManager`.
    abstract_state: shapes and dtypes of the state (`jax.eval_shape`).
    sharding: where every restored array goes (the run's replicated
      sharding, `parallel.DataParallel.replicated`). Never the saved
      topology, so that a run saved on one device count resumes on another
      (`cpu_devices`, another machine).
    corrupt_dir: where the training run moves unreadable checkpoints newer
      than the one restored (`<corrupt_dir>/<step>_<time>`; never deleted).
      Left among the steps, a corrupt step would stop the manager from saving
      that step again and would count towards `max_to_keep`, so that garbage
      collection could delete the good ones. None (readers): leave them.

  Returns:
    (state or None, step restored or None).

  Raises:
    WorkdirError: with `corrupt_dir`, when there are checkpoints but none is
      readable (nothing is moved then: a person should look).
  """
  abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      abstract_state)
  unreadable = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # pylint: disable=broad-except
      reason = f'{type(e).__name__}: {(str(e).splitlines() or [""])[0][:160]}'
      logging.warning('checkpoint at step %d is unreadable (%s)', step, reason)
      logging_utils.console(f'warning: checkpoint at step {step} is unreadable '
                            f'({reason}); trying the previous one.')
      unreadable.append((step, reason))
      continue
    if corrupt_dir is not None and unreadable:
      _move_aside(manager, [s for s, _ in unreadable], corrupt_dir)
    return state, step
  if corrupt_dir is not None and unreadable:
    shown = '; '.join(f'step {s}: {r}' for s, r in unreadable[:2])
    raise errors.WorkdirError(
        f'no checkpoint in {manager.directory} is readable ({shown}). If the '
        'config changed, use a new --workdir; if they are corrupt, move the '
        'checkpoints folder away and rerun to start over.')
  return None, None


def _move_aside(manager, steps, corrupt_dir):
  """Moves step folders out of the manager's sight (process 0 renames)."""
  stamp = time.strftime('%Y%m%dT%H%M%S')
  for step in steps:
    src = os.path.join(str(manager.directory), str(step))
    dest = os.path.join(corrupt_dir, f'{step}_{stamp}')
    if jax.process_index() == 0:
      os.makedirs(corrupt_dir, exist_ok=True)
      os.rename(src, dest)
      logging_utils.console(
          f'warning: moved the unreadable checkpoint {src} to {dest}.')
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('collab_jax:move_aside')
  manager.reload()


def export_variables(state, splits, head=0):
  """Head `head` of the trained tree as plain target-network variables."""
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return heads_lib.export_head(jax.device_get(variables), splits, head)


def save_export(workdir, state, splits):
  """Writes head 1 to `<workdir>/export/head_1`, unless it is there already.

  Every process takes part in the save (orbax synchronises them); process 0
  writes the files. An existing export (e.g. written just before a crash) is
  kept; orbax writes to a temporary folder and renames it when complete.
  """
  export_dir = os.path.abspath(os.path.join(workdir, 'export', 'head_1'))
  if not os.path.exists(export_dir):
    exported = export_variables(state, tuple(tuple(s) for s in splits), 0)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(export_dir, exported)
