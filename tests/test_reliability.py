"""Reliability: exact resume after kill -9, pre-emption, corrupt checkpoints,
the non-finite guard, workdir safety, bad input, several processes, determinism.

Runs go through the real CLI (`python -m collab_jax.main`) in subprocesses
where a process has to die or several have to join; the rest is in-process.
"""

import errno
import glob
import gzip
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from collab_jax import errors
from collab_jax.trainer import checkpointing
from collab_jax.trainer import fs
from collab_jax.trainer import logging_utils
from collab_jax.trainer import parallel
from collab_jax.trainer import steps
from collab_jax.trainer import train
import testutil
from testutil import env as _env  # pylint: disable=g-importing-member
from testutil import launch_two as _launch  # pylint: disable=g-importing-member
from testutil import start_cli as _start  # pylint: disable=g-importing-member
from testutil import wait_all as _wait_all  # pylint: disable=g-importing-member

# Orbax leaves coroutines of a failed restore (a corrupt checkpoint) behind;
# they are collected during a later test.
pytestmark = pytest.mark.filterwarnings(
    'ignore::pytest.PytestUnraisableExceptionWarning')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
STEPS = 16
# The runs of these tests: label noise and augmentation on (their draws must
# resume exactly), a log line every step, a checkpoint every other step.
RUN = {'label_noise': 0.3, 'num_train_steps': STEPS, 'log_every_steps': 1,
       'checkpoint_every_steps': 2}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('fmnist')
  testutil.fake_fashion_mnist(str(d), num_train=96, num_test=40, shape=(12, 12))
  return d


def _config(data_dir, **overrides):
  return testutil.tiny_config(data_dir, **{**RUN, **overrides})


def _write_config(path, data_dir, **overrides):
  """A config file for the CLI that returns `_config(data_dir, **overrides)`."""
  path.write_text(
      f'import sys\nsys.path.insert(0, {TESTS!r})\nimport testutil\n\n\n'
      f'def get_config():\n  return testutil.tiny_config(\n'
      f'      {str(data_dir)!r}, **{ {**RUN, **overrides}!r})\n')
  return path


def _run(args, env=None, timeout=300):
  return subprocess.run([sys.executable, '-m', 'collab_jax.main', *args],
                        capture_output=True, text=True, cwd=REPO,
                        env=env or _env(), timeout=timeout)


def _train_records(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.readlines()
  out = []
  for line in lines:
    try:
      r = json.loads(line)
    except ValueError:  # being written
      continue
    if r['kind'] == 'train':
      out.append(r)
  return out


def _wait_for_step(workdir, step, proc, log, timeout=180):
  """Waits until the run in `workdir` has logged `step`; returns the last step."""
  t0 = time.time()
  while time.time() - t0 < timeout:
    records = _train_records(workdir)
    if records and records[-1]['step'] >= step:
      return records[-1]['step']
    assert proc.poll() is None, open(log).read()[-3000:]
    time.sleep(0.01)
  proc.kill()
  raise AssertionError(f'no step {step} after {timeout}s: ' + open(log).read())


def _abstract_state(config):
  built = train.build(config)
  return jax.eval_shape(lambda: steps.create_train_state(
      jax.random.key(0), built.model, built.data.image_shape, built.tx,
      built.method.init_opt_state))


def _state(workdir, config, step=None):
  """The full TrainState checkpointed in `workdir` (latest or `step`), numpy."""
  # Placed on this process's devices whatever the saving processes had.
  replicated = parallel.data_parallel().replicated
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      _abstract_state(config))
  with checkpointing.checkpoint_manager(str(workdir), config) as manager:  # pylint: disable=protected-access
    step = manager.latest_step() if step is None else step
    state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  return jax.device_get(state)


def _assert_trees_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


def _losses(workdir):
  return {r['step']: r['loss'] for r in _train_records(workdir)}


@pytest.fixture(scope='module')
def baseline(data_dir, tmp_path_factory):
  """An uninterrupted in-process run of `_config`: (workdir, results, state)."""
  workdir = tmp_path_factory.mktemp('baseline')
  config = _config(data_dir)
  results = train.train_and_evaluate(config, str(workdir))
  return workdir, results, _state(workdir, config)


# ----------------------------------------------------------------------------
# 1, 2. Killed or pre-empted runs resume bit-exactly.


def test_sigkill_at_random_step_then_rerun_is_bit_identical(
    data_dir, baseline, tmp_path):
  base_dir, base_results, base_state = baseline
  cfg = _write_config(tmp_path / 'cfg.py', data_dir)
  workdir = tmp_path / 'run'
  args = [f'--config={cfg}', f'--workdir={workdir}']
  kill_after = random.randint(5, STEPS - 6)
  proc = _start(args, tmp_path / 'log1')
  killed_at = _wait_for_step(workdir, kill_after, proc, tmp_path / 'log1')
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(60) == -signal.SIGKILL
  assert not os.path.exists(workdir / 'results.json')
  killed_at = max(killed_at, _train_records(workdir)[-1]['step'])
  assert killed_at < STEPS, 'the run ended before it could be killed'

  out = _run(args)
  assert out.returncode == 0, out.stderr[-3000:]
  resumed = [l for l in out.stdout.splitlines() if 'resuming from' in l]
  assert resumed, out.stdout
  resumed_at = int(resumed[0].split()[-1])
  assert 0 < resumed_at <= killed_at, (kill_after, killed_at, resumed_at)
  config = _config(data_dir)
  # Params, optimizer state, BatchNorm statistics, step and counters.
  _assert_trees_equal(_state(workdir, config), base_state)
  with open(workdir / 'results.json') as f:
    results = json.load(f)
  assert results['head_test_errors'] == base_results['head_test_errors']
  # The log holds every step once, with the uninterrupted run's losses.
  assert [r['step'] for r in _train_records(workdir)] == list(range(1, STEPS + 1))
  assert _losses(workdir) == _losses(base_dir)
  # Half-written saves of the killed run are cleaned up.
  assert not glob.glob(str(workdir / 'checkpoints' / '*orbax-checkpoint-tmp*'))


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_exits_cleanly(
    data_dir, baseline, tmp_path, sig):
  _, _, base_state = baseline
  cfg = _write_config(tmp_path / 'cfg.py', data_dir)
  workdir = tmp_path / 'run'
  args = [f'--config={cfg}', f'--workdir={workdir}']
  proc = _start(args, tmp_path / 'log1')
  _wait_for_step(workdir, 3, proc, tmp_path / 'log1')
  proc.send_signal(sig)
  assert proc.wait(120) == 0
  log = open(tmp_path / 'log1').read()
  stopped = [l for l in log.splitlines() if l.startswith('pre-empted at step')]
  assert len(stopped) == 1 and signal.Signals(sig).name in stopped[0], log
  assert 'Traceback' not in log
  step = int(stopped[0].split()[3])
  assert step < STEPS and not os.path.exists(workdir / 'results.json')
  config = _config(data_dir)
  with checkpointing.checkpoint_manager(str(workdir), config) as manager:  # pylint: disable=protected-access
    assert manager.latest_step() == step
  if sig == signal.SIGINT:
    return  # resuming is the same as after SIGTERM
  out = _run(args)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'resuming from the checkpoint at step {step}' in out.stdout
  _assert_trees_equal(_state(workdir, config), base_state)


def test_sigint_during_compilation_exits_130_without_traceback(data_dir, tmp_path):
  cfg = _write_config(tmp_path / 'cfg.py', data_dir)
  workdir = tmp_path / 'run'
  # No compilation cache: compiling takes long enough to be interrupted.
  env = {k: v for k, v in _env().items() if not k.startswith('JAX_COMPILATION')}
  env['JAX_ENABLE_COMPILATION_CACHE'] = 'false'
  proc = _start([f'--config={cfg}', f'--workdir={workdir}'], tmp_path / 'log',
                env=env)
  # config.json is written just before the train step is compiled and
  # run_info.json just after.
  t0 = time.time()
  while not (workdir / 'config.json').exists():
    assert proc.poll() is None, open(tmp_path / 'log').read()
    assert time.time() - t0 < 180
    time.sleep(0.01)
  time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  t_signal = time.time()
  rc = proc.wait(60)
  log = open(tmp_path / 'log').read()
  assert rc == 130, log
  assert not (workdir / 'run_info.json').exists(), 'compilation had finished'
  assert 'Traceback' not in log and 'Fatal' not in log, log
  assert log.strip().splitlines()[-1] == 'interrupted.', log
  assert _train_records(workdir) == []
  print(f'exited {time.time() - t_signal:.2f} s after SIGINT')
  # The next start is not blocked by the interrupted one and trains.
  out = _run([f'--config={cfg}', f'--workdir={workdir}',
              '--config.halt_after_steps=2'])
  assert out.returncode == 0, out.stderr[-3000:]


# ----------------------------------------------------------------------------
# 2b. One trainer per workdir.


def test_second_trainer_on_a_busy_workdir_is_refused(data_dir, tmp_path):
  cfg = _write_config(tmp_path / 'cfg.py', data_dir)
  workdir = tmp_path / 'run'
  args = [f'--config={cfg}', f'--workdir={workdir}']
  procs = [_start(args, tmp_path / f'log{i}') for i in range(2)]
  rcs = [p.wait(300) for p in procs]
  logs = [open(tmp_path / f'log{i}').read() for i in range(2)]
  assert sorted(rcs) == [0, 2], (rcs, logs)
  winner, loser = (0, 1) if rcs[0] == 0 else (1, 0)
  lines = [l for l in logs[loser].splitlines() if l.strip()]
  assert len(lines) == 1, logs[loser]
  assert lines[0].startswith(f'error: workdir {workdir} is in use by another '
                             f'trainer (pid {procs[winner].pid} on host '
                             f'{socket.gethostname()}'), lines[0]
  assert [r['step'] for r in _train_records(workdir)] == list(range(1, STEPS + 1))
  assert os.path.exists(workdir / 'results.json')


def test_lock_is_held_for_the_run_and_released_after(data_dir, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  config = _config(data_dir, num_train_steps=2)
  with fs.workdir_lock(str(workdir)):
    with pytest.raises(errors.WorkdirError,
                       match=f'in use by another trainer \\(pid {os.getpid()} '):
      train.train_and_evaluate(config, str(workdir))
  assert not os.path.exists(workdir / 'config.json')  # refused before any work
  # A lock file left by a process that died (its flock went with it).
  (workdir / 'trainer.lock').write_text('pid 999999 on host elsewhere')
  assert train.train_and_evaluate(config, str(workdir))['steps'] == 2
  with fs.workdir_lock(str(workdir)):  # released when the run returned
    pass


# ----------------------------------------------------------------------------
# 3. Corrupt checkpoints.


def _garble(step_dir):
  """Overwrites the middle of the largest file of a checkpoint with junk."""
  files = [p for p in glob.glob(os.path.join(step_dir, '**'), recursive=True)
           if os.path.isfile(p)]
  biggest = max(files, key=os.path.getsize)
  size = os.path.getsize(biggest)
  with open(biggest, 'r+b') as f:
    f.seek(size // 4)
    f.write(b'\xde\xad' * (size // 4))
  return biggest


def test_corrupt_latest_checkpoint_is_moved_aside_and_run_falls_back(
    data_dir, tmp_path, capsys):
  halted = _config(data_dir, keep_checkpoints=2, halt_after_steps=6)
  workdir = tmp_path / 'run'
  assert train.train_and_evaluate(halted, str(workdir)) is None
  ckpts = workdir / 'checkpoints'
  assert sorted(os.listdir(ckpts)) == ['4', '6']
  good_6 = _state(workdir, halted, 6)
  garbled = _garble(str(ckpts / '6'))
  garbled_size = os.path.getsize(garbled)
  # A half-written save of step 8 left by a killed process.
  shutil.copytree(ckpts / '4', ckpts / '8.orbax-checkpoint-tmp-1234567890')
  capsys.readouterr()

  assert train.train_and_evaluate(halted, str(workdir)) is None
  out = capsys.readouterr().out
  assert 'checkpoint at step 6 is unreadable' in out, out
  assert 'resuming from the checkpoint at step 4' in out, out
  # The corrupt step was moved aside with its bytes, never deleted ...
  moved = glob.glob(str(workdir / 'corrupt_checkpoints' / '6_*'))
  assert len(moved) == 1
  rel = os.path.relpath(garbled, ckpts / '6')
  assert os.path.getsize(os.path.join(moved[0], rel)) == garbled_size
  # ... so step 6 was saved again (orbax skips a step it thinks it has), the
  # good step 4 survived max_to_keep=2, and the half-written step 8 is gone.
  assert sorted(os.listdir(ckpts)) == ['4', '6']
  _assert_trees_equal(_state(workdir, halted, 6), good_6)

  # A workdir whose only checkpoint is unreadable: refuse, move nothing.
  _garble(str(ckpts / '4'))
  shutil.rmtree(ckpts / '6')
  with pytest.raises(errors.WorkdirError, match='no checkpoint in .* is readable'):
    train.train_and_evaluate(halted, str(workdir))
  assert os.listdir(ckpts) == ['4']


# ----------------------------------------------------------------------------
# 4. Non-finite losses and gradients.


def test_half_written_saves_are_gone_when_the_manager_returns(tmp_path):
  # Orbax cleans them up in a background thread; the trainer waits for it so
  # that nothing afterwards (dataset loading under tfds.testing.mock_data
  # patches file access process-wide) races the cleanup.
  tmp = tmp_path / 'checkpoints' / '8.orbax-checkpoint-tmp-1234567890'
  tmp.mkdir(parents=True)
  (tmp / 'payload').write_bytes(b'x' * 1000)
  config = ml_collections.ConfigDict({'keep_checkpoints': 2,
                                      'checkpoint_every_steps': 1})
  manager = checkpointing.checkpoint_manager(str(tmp_path), config, cleanup=True)
  try:
    assert hasattr(manager, '_maybe_await_cleanup_tmp_directory')
    assert not tmp.exists()
  finally:
    manager.close()


def test_divergence_skips_updates_then_stops_with_state_intact(data_dir, tmp_path):
  """A learning rate of 1e30 overflows the network: real NaNs, no test hook."""
  config = _config(data_dir, learning_rate=1e30, label_noise=0.0,
                   log_every_steps=2, max_nonfinite_streak=5,
                   keep_checkpoints=10)
  workdir = tmp_path / 'run'
  with pytest.raises(errors.NonFiniteError, match='consecutive steps had a '
                     'non-finite loss or gradient.*last good checkpoint'):
    train.train_and_evaluate(config, str(workdir))
  records = _train_records(workdir)
  assert records[-1]['step'] == 6  # the first log step with a streak >= 5
  assert records[-1]['nonfinite_skipped'] == 1.0
  assert not os.path.exists(workdir / 'results.json')
  assert not os.path.exists(workdir / 'export')
  with checkpointing.checkpoint_manager(str(workdir), config) as manager:  # pylint: disable=protected-access
    assert manager.all_steps() == [2, 4]  # none at the failing log step
  at_2, at_4 = _state(workdir, config, 2), _state(workdir, config, 4)
  for state in (at_2, at_4):
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state)
               if np.issubdtype(x.dtype, np.floating))
  # Steps 3 and 4 were skipped whole: params, optimizer and BN stats unchanged.
  assert int(at_4.nonfinite_streak) == int(at_2.nonfinite_streak) + 2
  assert int(at_4.step) == 4
  _assert_trees_equal((at_2.params, at_2.opt_state, at_2.batch_stats),
                      (at_4.params, at_4.opt_state, at_4.batch_stats))


@pytest.mark.filterwarnings('ignore:overflow encountered in cast')
def test_guard_rejects_an_overflowing_update(data_dir):
  """Finite loss and gradients but an update that overflows: skipped too."""
  config = _config(data_dir)
  built = train.build(config)
  data, model = built.data, built.model
  tx = steps.create_optimizer(config, lambda s: 1e39)  # inf in float32
  state = steps.create_train_state(jax.random.key(0), model, data.image_shape, tx)
  step = jax.jit(lambda s, b: steps.train_step(
      s, b, model=model, tx=tx, method=built.method, preprocess=data.preprocess,
      seed=0))
  new, metrics = step(state, next(data.train_iter(0)))
  assert np.isfinite(float(metrics['loss'][0]))
  assert float(metrics['nonfinite_skipped'][0]) == 1.0
  _assert_trees_equal((new.params, new.opt_state, new.batch_stats),
                      (state.params, state.opt_state, state.batch_stats))
  assert int(new.step) == 1 and int(new.nonfinite_total) == 1


# ----------------------------------------------------------------------------
# 5. Workdir safety.


def _snapshot(workdir):
  return {os.path.join(dp, f): os.path.getmtime(os.path.join(dp, f))
          for dp, _, fs in os.walk(workdir) for f in fs}


def test_workdir_of_another_config_and_finished_runs_are_left_alone(
    data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  short = {'num_train_steps': 4, 'label_noise': 0.0}
  assert train.train_and_evaluate(
      _config(data_dir, halt_after_steps=2, **short), workdir) is None
  before = _snapshot(workdir)
  other = _config(data_dir, learning_rate=0.01, **short)
  with pytest.raises(errors.WorkdirError,
                     match=r'different config \(learning_rate: 0.05 -> 0.01\).*'
                     'allow_config_change=True'):
    train.train_and_evaluate(other, workdir)
  assert _snapshot(workdir) == before
  # Allowed explicitly: it resumes and finishes.
  other.allow_config_change = True
  results = train.train_and_evaluate(other, workdir)
  assert results['steps'] == 4
  # ... and says so: config.json is the config that finished it, and the
  # change is logged with the step it took effect at.
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['learning_rate'] == 0.01
  with open(os.path.join(workdir, 'config_changes.jsonl')) as f:
    assert json.loads(f.read()) == {
        'step': 2, 'changes': {'learning_rate': [0.05, 0.01]}}
  # A finished workdir is never trained again or rewritten, whatever the config.
  finished = _snapshot(workdir)
  for config in (other, _config(data_dir, num_train_steps=8,
                                allow_config_change=True)):
    assert train.train_and_evaluate(config, workdir) == results
    assert _snapshot(workdir) == finished
  with pytest.raises(errors.WorkdirError, match='different config'):
    train.train_and_evaluate(_config(data_dir, learning_rate=0.2, **short),
                             workdir)
  # Killed after the export but before results.json: the rerun keeps the
  # export (it is never rewritten) and writes results.json atomically.
  os.remove(os.path.join(workdir, 'results.json'))
  export = {k: v for k, v in finished.items() if '/export/' in k}
  again = train.train_and_evaluate(other, workdir)
  assert again['head_test_errors'] == results['head_test_errors']
  assert {k: v for k, v in _snapshot(workdir).items() if '/export/' in k} == export
  assert not [f for f in _snapshot(workdir) if '.tmp' in f]


def _files(workdir):
  """Every file's mtime, but the lock's (a run that starts records its pid)."""
  return {k: v for k, v in _snapshot(workdir).items()
          if not os.path.basename(k).startswith('trainer.lock')}


def _records(workdir, kind):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['kind'] == kind]


# A resumed run never goes back a step.
def test_resume_never_goes_back_a_step(data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  short = {'label_noise': 0.0, 'num_train_steps': 4}
  assert train.train_and_evaluate(
      _config(data_dir, halt_after_steps=3, **short), workdir) is None
  before = _files(workdir)
  fewer = _config(data_dir, label_noise=0.0, num_train_steps=2,
                  allow_config_change=True)
  with pytest.raises(errors.WorkdirError, match='last checkpoint of .* is at '
                     'step 3, past the 2 steps of this config: a run never '
                     'goes back a step') as e:
    train.train_and_evaluate(fewer, workdir)
  assert '\n' not in str(e.value)
  assert _files(workdir) == before  # config.json and the log untouched


# results.json, the export and the last checkpoint agree.
def test_export_results_and_checkpoint_name_the_same_step(data_dir, tmp_path):
  workdir = tmp_path / 'run'
  three = _config(data_dir, label_noise=0.0, num_train_steps=3)
  assert train.train_and_evaluate(three, str(workdir))['steps'] == 3
  assert checkpointing.export_step(workdir) == 3
  os.remove(workdir / 'results.json')
  six = _config(data_dir, label_noise=0.0, num_train_steps=6,
                allow_config_change=True)
  before = _files(workdir)
  with pytest.raises(errors.WorkdirError, match=r'export/head_1 holds head 1 '
                     'at step 3, but this run ends at step 6') as e:
    train.train_and_evaluate(six, str(workdir))
  assert '\n' not in str(e.value) and _files(workdir) == before
  # Moved away as the message says, the run trains on and exports step 6.
  shutil.move(workdir / 'export', tmp_path / 'export_at_3')
  results = train.train_and_evaluate(six, str(workdir))
  assert results['steps'] == 6 and checkpointing.export_step(workdir) == 6
  with checkpointing.checkpoint_manager(str(workdir), six) as manager:
    assert manager.latest_step() == 6
  # An export that records no step (made before steps were recorded) is
  # compared by its weights: step 3's head 1 is not step 6's.
  os.remove(workdir / 'results.json')
  shutil.rmtree(workdir / 'export')
  with ocp.StandardCheckpointer() as ckptr:
    at_3 = ckptr.restore(str(tmp_path / 'export_at_3' / 'head_1'))
    ckptr.save(str(workdir / 'export' / 'head_1'), at_3)
  assert checkpointing.export_step(workdir) == -1
  with pytest.raises(errors.WorkdirError, match='holds another head 1 than the '
                     'one trained to step 6'):
    train.train_and_evaluate(six, str(workdir))
  assert not (workdir / 'results.json').exists()


# Every (step, kind) once, also after a crash in the export.
def test_final_records_are_logged_once_after_a_crash_in_the_export(
    data_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / 'run')
  config = _config(data_dir, label_noise=0.0, num_train_steps=2)
  def killed(*args, **kwargs):
    raise RuntimeError('killed during the export')
  monkeypatch.setattr(checkpointing, 'save_export', killed)
  with pytest.raises(RuntimeError, match='killed'):
    train.train_and_evaluate(config, workdir)
  monkeypatch.undo()
  assert train.train_and_evaluate(config, workdir)['steps'] == 2
  for kind in ('train', 'eval', 'final'):
    assert [r['step'] for r in _records(workdir, kind)] == (
        [1, 2] if kind == 'train' else [2]), kind


# No config record beside checkpoints is a damaged workdir.
def test_missing_config_record_is_a_damaged_workdir(data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  short = {'label_noise': 0.0, 'num_train_steps': 4}
  assert train.train_and_evaluate(
      _config(data_dir, halt_after_steps=2, **short), workdir) is None
  os.remove(os.path.join(workdir, 'config.json'))
  before = _files(workdir)
  other = _config(data_dir, beta=0.9, **short)
  with pytest.raises(errors.WorkdirError, match='config.json is missing but .* '
                     'holds checkpoints: the workdir is damaged') as e:
    train.train_and_evaluate(other, workdir)
  assert '\n' not in str(e.value) and _files(workdir) == before
  other.allow_config_change = True
  assert train.train_and_evaluate(other, workdir)['steps'] == 4
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['beta'] == 0.9
  with open(os.path.join(workdir, 'config_changes.jsonl')) as f:
    change = json.loads(f.read())
  assert change['step'] == 2 and list(change['changes']) == ['config.json']


# The data's fingerprint is recorded and compared.
def test_resume_on_other_data_is_refused(data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  short = {'label_noise': 0.0, 'num_train_steps': 4}
  halted = _config(data_dir, halt_after_steps=2, **short)
  assert train.train_and_evaluate(halted, workdir) is None
  with open(os.path.join(workdir, 'data.json')) as f:
    recorded = json.load(f)
  assert recorded['dataset'] == 'fashion_mnist_local'
  assert (recorded['num_train'], recorded['num_test']) == (96, 40)
  assert recorded['image_shape'] == [12, 12, 1] and recorded['num_classes'] == 10
  assert len(recorded['train_sha256']) == len(recorded['test_sha256']) == 16
  other = tmp_path / 'other'  # same sizes and shapes, other images
  testutil.fake_fashion_mnist(str(other), num_train=96, num_test=40,
                              shape=(12, 12), seed=1)
  before = _files(workdir)
  with pytest.raises(errors.WorkdirError, match=r'was trained on other data '
                     r"\(mean: .*, test_sha256: '\w+' -> '\w+'\); point "
                     '--config.data_dir at the data of its run') as e:
    train.train_and_evaluate(_config(other, **short), workdir)
  assert '\n' not in str(e.value) and _files(workdir) == before
  bigger = tmp_path / 'bigger'  # 32x32 images
  testutil.fake_fashion_mnist(str(bigger), num_train=96, num_test=40,
                              shape=(32, 32))
  with pytest.raises(errors.WorkdirError, match='image_shape: '):
    train.train_and_evaluate(_config(bigger, **short), workdir)
  # The same data in another folder (data_dir may change) resumes.
  moved = tmp_path / 'moved'
  shutil.copytree(data_dir, moved)
  assert train.train_and_evaluate(
      _config(moved, halt_after_steps=3, **short), workdir) is None
  # Other data, allowed explicitly: resumed, and the change recorded.
  allowed = _config(other, allow_config_change=True, **short)
  assert train.train_and_evaluate(allowed, workdir)['steps'] == 4
  with open(os.path.join(workdir, 'config_changes.jsonl')) as f:
    change = json.loads(f.read())
  assert change['step'] == 3 and 'data.train_sha256' in change['changes']
  with open(os.path.join(workdir, 'data.json')) as f:
    assert json.load(f)['train_sha256'] != recorded['train_sha256']


def test_workdir_without_a_data_record_resumes_and_records_it(data_dir, tmp_path):
  """Workdirs made before data.json existed: the data is recorded on resuming."""
  workdir = str(tmp_path / 'run')
  config = _config(data_dir, label_noise=0.0, num_train_steps=4)
  assert train.train_and_evaluate(
      _config(data_dir, label_noise=0.0, num_train_steps=4, halt_after_steps=2),
      workdir) is None
  os.remove(os.path.join(workdir, 'data.json'))
  assert train.train_and_evaluate(config, workdir)['steps'] == 4
  assert os.path.exists(os.path.join(workdir, 'data.json'))


# Finite divergence is a failure, by a documented rule.
@pytest.mark.parametrize('overrides,message', [
    # While training: every step of 5 in a row (log windows of 1 step) with
    # head 1's training cross-entropy above 10 log(10) = 23 nats. Steps 1 and
    # 2 are still below it.
    ({'num_train_steps': 12, 'max_divergent_steps': 5},
     r"training diverged: head 1's training cross-entropy was above 23 nats "
     r'\(ten times a uniform guess over 10 classes\) in every step of the last '
     r'5 \(up to step 7\)'),
    # At the end (fewer steps than the rule needs): head 1's test
    # cross-entropy above the same threshold.
    ({'num_train_steps': 3}, r"training diverged: head 1's test cross-entropy "
     r'is .* nats, above 23 .*no results.json was written')])
def test_finite_divergence_fails_the_run(data_dir, tmp_path, overrides,
                                         message):
  config = _config(data_dir, learning_rate=30.0, label_noise=0.0,
                   log_every_steps=1, max_nonfinite_streak=100, **overrides)
  workdir = tmp_path / 'run'
  with pytest.raises(errors.NonFiniteError, match=message) as e:
    train.train_and_evaluate(config, str(workdir))
  assert '\n' not in str(e.value)
  records = _train_records(workdir)
  assert all(math.isfinite(r['loss']) for r in records)  # finite all along
  assert not (workdir / 'results.json').exists()
  assert not (workdir / 'export').exists()


@pytest.mark.parametrize('learning_rate,message', [
    (30.0, 'error: training diverged'),
    # inf in float32: numpy's RuntimeWarnings (overflow in cast) came first.
    (1e39, 'error: all 3 updates were skipped')])
def test_cli_failed_run_is_one_line_with_exit_status_2(data_dir, tmp_path,
                                                       learning_rate, message):
  cfg = _write_config(tmp_path / 'cfg.py', data_dir, learning_rate=learning_rate,
                      num_train_steps=3, label_noise=0.0,
                      max_nonfinite_streak=10)
  out = _run([f'--config={cfg}', f'--workdir={tmp_path / "run"}'])
  assert out.returncode == 2, out.stderr[-3000:]
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, out.stderr  # no warning lines before it
  assert lines[0].startswith(message), lines[0]


# An evaluation batch beyond the test set or the memory.
def test_eval_batch_is_at_most_the_evaluated_set(data_dir, tmp_path):
  config = _config(data_dir, label_noise=0.0, num_train_steps=2)
  results = train.train_and_evaluate(config, str(tmp_path / 'a'))
  huge = _config(data_dir, label_noise=0.0, num_train_steps=2,
                 eval_batch_size=8 * 10**8)
  assert train.build(huge).data.eval_batch_size == 40  # the 40 test images
  again = train.train_and_evaluate(huge, str(tmp_path / 'b'))
  assert again['head_test_errors'] == results['head_test_errors']


def test_steps_that_do_not_fit_in_memory_are_refused():
  class Compiled:
    def memory_analysis(self):
      return types.SimpleNamespace(
          argument_size_in_bytes=2**60, output_size_in_bytes=0,
          temp_size_in_bytes=0, alias_size_in_bytes=0)
  with pytest.raises(errors.ConfigError, match=r'config.eval_batch_size: 10 '
                     r'needs 1073741824.0 GiB per device for evaluation but a '
                     r'device has .* GiB; lower it'):
    steps.check_memory(Compiled(), 'eval_batch_size', 10, 'evaluation')
  Compiled.memory_analysis = lambda self: types.SimpleNamespace(
      argument_size_in_bytes=2**20, output_size_in_bytes=0,
      temp_size_in_bytes=0, alias_size_in_bytes=0)
  steps.check_memory(Compiled(), 'eval_batch_size', 10, 'evaluation')


# ----------------------------------------------------------------------------
# 5b. Workdirs on object stores: gs:// through etils.epath.


@pytest.fixture
def object_store(monkeypatch):
  """gs:// served from memory: fsspec's memory filesystem through epath.

  epath reaches gs:// through tf.io.gfile when TensorFlow is installed and
  through fsspec otherwise; here fsspec, with the memory filesystem standing
  for gcsfs. Orbax writes arrays with tensorstore's own GCS driver, which
  nothing here can stand in for, so checkpoints are not written to it.
  """
  from etils.epath import backend
  from etils.epath import gpath
  import fsspec
  from fsspec.implementations import memory

  class Bucket(memory.MemoryFileSystem):
    protocol = ('gs', 'gcs')
    store = {}
    pseudo_dirs = ['']

    def __init__(self, *args, finalize_on_close=None, **kwargs):
      del finalize_on_close  # epath's argument for gcsfs
      super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
      for prefix in ('gs://', 'gcs://'):
        if path.startswith(prefix):
          path = path[len(prefix):]
      return super()._strip_protocol(path)

  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
  saved = {k: fsspec.registry.get(k) for k in ('gs', 'gcs')}
  for name in ('gs', 'gcs'):
    fsspec.register_implementation(name, Bucket, clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  yield Bucket.store
  for name, cls in saved.items():
    if cls is not None:
      fsspec.register_implementation(name, cls, clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def _events(path):
  """The TensorBoard events of an event file (the TFRecord framing read by hand)."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  data, pos, out = path.read_bytes(), 0, []
  while pos < len(data):
    n = int.from_bytes(data[pos:pos + 8], 'little')
    out.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + n]))
    pos += 12 + n + 4
  return out


def test_workdir_records_and_logs_on_an_object_store(object_store, data_dir,
                                                      tmp_path, monkeypatch):
  """config.json, data.json, metrics.jsonl, TensorBoard, results.json on gs://."""
  monkeypatch.chdir(tmp_path)
  workdir = fs.path('gs://bucket/run')
  assert not fs.is_local(workdir) and fs.orbax_dir(workdir) == 'gs://bucket/run'
  config = _config(data_dir)
  fingerprint = {'dataset': 'fashion_mnist_local', 'train_sha256': 'abc'}
  assert checkpointing.check_workdir(config, workdir, fingerprint) == {}
  workdir.mkdir(parents=True, exist_ok=True)
  checkpointing.record_config(workdir, config, fingerprint)
  assert checkpointing.check_workdir(config, workdir, fingerprint) == {}
  with pytest.raises(errors.WorkdirError, match='different config'):
    checkpointing.check_workdir(_config(data_dir, seed=1), workdir, fingerprint)
  with pytest.raises(errors.WorkdirError, match='trained on other data'):
    checkpointing.check_workdir(config, workdir, {**fingerprint,
                                                  'train_sha256': 'def'})
  writer = logging_utils.MetricWriter(workdir)
  for step in (1, 2, 3):
    writer.write(step, {'loss': 1.0 / step}, 'train')
  writer.write(3, {'error': 10.0}, 'eval')
  writer.close()
  checkpointing.forget_logs_after(workdir, 2, num_steps=3)
  logged = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r['kind']) for r in logged] == [(1, 'train'), (2, 'train')]
  (events_file,) = list((workdir / 'tensorboard').iterdir())
  events = _events(events_file)
  assert events[0].file_version == 'brain.Event:2'
  assert [(e.step, e.summary.value[0].tag) for e in events[1:]] == [
      (1, 'train/loss'), (2, 'train/loss'), (3, 'train/loss'), (3, 'eval/error')]
  fs.write_json_atomic(workdir / 'results.json', {'head_1_test_error': 12.5})
  assert checkpointing.finished_results(workdir) == {'head_1_test_error': 12.5}
  assert sorted(p.name for p in workdir.iterdir()) == [
      'config.json', 'data.json', 'metrics.jsonl', 'results.json', 'tensorboard']
  assert os.listdir(tmp_path) == []  # nothing local, no folder named 'gs:'
  assert '/bucket/run/config.json' in object_store


def test_lock_object_on_an_object_store(object_store):
  workdir = fs.path('gs://bucket/locked')
  workdir.mkdir(parents=True, exist_ok=True)
  lock = workdir / 'trainer.lock'
  with fs.workdir_lock(workdir):
    owner = json.loads(lock.read_text())
    assert (owner['pid'], owner['host']) == (os.getpid(), socket.gethostname())
    with pytest.raises(errors.WorkdirError, match=(
        f'workdir gs://bucket/locked is in use by another trainer \\(pid '
        f'{os.getpid()} on host {socket.gethostname()}, since ')):
      with fs.workdir_lock(workdir):
        pass
  assert not lock.exists()  # released when the run ended
  # Left behind by a trainer killed on another machine: refused, unless the
  # user says the owner is gone.
  lock.write_text(json.dumps({'host': 'tpu-worker-7', 'pid': 4242, 'start': 0}))
  with pytest.raises(errors.WorkdirError, match=(
      r'pid 4242 on host tpu-worker-7, since .*If that trainer is gone .* rerun '
      'with --break_lock')) as e:
    with fs.workdir_lock(workdir):
      pass
  assert '\n' not in str(e.value)
  with fs.workdir_lock(workdir, break_lock=True):
    assert json.loads(lock.read_text())['pid'] == os.getpid()
  # Left by a process of this host that has ended: taken over.
  ended = subprocess.Popen([sys.executable, '-c', 'pass'])
  ended.wait()
  lock.write_text(json.dumps({'host': socket.gethostname(), 'pid': ended.pid}))
  with fs.workdir_lock(workdir):
    assert json.loads(lock.read_text())['pid'] == os.getpid()


@pytest.mark.parametrize('workdir,message', [
    ('s3://bucket/run', 'workdir s3://bucket/run: the s3:// scheme is not '
     'supported (orbax writes checkpoints to local paths and gs:// only)'),
    ('memory://run', 'the memory:// scheme is not supported'),
    ('gs:/bucket/run', 'workdir gs:/bucket/run is not a gs:// URL; write '
     'gs://BUCKET/PATH'),
    ('gs://', 'workdir gs:// is not a gs:// URL')])
def test_workdir_url_that_cannot_work_is_one_line(data_dir, tmp_path,
                                                  monkeypatch, workdir, message):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(errors.WorkdirError) as e:
    train.train_and_evaluate(_config(data_dir), workdir)
  assert message in str(e.value) and '\n' not in str(e.value), str(e.value)
  assert os.listdir(tmp_path) == []  # no local folder named after the scheme


# ----------------------------------------------------------------------------
# 6. Bad input: one clear line, no traceback. (tests/test_train.py has 9 more
# CLI cases: splits out of range, 1 branch, batch over devices, unknown method,
# beta, unknown network, missing data dir, changed config, unknown key.)


def _write_bad_data(d, kind):
  """Fake Fashion-MNIST files in `d` with one defect."""
  testutil.fake_fashion_mnist(str(d), num_train=32, num_test=16, shape=(12, 12))
  images = d / 'train-images-idx3-ubyte.gz'
  if kind == 'truncated':
    with gzip.open(images) as f:
      data = f.read()
    with gzip.open(images, 'wb') as f:
      f.write(data[:-100])
  elif kind == 'magic':
    testutil.write_idx(str(images), np.zeros((32, 12, 12)), 2049)
  elif kind == 'shape':
    testutil.write_idx(str(d / 't10k-images-idx3-ubyte.gz'),
                       np.zeros((16, 10, 10)), 2051)
  elif kind == 'count':
    testutil.write_idx(str(d / 'train-labels-idx1-ubyte.gz'), np.zeros(31), 2049)
  elif kind == 'not_gzip':
    images.write_bytes(b'this is not gzip data')
  elif kind == 'corrupt_deflate':  # a valid gzip header, garbage after it
    data = bytearray(images.read_bytes())
    data[30:38] = bytes(b ^ 0xFF for b in data[30:38])
    images.write_bytes(bytes(data))
  elif kind == 'empty_test':
    testutil.write_idx(str(d / 't10k-images-idx3-ubyte.gz'),
                       np.zeros((0, 12, 12)), 2051)
    testutil.write_idx(str(d / 't10k-labels-idx1-ubyte.gz'), np.zeros(0), 2049)


BAD_CONFIGS = [
    ({'eval_batch_size': 12}, errors.ConfigError,
     'config.eval_batch_size: 12 does not divide over 8 devices'),
    ({'batch_size': 12}, errors.ConfigError,
     'config.batch_size: 12 does not divide over 8 devices'),
    ({'model.splits': ((5, 2),)}, errors.ConfigError,
     'config.model.splits: ((5, 2),): split index 5 is out of range'),
    ({'model.splits': ((1, 1),)}, errors.ConfigError,
     'a split needs at least 2 branches'),
    ({'method': 'magic'}, errors.ConfigError, "config.method: 'magic' is unknown"),
    ({'beta': 0.0}, errors.ConfigError, 'config.beta: 0.0 is outside (0, 1]'),
    ({'model.name': 'resnet9000'}, errors.ConfigError,
     "config.model.name: 'resnet9000' is an unknown network"),
    ({'label_noise': 1.0}, errors.ConfigError,
     'config.label_noise: 1.0 must be a fraction in [0, 1)'),
    ({'label_noise': -0.1}, errors.ConfigError,
     'config.label_noise: -0.1 must be a fraction in [0, 1)'),
    ({'temperature': 0.0}, errors.ConfigError,
     'config.temperature: 0.0 must be > 0'),
    ({'learning_rate': -0.1}, errors.ConfigError,
     'config.learning_rate: -0.1 must be positive and finite'),
    ({'learning_rate': math.inf}, errors.ConfigError,
     'config.learning_rate: inf is not a finite number'),
    ({'weight_decay': -1e-4}, errors.ConfigError,
     'config.weight_decay: -0.0001 must be >= 0'),
    ({'batch_size': 0}, errors.ConfigError, 'config.batch_size: 0 must be positive'),
    ({'batch_size': 128}, errors.ConfigError,
     'config.batch_size: 128 is larger than the 96 training examples'),
    ({'num_train_steps': -1, 'num_epochs': 0.0}, errors.ConfigError,
     'config.num_epochs: set num_epochs > 0 or num_train_steps > 0'),
    ({'method': 'label_smoothing', 'label_smoothing': 0.0}, errors.ConfigError,
     "config.label_smoothing: method 'label_smoothing' needs an epsilon > 0"),
    ({'method': 'alternating'}, errors.ConfigError,
     "config.model.splits: method 'alternating' (Deep Mutual Learning) trains "
     'separate networks: use splits ((0, H),)'),
    ({'method': 'distillation'}, errors.ConfigError,
     "config.model.splits: method 'distillation' trains one student"),
    ({'model.splits': ((1, 2), (1, 2))}, errors.ConfigError,
     'split indices must be strictly increasing'),
    ({'model.rescale': 'sometimes'}, errors.ConfigError,
     "config.model.rescale: 'sometimes' is not one of"),
    ({'model.branch_impl': 'threads'}, errors.ConfigError,
     "config.model.branch_impl: 'threads' is not one of"),
    ({'model.dtype': 'float7'}, errors.ConfigError,
     "config.model.dtype: 'float7' is not a dtype"),
    ({'lr_schedule': 'linear'}, errors.ConfigError,
     "config.lr_schedule: 'linear' is not one of step, cosine, constant"),
    ({'optimizer': 'adam'}, errors.ConfigError,
     "config.optimizer: 'adam': only 'sgd' is supported"),
    ({'dataset': 'mnist'}, errors.ConfigError, "config.dataset: 'mnist' is unknown"),
    ({'checkpoint_every_steps': 0}, errors.ConfigError,
     'config.checkpoint_every_steps: 0 must be >= 1'),
    ({'keep_checkpoints': 0}, errors.ConfigError,
     'config.keep_checkpoints: 0 must be >= 1'),
    # Numbers that are not finite or out of range, before any work.
    ({'weight_decay': math.nan}, errors.ConfigError,
     'config.weight_decay: nan is not a finite number'),
    ({'temperature': math.inf}, errors.ConfigError,
     'config.temperature: inf is not a finite number'),
    ({'num_epochs': math.nan, 'num_train_steps': -1}, errors.ConfigError,
     'config.num_epochs: nan is not a finite number'),
    ({'lr_decay_epochs': (1.0, math.inf)}, errors.ConfigError,
     'config.lr_decay_epochs: (1.0, inf) is not a finite number'),
    ({'momentum': -0.5}, errors.ConfigError,
     'config.momentum: -0.5 must be in [0, 1)'),
    ({'momentum': 1.0}, errors.ConfigError, 'config.momentum: 1.0 must be in [0, 1)'),
    ({'lr_scaling_batch': -256}, errors.ConfigError,
     'config.lr_scaling_batch: -256 must be >= 0'),
    ({'learning_rate': 1e308, 'lr_scaling_batch': 1}, errors.ConfigError,
     'config.learning_rate: 1e+308 * batch_size / lr_scaling_batch = inf must '
     'be positive and finite'),
    ({'lr_decay_factor': -0.1}, errors.ConfigError,
     'config.lr_decay_factor: -0.1 must be > 0'),
    ({'seed': 2**64}, errors.ConfigError,
     'config.seed: 18446744073709551616 must be an integer in [0, 2**63)'),
    ({'noise_seed': -1}, errors.ConfigError,
     'config.noise_seed: -1 must be an integer in [0, 2**63)'),
    ({'model.kwargs': {'width': 0}}, errors.ConfigError,
     'config.model.kwargs.width: 0 must be >= 1'),
    ({'model.dtype': 'int32'}, errors.ConfigError,
     "config.model.dtype: 'int32' is not a floating-point dtype"),
    ({'eval_batch_size': 0}, errors.ConfigError,
     'config.eval_batch_size: 0 must be positive'),
    ({'label_smoothing': math.nan}, errors.ConfigError,
     'config.label_smoothing: nan is not a finite number'),
    ({'label_smoothing': 1.0}, errors.ConfigError,
     'config.label_smoothing: label smoothing epsilon=1.0 must be in [0, 1)'),
    ({'train_subset': 1000}, errors.DatasetError,
     'train_subset=1000 but the training set has 96 examples'),
    # In range, but meaningless together.
    ({'augment_pad': 100000}, errors.ConfigError,
     'config.augment_pad: 100000 is more than half the 12x12 images (at most '
     '6): the random crops would be mostly black padding'),
    ({'model.kwargs': {'width': 16}}, errors.ConfigError,
     'config.model.kwargs.width: 16, but network tiny_resnet is defined with '
     'width=4 (cifar_resnet8 is the same network with width free): pass '
     '--config.model.kwargs.width=4'),
    ({'model.kwargs': {'growth_rate': 12}}, errors.ConfigError,
     "config.model.kwargs.growth_rate: network tiny_resnet has no "
     "hyper-parameter 'growth_rate'; its own are: none"),
    ({'model.name': 'cifar_resnet8', 'model.kwargs': {'depth': 20}},
     errors.ConfigError, "config.model.kwargs.depth: network cifar_resnet8 has "
     "no hyper-parameter 'depth'; its own are: width"),
    ({'model.dtype': 'float8_e4m3fn'}, errors.ConfigError,
     "config.model.dtype: 'float8_e4m3fn' cannot be computed in; use one of "
     'float32, bfloat16, float16'),
    ({'model.dtype': 'float64'}, errors.ConfigError,
     "config.model.dtype: 'float64' cannot be computed in"),
    ({'train_subset': 1}, errors.ConfigError,
     'config.train_subset: 1 keeps 1 class(es) of 10 in its 1 training '
     'examples: a classifier needs examples of at least 2'),
    ({'warmup_epochs': 3.0}, errors.ConfigError,
     "config.warmup_epochs: 3.0 epochs are 18 steps of warm-up, not fewer than "
     "the run's 16 steps"),
    ({'temperature': 1e-40}, errors.ConfigError,
     'config.temperature: 1e-40 is outside [0.01, 100]'),
    ({'temperature': 1e30}, errors.ConfigError,
     'config.temperature: 1e+30 is outside [0.01, 100]'),
    ({'unlabeled_weight': 1e38}, errors.ConfigError,
     'config.unlabeled_weight: 1e+38 must be in [0, 1000]'),
    ({'max_divergent_steps': -1}, errors.ConfigError,
     'config.max_divergent_steps: -1 must be >= 0'),
    ({'labeled_per_class': 5, 'unlabeled_rampup_epochs': 100.0},
     errors.ConfigError, "config.unlabeled_rampup_epochs: 100.0 epochs are 600 "
     "steps of ramp-up, more than the run's 16 steps"),
]
BAD_DATA = [  # regular expressions
    ('truncated', r'train-images-idx3-ubyte.gz is truncated \(4508 data bytes '
     r'for shape \(32, 12, 12\)\): the file is corrupt, reinstall it'),
    ('magic', 'has magic number 2049, expected 2051'),
    ('shape', r'test images are \(10, 10, 1\) but training images are '
     r'\(12, 12, 1\)'),
    ('count', 'train files in .* disagree: 32 images but 31 labels'),
    ('not_gzip', 'cannot read IDX file .*train-images-idx3-ubyte.gz'),
    ('corrupt_deflate', r'cannot read IDX file .*train-images-idx3-ubyte.gz '
     r'\(Error -3 while decompressing data'),
    ('empty_test', 'fashion_mnist_local: the test set has no examples'),
]


@pytest.mark.parametrize('overrides,error,message', BAD_CONFIGS,
                         ids=[','.join(c[0]) for c in BAD_CONFIGS])
def test_bad_config_value_is_one_clear_line(data_dir, tmp_path, overrides,
                                            error, message):
  config = _config(data_dir, **overrides)
  with pytest.raises(error) as e:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert message in str(e.value) and '\n' not in str(e.value), str(e.value)


@pytest.mark.parametrize('kind,message', BAD_DATA, ids=[k for k, _ in BAD_DATA])
def test_bad_data_file_is_one_clear_line(tmp_path, kind, message):
  _write_bad_data(tmp_path / 'data', kind)
  config = _config(tmp_path / 'data')
  with pytest.raises(errors.DatasetError, match=message) as e:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert '\n' not in str(e.value)


def test_missing_data_dir_is_one_clear_line(tmp_path):
  config = _config(tmp_path / 'nodata')
  with pytest.raises(errors.DatasetError, match='Fashion-MNIST IDX files not '
                     r'found in .*nodata \(no such directory\)') as e:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert '\n' not in str(e.value) and not os.path.exists(tmp_path / 'run')


def test_bad_workdir_is_one_clear_line(data_dir, tmp_path):
  (tmp_path / 'file').write_text('')
  with pytest.raises(errors.WorkdirError, match='exists and is not a directory'):
    train.train_and_evaluate(_config(data_dir), str(tmp_path / 'file'))
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'config.json').write_text('{"seed": 0, ')
  with pytest.raises(errors.WorkdirError, match='config.json is not valid JSON'):
    train.train_and_evaluate(_config(data_dir), str(tmp_path / 'run'))


DAMAGED = [  # (what to damage, a regular expression of the one-line error)
    ('results.json', 'garbage', r'results.json is not valid JSON \(results.json '
     r'of a finished run\): remove it \(and export/\)'),
    ('results.json', '{"steps": 4}', 'results.json has no head_1_test_error'),
    ('results.json', 'dir', 'results.json is a directory, not a file'),
    ('config.json', 'dir', 'config.json is a directory, not a file'),
    ('config.json', '[1, 2]', 'config.json is not a config record'),
    ('metrics.jsonl', 'dir', r"metrics.jsonl \(the run's metric log\) is not a "
     'file: move it away'),
    ('checkpoints', 'file', 'checkpoints is a file, not the checkpoint folder: '
     'move it away'),
]


@pytest.mark.parametrize('name,damage,message', DAMAGED,
                         ids=[f'{n}-{d[:7]}' for n, d, _ in DAMAGED])
def test_damaged_workdir_file_is_one_clear_line(data_dir, tmp_path, name,
                                                damage, message):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  path = workdir / name
  if damage == 'dir':
    path.mkdir()
  elif damage == 'file':
    path.write_text('')
  else:
    path.write_text(damage)
  with pytest.raises(errors.WorkdirError, match=message) as e:
    train.train_and_evaluate(_config(data_dir, num_train_steps=2), str(workdir))
  assert '\n' not in str(e.value) and str(path) in str(e.value), str(e.value)


def test_workdir_json_is_strict(tmp_path):
  """config.json, run_info.json, results.json: never NaN or Infinity."""
  path = tmp_path / 'config.json'
  with pytest.raises(ValueError, match='not JSON compliant'):
    fs.write_json_atomic(str(path), {'lr': math.nan})
  assert os.listdir(tmp_path) == []  # nothing, not even a temporary file
  fs.write_json_atomic(str(path), {'lr': 0.1})
  assert json.loads(path.read_text()) == {'lr': 0.1}


def test_damaged_metric_lines_are_dropped_on_resume(data_dir, tmp_path):
  workdir = tmp_path / 'run'
  config = _config(data_dir, num_train_steps=4, halt_after_steps=2)
  assert train.train_and_evaluate(config, str(workdir)) is None
  with open(workdir / 'metrics.jsonl', 'ab') as f:
    f.write(b'\xff\xfe{"step": 3, "kind": "tr')  # a damaged, cut-short line
  results = train.train_and_evaluate(config, str(workdir))
  assert results['steps'] == 4
  assert [r['step'] for r in _train_records(workdir)] == [1, 2, 3, 4]


def test_full_disk_is_one_line_and_the_rerun_resumes(data_dir, tmp_path,
                                                     monkeypatch):
  workdir = tmp_path / 'run'
  config = _config(data_dir, num_train_steps=4, label_noise=0.0)
  write = logging_utils.MetricWriter.write

  def full_at_step_3(self, step, scalars, kind='train'):
    if step == 3:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write(self, step, scalars, kind)
  monkeypatch.setattr(logging_utils.MetricWriter, 'write', full_at_step_3)
  with pytest.raises(errors.WorkdirError) as e:
    train.train_and_evaluate(config, str(workdir))
  message = str(e.value)
  assert message.startswith(f'no space left on the device of {workdir} '
                            '(No space left on device): free some space'), message
  assert '\n' not in message and not (workdir / 'results.json').exists()
  monkeypatch.undo()
  with fs.workdir_lock(str(workdir)):  # released
    pass
  assert train.train_and_evaluate(config, str(workdir))['steps'] == 4
  assert [r['step'] for r in _train_records(workdir)] == [1, 2, 3, 4]


def test_full_disk_in_a_checkpoint_save_is_one_line(data_dir, tmp_path,
                                                   monkeypatch):
  """Orbax wraps the OSError of a failed write: the cause is still found."""
  workdir = tmp_path / 'run'
  target = str(workdir / 'checkpoints' / '2')

  def save(self, step, *args, **kwargs):
    try:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target)
    except OSError as e:
      raise RuntimeError(f'save of step {step} failed') from e
  monkeypatch.setattr(ocp.CheckpointManager, 'save', save)
  with pytest.raises(errors.WorkdirError,
                     match=f'no space left on the device of {workdir} writing '
                     f'{target} \\(No space left on device\\)') as e:
    train.train_and_evaluate(_config(data_dir, num_train_steps=4), str(workdir))
  assert '\n' not in str(e.value)


@pytest.mark.filterwarnings('ignore:overflow encountered in cast')
@pytest.mark.parametrize('lr,message,skipped', [
    # inf in float32: every update is skipped.
    (1e39, 'all 3 updates were skipped.*no results.json', [1.0] * 3),
    # Finite but huge parameters: kept, and the test loss overflows.
    (1e30, r'the final evaluation is not finite \(head_1/loss.*no '
     'results.json', None)])
def test_run_that_trained_nothing_finite_writes_no_results(
    data_dir, tmp_path, lr, message, skipped):
  # Fewer steps than max_nonfinite_streak: the streak check never fires.
  config = _config(data_dir, learning_rate=lr, label_noise=0.0,
                   num_train_steps=3, log_every_steps=1, max_nonfinite_streak=10)
  workdir = tmp_path / 'run'
  with pytest.raises(errors.NonFiniteError, match=message) as e:
    train.train_and_evaluate(config, str(workdir))
  assert '\n' not in str(e.value)
  if skipped:
    assert [r['nonfinite_skipped'] for r in _train_records(workdir)] == skipped
  assert not (workdir / 'results.json').exists()
  assert not (workdir / 'export').exists()


def _bad_config_files(tmp_path, data_dir):
  (tmp_path / 'syntax.py').write_text('def get_config(:\n  pass\n')
  (tmp_path / 'raises.py').write_text(
      'def get_config():\n  raise ValueError("no such preset")\n')
  (tmp_path / 'none.py').write_text('def get_config():\n  return None\n')
  return _write_config(tmp_path / 'ok.py', data_dir)


W = '--workdir={tmp}/run'
CLI_CASES = [
    (['--config={tmp}/missing.py', W],
     'config file {tmp}/missing.py does not exist'),
    (['--config={tmp}/syntax.py', W],
     'config file {tmp}/syntax.py line 1: SyntaxError: invalid syntax'),
    (['--config={tmp}/raises.py', W], 'ValueError: no such preset'),
    (['--config={tmp}/none.py', W], 'none.py: get_config() returned None; it '
     'must return an ml_collections.ConfigDict'),
    (['--config={tmp}/ok.py', W, '--config.batch_size=abc'],
     'flag --config.batch_size=abc: invalid literal for int()'),
    (['--config={tmp}/ok.py', W, '--config.model.splits=((1, 2)'],
     'flag --config.model.splits=((1, 2)'),
    (['--config={tmp}/ok.py', W, 'extra'], 'unexpected arguments: extra'),
    (['--config={tmp}/ok.py'], 'flag --workdir=None'),
    (['--config={tmp}/ok.py', '--workdir='], '--workdir is empty'),
    # Repeated overrides: the last one wins, never a merge (a merge would be
    # ((1, 2), (1, 2)) and fail on the splits; the last is valid and the run
    # fails on the next check).
    (['--config={tmp}/ok.py', W, '--config.model.splits=((0, 4),)',
      '--config.model.splits=((1, 2),)', '--config.eval_batch_size=12',
      '--config.eval_batch_size=4'],
     'config.eval_batch_size: 4 does not divide over 8 devices'),
    (['--config={tmp}/ok.py', W, '--config.seed', '1', '--config.seed=2'],
     '--config.seed is given 2 times; give it once, as --config.seed=VALUE'),
    # A misspelt key is named as the flag; --config twice.
    (['--config={tmp}/ok.py', W, '--config.batchsize=32'],
     "--config.batchsize: the config of {tmp}/ok.py has no key 'batchsize' "
     "(did you mean 'batch_size'?)"),
    (['--config={tmp}/ok.py', '--config={tmp}/raises.py', W],
     '--config is given 2 times; give one config file'),
    # A URL scheme the workdir cannot be on (no local folder 'foo:').
    (['--config={tmp}/ok.py', '--workdir=foo://bucket/run'],
     'workdir foo://bucket/run: the foo:// scheme is not supported'),
    # TensorFlow's C++ start-up lines must not come before the error.
    (['--config={tmp}/ok.py', W, '--config.dataset=cifar10',
      '--config.data_dir={tmp}/nodata'],
     'tfds dataset cifar10 not found in {tmp}/nodata'),
]


@pytest.mark.parametrize('args,message', CLI_CASES,
                         ids=['missing', 'syntax', 'raises', 'none', 'type',
                              'literal', 'positional', 'no_workdir',
                              'empty_workdir', 'repeated', 'repeated_spaced',
                              'typo', 'config_twice', 'scheme', 'tf_quiet'])
def test_cli_input_mistake_is_one_line(data_dir, tmp_path, args, message):
  _bad_config_files(tmp_path, data_dir)
  args = [a.format(tmp=tmp_path) for a in args]
  out = _run(args, timeout=120)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith('error: '), out.stderr
  assert message.format(tmp=tmp_path) in lines[0], lines[0]
  assert not os.path.exists(tmp_path / 'run')
  assert not glob.glob(os.path.join(REPO, '*:')), 'a folder named after a scheme'


# ----------------------------------------------------------------------------
# 7. Several processes.


@pytest.mark.slow
def test_two_processes_match_one_and_sigterm_to_one_stops_both(data_dir,
                                                                tmp_path):
  """jax.distributed on localhost (gloo collectives), pre-empted at any step.

  2 processes x 4 CPU devices train as one process with 8 devices does (the
  losses, step by step) and evaluate as it does (the same checkpoint). A
  SIGTERM to process 1 between log steps: both save the step they agree on
  (JAX's pre-emption sync manager) and exit 0; the rerun resumes there and
  ends bit-identical to an uninterrupted 2-process run.
  """
  steps_total = 120  # one log step, the last; the signal comes long before
  overrides = dict(num_train_steps=steps_total, log_every_steps=steps_total,
                   checkpoint_every_steps=steps_total, **{'model.splits': ()})
  cfg = _write_config(tmp_path / 'cfg.py', data_dir, **overrides)
  config = _config(data_dir, **overrides)
  args = [f'--config={cfg}']
  # The uninterrupted run trains meanwhile.
  full = _launch([*args, '--config.log_every_steps=1'], tmp_path / 'full',
                 tmp_path / 'log_full', devices=4)

  workdir = tmp_path / 'run'
  procs = _launch(args, workdir, tmp_path / 'log_run', devices=4)
  t0 = time.time()
  while not (workdir / 'run_info.json').exists():  # written once compiled
    assert all(p.poll() is None for p in procs), open(
        tmp_path / 'log_run_0').read()[-3000:]
    assert time.time() - t0 < 240
    time.sleep(0.01)
  time.sleep(0.5)
  procs[1].send_signal(signal.SIGTERM)
  logs = _wait_all(procs, tmp_path / 'log_run')
  stopped = [l for l in logs[0].splitlines() if l.startswith('pre-empted at')]
  assert len(stopped) == 1, logs[0][-3000:]
  step = int(stopped[0].split()[3].rstrip(';'))
  assert 0 < step < steps_total, stopped  # not a log step, nor the last
  with checkpointing.checkpoint_manager(str(workdir), config) as manager:
    assert manager.all_steps() == [step]  # saved by both, at that step
  assert not (workdir / 'results.json').exists()

  rerun = _launch(args, workdir, tmp_path / 'log_rerun', devices=4)
  # The one-process reference (this process has 8 CPU devices) meanwhile.
  train.train_and_evaluate(
      _config(data_dir, **{**overrides, 'log_every_steps': 1,
                           'halt_after_steps': 6}), str(tmp_path / 'one'))
  logs = _wait_all(rerun, tmp_path / 'log_rerun')
  assert f'resuming from the checkpoint at step {step}' in logs[0]
  _wait_all(full, tmp_path / 'log_full')
  with open(workdir / 'run_info.json') as f:
    info = json.load(f)
  assert info['processes'] == 2 and info['devices'] == 8
  _assert_trees_equal(_state(workdir, config), _state(tmp_path / 'full', config))
  with open(workdir / 'results.json') as f1, open(
      tmp_path / 'full' / 'results.json') as f2:
    assert json.load(f1)['head_test_errors'] == json.load(f2)['head_test_errors']
  assert os.path.exists(workdir / 'export' / 'head_1')
  # One process with 8 devices: the same losses, step by step, up to the
  # order of the sums (the uninterrupted run logs every step for this).
  a, b = _losses(tmp_path / 'one'), _losses(tmp_path / 'full')
  assert sorted(a) == list(range(1, 7))
  np.testing.assert_allclose([b[s] for s in sorted(a)], [a[s] for s in sorted(a)],
                             rtol=1e-6)
  # ... and evaluates the 2-process run's final checkpoint as the 2 processes
  # did (the run resumes there on 1 process and only evaluates).
  shutil.copytree(tmp_path / 'full', tmp_path / 'eval',
                  ignore=shutil.ignore_patterns('results.json', 'export'))
  single = train.train_and_evaluate(config, str(tmp_path / 'eval'))
  with open(tmp_path / 'full' / 'results.json') as f:
    multi = json.load(f)
  assert single['processes'] == 1 and multi['processes'] == 2
  assert single['head_test_errors'] == multi['head_test_errors']
  np.testing.assert_allclose(single['head_1_test_loss'], multi['head_1_test_loss'],
                             rtol=1e-6)


# ----------------------------------------------------------------------------
# 8. Determinism.


def test_same_seed_gives_bit_identical_runs(data_dir, baseline, tmp_path):
  base_dir, base_results, base_state = baseline
  config = _config(data_dir)
  results = train.train_and_evaluate(config, str(tmp_path))
  _assert_trees_equal(_state(tmp_path, config), base_state)
  assert _losses(tmp_path) == _losses(base_dir)
  assert results['head_test_errors'] == base_results['head_test_errors']
