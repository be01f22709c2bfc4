"""The workdir's records, checkpoints and the export.

A workdir holds one run: `config.json` (the config that made it) and
`data.json` (the fingerprint of its data), `checkpoints/` (orbax),
`metrics.jsonl`, `results.json` once finished and `export/head_1` (head 1 as
plain target-network variables). Every path goes through `fs` (etils.epath),
so a workdir may be local or on gs://.

A result describes what is shipped: `results.json`, the export and the last
checkpoint name the same step, or the run refuses.
"""

import errno
import json
import time

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from collab_jax import errors
from collab_jax import heads as heads_lib
from collab_jax.trainer import fs
from collab_jax.trainer import logging_utils

# Keys that may change between a run and its resumption without changing what
# is computed (logging, checkpoint cadence, where data lives, when to stop).
# A moved data_dir is safe because the data's fingerprint is compared.
RESUMABLE_KEYS = ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
                  'data_dir', 'halt_after_steps', 'progress', 'allow_config_change',
                  'eval_every_epochs', 'max_nonfinite_streak', 'cpu_devices',
                  'eval_train_clean', 'max_divergent_steps')
CONFIG_FILE = 'config.json'
DATA_FILE = 'data.json'
CHANGES_FILE = 'config_changes.jsonl'
METRICS_FILE = 'metrics.jsonl'
RESULTS_FILE = 'results.json'


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
# The config, data and results records.


def read_json(path, what, fix):
  """JSON from a workdir file, or WorkdirError naming the file and `fix`."""
  path = fs.path(path)
  if path.is_dir():
    raise errors.WorkdirError(f'{path} is a directory, not a file ({what}): '
                              f'{fix}.')
  try:
    text = path.read_bytes().decode('utf-8')
  except UnicodeDecodeError:
    raise errors.WorkdirError(f'{path} is not valid JSON ({what}): {fix}.') from None
  except Exception as e:  # pylint: disable=broad-except
    # OSError locally; the errors of tf.io.gfile or fsspec on object stores.
    reason = getattr(e, 'strerror', None) or type(e).__name__
    raise errors.WorkdirError(f'cannot read {path} ({what}): {reason}.') from None
  try:
    return json.loads(text)
  except ValueError:  # JSONDecodeError is a ValueError
    raise errors.WorkdirError(f'{path} is not valid JSON ({what}): {fix}.') from None


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


def has_checkpoints(workdir):
  """Whether `workdir` holds checkpoints (any entry of `checkpoints/`)."""
  directory = fs.path(workdir) / 'checkpoints'
  return directory.is_dir() and any(True for _ in directory.iterdir())


def check_workdir(config, workdir, fingerprint):
  """Refuses a workdir made by a different config or data (unless allowed).

  The config is compared with `config.json` key by key (but
  `RESUMABLE_KEYS`), the data with `data.json` (`fingerprint`, see
  `DataSource.fingerprint`). A workdir with checkpoints but no `config.json`
  is damaged: its run's config is unknown.

  Returns:
    {key: (old, new)} of the allowed changes (empty if none); data keys are
    prefixed `data.`.
  """
  workdir = fs.path(workdir)
  path = workdir / CONFIG_FILE
  allowed = config.allow_config_change
  how = ('use a new --workdir, or pass --config.allow_config_change=True to '
         'continue it anyway (the change is recorded in '
         f'{CHANGES_FILE})')
  if not path.exists():
    if not has_checkpoints(workdir):
      return {}  # a new run
    if not allowed:
      raise errors.WorkdirError(
          f'{path} is missing but {workdir} holds checkpoints: the workdir is '
          f'damaged (the config of its run is unknown); restore {CONFIG_FILE}, '
          f'{how}.')
    return {CONFIG_FILE: (None, 'missing; written anew from this config')}
  old = read_json(path, 'the config of the run in this workdir',
                  'repair it, or remove it if the run never started')
  if not isinstance(old, dict):
    raise errors.WorkdirError(f'{path} is not a config record (a JSON object): '
                              'repair it, or use a new --workdir.')
  old = _flatten(old)
  new = _flatten(config_record(config))
  diff = sorted(k for k in set(old) | set(new)
                if k not in RESUMABLE_KEYS and old.get(k) != new.get(k))
  changes = {k: (old.get(k), new.get(k)) for k in diff}
  if diff and not allowed:
    shown = ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in diff[:4])
    raise errors.WorkdirError(
        f'workdir {workdir} was made by a different config ({shown}'
        f'{" ..." if len(diff) > 4 else ""}); {how}.')
  data_path = workdir / DATA_FILE
  if fingerprint is not None and data_path.exists():
    old = read_json(data_path, 'the fingerprint of the run\'s data',
                    'repair it, or remove it to record the data again')
    old = old if isinstance(old, dict) else {}
    diff = sorted(k for k in set(old) | set(fingerprint)
                  if old.get(k) != fingerprint.get(k))
    if diff and not allowed:
      shown = ', '.join(f'{k}: {_short(old.get(k))} -> '
                        f'{_short(fingerprint.get(k))}' for k in diff[:3])
      raise errors.WorkdirError(
          f'workdir {workdir} was trained on other data ({shown}); point '
          f'--config.data_dir at the data of its run, or {how}.')
    changes.update({f'data.{k}': (old.get(k), fingerprint.get(k)) for k in diff})
  return changes


def _short(value):
  text = repr(value)
  return text if len(text) <= 24 else text[:21] + '...'


def record_config(workdir, config, fingerprint, step=None, changes=None):
  """Writes `config.json` and `data.json`; with `changes` (allowed on
  resuming at `step`), appends them to `config_changes.jsonl` first."""
  workdir = fs.path(workdir)
  if changes:
    _append(workdir / CHANGES_FILE, json.dumps({'step': step, 'changes': {
        k: list(v) for k, v in changes.items()}}) + '\n')
  fs.write_json_atomic(workdir / CONFIG_FILE, config_record(config))
  if fingerprint is not None:
    fs.write_json_atomic(workdir / DATA_FILE, fingerprint)


def ensure_data_record(workdir, fingerprint):
  """Writes `data.json` if missing (workdirs made before it was recorded)."""
  path = fs.path(workdir) / DATA_FILE
  if fingerprint is not None and not path.exists():
    fs.write_json_atomic(path, fingerprint)


def _append(path, text):
  with path.open('a') as f:
    f.write(text)


def finished_results(workdir):
  """The results of a finished run in `workdir` (announced), or None."""
  path = fs.path(workdir) / RESULTS_FILE
  if not path.exists():
    return None
  fix = 'remove it (and export/) to evaluate the last checkpoint again'
  results = read_json(path, 'results.json of a finished run', fix)
  try:
    error = float(results['head_1_test_error'])
  except (KeyError, TypeError, ValueError):
    raise errors.WorkdirError(
        f'{path} has no head_1_test_error: it is not the results of a run; '
        f'{fix}.') from None
  logging_utils.console(f'{workdir} already finished: head 1 test error '
                        f'{error:.2f}% (nothing to do).')
  return results


def forget_logs_after(workdir, step, num_steps):
  """Drops the `metrics.jsonl` records that a run resumed at `step` writes again.

  Those are the records past `step`, and at the last step (`num_steps`) the
  final evaluation's, written after its checkpoint (an evaluation at an
  earlier step is written before that step's checkpoint). So every
  (step, kind) is logged once.
  """
  path = fs.path(workdir) / METRICS_FILE
  if not path.exists():
    return
  def keep(line):
    try:
      record = json.loads(line)
      at, kind = record['step'], record['kind']
    except (ValueError, KeyError, TypeError):  # e.g. cut short by a kill
      return False
    return at < step or (at == step and (step < num_steps or kind == 'train'))
  if path.is_dir():
    raise errors.WorkdirError(f'{path} (the run\'s metric log) is not a file: '
                              'move it away and rerun.')
  # Undecodable bytes (a damaged line) become U+FFFD: that line is dropped.
  lines = path.read_bytes().decode('utf-8', errors='replace').splitlines(True)
  kept = [l for l in lines if keep(l)]
  if len(kept) < len(lines):
    tmp = path.parent / f'{path.name}.tmp'
    tmp.write_text(''.join(kept))
    tmp.replace(path)


# ----------------------------------------------------------------------------
# Checkpoints.


def checkpoint_manager(workdir, config, cleanup=False):
  """The run's CheckpointManager; `cleanup` is for the training run only.

  It saves every `config.checkpoint_every_steps` steps (orbax's fixed-interval
  policy alone: its default would also save at the first step of a run and on
  a pre-emption notice, which the loop agrees on itself, `signals`).
  `cleanup` removes the `<step>.orbax-checkpoint-tmp-*` folders of saves that
  a killed run left half-written (orbax never lists them as steps).
  """
  directory = fs.path(workdir) / 'checkpoints'
  if directory.exists() and not directory.is_dir():
    raise errors.WorkdirError(
        f'{fs.orbax_dir(directory)} is a file, not the checkpoint folder: move '
        'it away and rerun (the run then starts over).')
  manager = ocp.CheckpointManager(
      fs.orbax_dir(directory),
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


def save(manager, step, state, *, force=False):
  """Checkpoints `state` at `step` (when the manager's policy says so, or `force`).

  The one place that writes training checkpoints: state that must resume
  with the run (e.g. a data iterator's position) joins the train state here,
  as another item of the same step, and in `restore_latest`.
  """
  return manager.save(step, args=ocp.args.StandardSave(state), force=force)


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
  corrupt_dir = fs.path(corrupt_dir)
  for step in steps:
    src = fs.path(str(manager.directory)) / str(step)
    dest = corrupt_dir / f'{step}_{stamp}'
    if jax.process_index() == 0:
      corrupt_dir.mkdir(parents=True, exist_ok=True)
      src.rename(dest)
      logging_utils.console(
          f'warning: moved the unreadable checkpoint {src} to {dest}.')
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('collab_jax:move_aside')
  manager.reload()


def check_steps(manager, workdir, num_steps):
  """Refuses to resume a run whose checkpoints are past its last step.

  Training on from there would not go back, and results.json would name a
  step the model is not at; nothing is written before this check.
  """
  latest = manager.latest_step()
  if latest is not None and latest > num_steps:
    raise errors.WorkdirError(
        f'the last checkpoint of {workdir} is at step {latest}, past the '
        f'{num_steps} steps of this config: a run never goes back a step. Use '
        'a new --workdir, or set num_train_steps (num_epochs) to at least '
        f'{latest}.')


# ----------------------------------------------------------------------------
# The export.


def export_dir(workdir):
  return fs.path(workdir) / 'export' / 'head_1'


def export_variables(state, splits, head=0):
  """Head `head` of the trained tree as plain target-network variables."""
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return heads_lib.export_head(jax.device_get(variables), splits, head)


def export_step(workdir):
  """The step of the export in `workdir`: None if there is none, -1 if unknown.

  Exports record their step in orbax's custom metadata; those written before
  it was recorded have none.
  """
  directory = export_dir(workdir)
  if not directory.exists():
    return None
  try:
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(fs.orbax_dir(directory)).custom_metadata or {}
    return int(meta['step'])
  except Exception:  # pylint: disable=broad-except
    return -1


def check_export(workdir, num_steps):
  """Refuses to train towards `num_steps` when the export holds another step."""
  step = export_step(workdir)
  if step is not None and step >= 0 and step != num_steps:
    raise errors.WorkdirError(
        f'{export_dir(workdir)} holds head 1 at step {step}, but this run ends '
        f'at step {num_steps}: the export, results.json and the last '
        'checkpoint must name the same step. Move the export folder away to go '
        'on (it is written once), or use a new --workdir.')


def save_export(workdir, state, splits, step):
  """Writes head 1 of `state` (at `step`) to `<workdir>/export/head_1`, once.

  Every process takes part in the save (orbax synchronises them); process 0
  writes the files. An export already there (e.g. written just before a
  crash) is kept if it is this very head 1, and refused otherwise; orbax
  writes to a temporary folder and renames it when complete.

  Raises:
    WorkdirError: the export there holds other weights or another step.
  """
  directory = export_dir(workdir)
  exported = export_variables(state, tuple(tuple(s) for s in splits), 0)
  found = export_step(workdir)
  if found is None:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(fs.orbax_dir(directory), exported,
                 custom_metadata={'step': int(step)})
    return
  same = found == step
  if found < 0:  # no step recorded: compare the weights themselves
    with ocp.StandardCheckpointer() as ckptr:
      old = ckptr.restore(fs.orbax_dir(directory))
    same = (jax.tree.structure(old) == jax.tree.structure(exported) and all(
        (a == b).all() for a, b in zip(jax.tree.leaves(old),
                                       jax.tree.leaves(exported))))
  if not same:
    raise errors.WorkdirError(
        f'{directory} holds another head 1 than the one trained to step {step}'
        ': the export, results.json and the last checkpoint must name the same '
        'step. Move the export folder away and rerun to export this one.')
