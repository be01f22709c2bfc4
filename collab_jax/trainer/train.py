"""The training loop: `train_and_evaluate(config, workdir)`.

It builds each thing once, in order (`build`): the config checks, the data
source, the model, the method, the learning-rate schedule and the optimizer,
all before the workdir is touched; then the teacher runs a method needs,
the workdir and its lock, the state restored from the last checkpoint, the
data stream from the restored step and the compiled steps; then it trains,
logs, checkpoints, evaluates and exports head 1.

A run that failed is not a success: non-finite steps are skipped and
counted, and a run stops (exit 2, no results.json) when they last, or when
it diverges while staying finite. The divergence rule: a step diverges when
head 1's training cross-entropy is above ten times that of a uniform guess
(`steps.DIVERGENCE_FACTOR * log(C)`); the run stops when whole log windows of
diverging steps add up to `max_divergent_steps` in a row, and a finished run
whose head 1 has a test cross-entropy above that threshold writes no
results.
"""

import dataclasses
import math
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from collab_jax import errors
from collab_jax import heads as heads_lib
from collab_jax.data import source as data_lib
from collab_jax.data import streams
from collab_jax.trainer import checkpointing
from collab_jax.trainer import config_lib
from collab_jax.trainer import fs
from collab_jax.trainer import logging_utils
from collab_jax.trainer import methods
from collab_jax.trainer import metrics
from collab_jax.trainer import parallel
from collab_jax.trainer import signals
from collab_jax.trainer import steps


@dataclasses.dataclass
class Components:
  """Everything a run computes with, built once from its config (`build`)."""
  data: data_lib.DataSource
  model: heads_lib.HeadTree
  method: methods.Method
  lr_fn: Callable[[int], Any]
  tx: Any
  num_steps: int
  unlabeled_weight_fn: Callable[[Any], Any]


def build(config: ml_collections.ConfigDict) -> Components:
  """Checks `config` and builds every component of its run, touching no workdir.

  Each value is checked where it is used; a mistake raises ConfigError or
  DatasetError (one line naming the key or the file, and the fix).
  """
  config_lib.check(config)
  data = data_lib.create_data_source(config)
  if config.eval_train_clean and data.train_eval_batches is None:
    raise errors.ConfigError(
        f'config.eval_train_clean: {config.dataset} is streamed; the training '
        'set can be evaluated for in-memory datasets only.')
  model = steps.create_model(config, data.num_classes)
  method = methods.create(config, model.num_heads)
  if config.labeled_per_class and not method.semi_supervised:
    raise errors.ConfigError(
        f'config.method: {method.name!r} does not take unlabelled examples; '
        'with labeled_per_class > 0 use one of '
        f'{", ".join(n for n, m in methods.REGISTRY.items() if m.semi_supervised)}.')
  lr_fn = steps.create_learning_rate_fn(config, data.steps_per_epoch)
  tx = steps.create_optimizer(config, lr_fn, method)
  num_steps = steps.total_steps(config, data.steps_per_epoch)
  warmup = int(round(config.warmup_epochs * data.steps_per_epoch))
  if warmup and warmup >= num_steps:
    raise errors.ConfigError(
        f'config.warmup_epochs: {config.warmup_epochs} epochs are {warmup} '
        f'steps of warm-up, not fewer than the run\'s {num_steps} steps: the '
        'learning rate would never reach its peak; shorten the warm-up.')
  ramp = config.unlabeled_rampup_epochs * data.steps_per_epoch
  if config.labeled_per_class and ramp > num_steps:
    raise errors.ConfigError(
        f'config.unlabeled_rampup_epochs: {config.unlabeled_rampup_epochs} '
        f'epochs are {ramp:g} steps of ramp-up, more than the run\'s '
        f'{num_steps} steps: the unlabelled weight would never reach '
        f'unlabeled_weight={config.unlabeled_weight}; shorten the ramp-up.')
  return Components(
      data=data, model=model, method=method, lr_fn=lr_fn, tx=tx,
      num_steps=num_steps,
      unlabeled_weight_fn=methods.unlabeled_weight_fn(config, data.steps_per_epoch))


def load_run_variables(config: ml_collections.ConfigDict, workdir):
  """The model and variables of the latest checkpoint of the run of `config` in `workdir`."""
  built = build(config)
  return steps.load_run_variables(workdir, config, built.data.num_classes,
                                  built.data.image_shape, method=built.method)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, *,
                       break_lock: bool = False):
  """Trains the head tree of `config` in `workdir`, resuming if possible.

  A method with teachers (distillation) first trains, resumes or finds
  finished each teacher run in its own workdir.

  Args:
    config: the run config (see collab_jax/trainer/recipes.py).
    workdir: directory for checkpoints, logs, results and the exported head:
      a local path or gs://BUCKET/PATH (`fs`).
    break_lock: take over the lock object that a trainer killed without
      warning left in a workdir on an object store (`fs.workdir_lock`).

  Returns:
    The results dict also written to `workdir/results.json` (head 1's test
    error is the headline), or None when the run (or a teacher run) stopped
    early (signal or `halt_after_steps`) with a checkpoint to resume from.
  """
  workdir = fs.path(workdir)
  parallel.avoid_multiprocess_cpu_cache()
  built = build(config)
  teacher_runs = built.method.teacher_runs(config, workdir)
  for k, (teacher, teacher_dir) in enumerate(teacher_runs, 1):
    logging_utils.console(f'teacher run {k}/{len(teacher_runs)} (seed '
                          f'{teacher.seed}) in {teacher_dir}')
    if train_and_evaluate(teacher, teacher_dir, break_lock=break_lock) is None:
      return None
  if workdir.exists() and not workdir.is_dir():
    raise errors.WorkdirError(f'workdir {workdir} exists and is not a directory.')
  fingerprint = built.data.fingerprint
  # Read-only checks first, so that a refused or finished workdir is not
  # touched (not even its lock file) ...
  checkpointing.check_workdir(config, workdir, fingerprint)
  results = checkpointing.finished_results(workdir)
  if results is not None:
    return results
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise errors.WorkdirError(
        f'cannot create workdir {workdir}: {e.strerror}.') from None
  with fs.workdir_lock(workdir, break_lock=break_lock):
    # ... and again under the lock: a trainer that held it until now may
    # have written config.json or finished the run meanwhile.
    config_changes = checkpointing.check_workdir(config, workdir, fingerprint)
    results = checkpointing.finished_results(workdir)
    if results is not None:
      return results
    try:
      return _train(config, workdir, built, config_changes)
    except Exception as e:  # pylint: disable=broad-except
      full = checkpointing.disk_full(e)
      if full is None:
        raise
      where = f' writing {full.filename}' if full.filename else ''
      raise errors.WorkdirError(
          f'no space left on the device of {workdir}{where} '
          f'({os.strerror(full.errno)}): free some space and rerun the same '
          'command; it resumes from the last complete checkpoint.') from None


def _train(config, workdir, built, config_changes):
  """train_and_evaluate past its checks, with the workdir lock held."""
  is_main = jax.process_index() == 0
  placement = parallel.data_parallel()
  data, model, method, tx = built.data, built.model, built.method, built.tx
  per_epoch, num_steps = data.steps_per_epoch, built.num_steps
  manager = checkpointing.checkpoint_manager(workdir, config, cleanup=True)
  try:
    checkpointing.check_steps(manager, workdir, num_steps)
    checkpointing.check_export(workdir, num_steps)
  except errors.WorkdirError:
    manager.close()
    raise
  teacher_vars, teacher_errors = method.load_teachers(
      config, workdir, data, placement.replicated)
  teacher_vars = jax.device_put(teacher_vars, placement.replicated)

  def init():
    return steps.create_train_state(streams.init_key(config.seed), model,
                                    data.image_shape, tx, method.init_opt_state,
                                    sharding=placement.replicated)
  try:
    state, restored_step = checkpointing.restore_latest(
        manager, jax.eval_shape(init), sharding=placement.replicated,
        corrupt_dir=workdir / 'corrupt_checkpoints')
  except errors.WorkdirError:
    manager.close()
    raise
  init_s = None
  if state is None:
    t_init = time.time()
    state = jax.block_until_ready(init())
    init_s = time.time() - t_init  # compiling and running the initialisation
    if is_main:
      checkpointing.record_config(workdir, config, data.fingerprint)
  else:
    logging_utils.console(f'resuming from the checkpoint at step {restored_step}')
    if is_main:
      if config_changes:  # allowed: record what changed, and when
        checkpointing.record_config(workdir, config, data.fingerprint,
                                    restored_step, config_changes)
      checkpointing.ensure_data_record(workdir, data.fingerprint)
  state = jax.device_put(state, placement.replicated)
  start_step = int(state.step)
  if is_main:
    checkpointing.forget_logs_after(workdir, start_step, num_steps)
  batches = data.train_iter(start_step)  # once, from the restored step

  train_step = steps.make_train_step(
      placement, model=model, tx=tx, method=method, preprocess=data.preprocess,
      seed=config.seed, unlabeled_weight_fn=built.unlabeled_weight_fn)
  eval_step = steps.make_eval_step(placement, model=model, method=method,
                                   preprocess=data.preprocess)

  batch = parallel.to_global(next(batches), placement.batch)
  t_compile = time.time()
  compiled = train_step.lower(state, batch, teacher_vars).compile()
  compiled_eval = eval_step.lower(
      state, steps.eval_batch_spec(batch, data.eval_batch_size, placement),
      teacher_vars).compile()
  compile_s = time.time() - t_compile
  steps.check_memory(compiled, 'batch_size', config.batch_size, 'training')
  steps.check_memory(compiled_eval, 'eval_batch_size', data.eval_batch_size,
                     'evaluation')

  def evaluate(state, batches=data.eval_batches):
    acc = None
    for local in batches():
      batch = parallel.to_global(local, placement.batch)
      acc = metrics.accumulate(acc, compiled_eval(state, batch, teacher_vars))
    return metrics.reduce(acc)

  writer = logging_utils.MetricWriter(workdir, enabled=is_main)
  run_info = {'devices': jax.device_count(), 'processes': jax.process_count(),
              'platform': jax.devices()[0].platform,
              'device_kind': jax.devices()[0].device_kind,
              'model_dtype': steps.resolve_auto('dtype', config.model.dtype,
                                                placement.platform),
              'branch_impl': model.branch_impl,
              'global_batch': config.batch_size, 'heads': model.num_heads,
              'steps_per_epoch': per_epoch, 'num_train_steps': num_steps,
              'train_examples': data.num_train,
              'data_fingerprint': data.fingerprint,
              'compile_s': compile_s,
              'init_s': init_s,
              **logging_utils.compiled_stats(compiled),
              **logging_utils.provenance()}
  if is_main:
    fs.write_json_atomic(workdir / 'run_info.json', run_info)
  logging_utils.console(
      f'collab_jax: {config.model.name} splits={tuple(config.model.splits)} '
      f'({model.num_heads} heads), method={method.name}, '
      f'{jax.device_count()} {run_info["platform"]} device(s) in '
      f'{jax.process_count()} process(es), global batch {config.batch_size}, '
      f'{num_steps} steps ({per_epoch}/epoch), start at step {start_step}')

  progress = logging_utils.Progress(num_steps, config.batch_size, start_step,
                                    enabled=is_main and config.progress)

  def fail(message):
    manager.wait_until_finished()
    progress.close()
    writer.close()
    raise errors.NonFiniteError(message)

  acc, stop_reason, step_times = None, None, []
  t_last, s_last = time.time(), start_step
  t_train = time.time()
  eval_every = (max(1, int(round(config.eval_every_epochs * per_epoch)))
                if config.eval_every_epochs > 0 else None)
  diverging_steps = 0  # whole log windows of diverging steps, in a row
  with signals.StopSignal(start_step) as stop, manager:
    step = start_step
    while step < num_steps:
      state, step_metrics = compiled(state, batch, teacher_vars)
      acc = metrics.accumulate(acc, step_metrics)
      step += 1
      if step < num_steps:  # overlaps the running step
        batch = parallel.to_global(next(batches), placement.batch)
      is_log = step % config.log_every_steps == 0 or step == num_steps
      if is_log:
        summary = metrics.reduce(acc)
        acc = None
        now = time.time()
        step_time = (now - t_last) / max(step - s_last, 1)
        step_times.append(step_time)
        window = step - s_last
        t_last, s_last = now, step
        summary.update(lr=float(built.lr_fn(step - 1)), step_time_s=step_time,
                       images_per_s=config.batch_size / step_time,
                       epoch=step / per_epoch)
        writer.write(step, summary, 'train')
        progress.update(step, loss=summary['loss'], err1=summary[metrics.head(0, 'error')])
        streak = int(state.nonfinite_streak)
        if streak >= config.max_nonfinite_streak:
          fail(f'{streak} consecutive steps had a non-finite loss or gradient '
               f'(up to step {step}); their updates were skipped and the last '
               f'good checkpoint is intact. {_nonfinite_fix(config)}')
        diverging_steps = (diverging_steps + window
                           if summary[metrics.DIVERGING] == 1.0 else 0)
        if 0 < config.max_divergent_steps <= diverging_steps:
          fail(f'training diverged: head 1\'s training cross-entropy was above '
               f'{_divergence_threshold(data.num_classes):.3g} nats (ten times '
               f'a uniform guess over {data.num_classes} classes) in every '
               f'step of the last {diverging_steps} (up to step {step}); no '
               'results.json was written. Lower --config.learning_rate and '
               'train in a new --workdir (the checkpoints here may hold the '
               'diverged state).')
      if eval_every and step % eval_every == 0 and step < num_steps:
        writer.write(step, evaluate(state), 'eval')
        if config.eval_train_clean:
          writer.write(step, evaluate(state, data.train_eval_batches), 'eval_train')
      # Every checkpoint_every_steps steps (the manager's policy), and the last.
      checkpointing.save(manager, step, state, force=step == num_steps)
      signalled = stop.stop_after(step, is_log)
      # Only at that very step: rerunning the same command resumes past it.
      halt = (config.halt_after_steps > 0 and step == config.halt_after_steps
              and step < num_steps)
      if signalled or halt:
        stop_reason = (f'pre-empted at step {step} ({stop.reason()})'
                       if signalled else f'stopped at step {step} '
                       f'(halt_after_steps={config.halt_after_steps})')
        if manager.latest_step() != step:
          checkpointing.save(manager, step, state, force=True)
        break
    manager.wait_until_finished()
  progress.close()
  train_s = time.time() - t_train

  if stop_reason is not None:
    logging_utils.console(f'{stop_reason}; checkpoint saved. Rerun the same '
                          'command to resume.')
    writer.close()
    return None

  final = _final_evaluation(state, num_steps, evaluate, writer, config,
                            data.num_classes)
  heads = model.num_heads
  trained_to = int(state.step)
  results = {
      **metrics.results(final, heads, 'test'),
      'head_1_test_loss': final[metrics.head(0, 'loss')],
      'steps': trained_to,
      'epochs': trained_to / per_epoch,
      'nonfinite_skipped': int(state.nonfinite_total),
      'train_time_s_this_session': train_s,
      'median_step_time_s': float(np.median(step_times)) if step_times else None,
      'peak_memory_bytes': logging_utils.peak_memory_bytes(),
      **run_info,
  }
  if config.eval_train_clean:  # the fit: clean labels, no augmentation
    fit = evaluate(state, data.train_eval_batches)
    writer.write(num_steps, fit, 'eval_train')
    results.update(metrics.results(fit, heads, 'train_clean'))
  if teacher_errors is not None:
    results['teacher_test_errors'] = teacher_errors
    results['teacher_ensemble_test_error'] = final[f'{metrics.TEACHERS}/error']
  # The export and results.json name the step of the last checkpoint, which
  # the state is at.
  checkpointing.save_export(workdir, state, config.model.splits, trained_to)
  if is_main:
    fs.write_json_atomic(workdir / 'results.json', results)
  writer.write(num_steps, {'head_1_test_error': results['head_1_test_error']},
               'final')
  writer.close()
  logging_utils.console(
      f'done: head 1 test error {results["head_1_test_error"]:.2f}% (heads: '
      f'{", ".join(f"{e:.2f}" for e in results["head_test_errors"])}; '
      'ensemble of heads, for reference only: '
      f'{results["ensemble_test_error"]:.2f}%) after {num_steps} steps')
  return results


def _divergence_threshold(num_classes):
  return steps.DIVERGENCE_FACTOR * math.log(num_classes)


def _nonfinite_fix(config):
  """What to try after non-finite steps: the learning rate and the loss's scales."""
  scales = ', '.join(f'{k}={config[k]}' for k in ('temperature', 'unlabeled_weight'))
  return (f'Lower --config.learning_rate, or check the values that scale the '
          f'loss ({scales}) and the data; resume with '
          '--config.allow_config_change=True or start a new --workdir.')


def _final_evaluation(state, num_steps, evaluate, writer, config, num_classes):
  """The test metrics of a run that trained, or NonFiniteError.

  With fewer steps than `max_nonfinite_streak` every update can be skipped
  without the streak check firing; such a run is the initialisation, and its
  results must not be reported as trained. A run whose head 1 ends with a
  test cross-entropy above the divergence threshold diverged.
  """
  def fail(what, fix=None):
    writer.close()
    raise errors.NonFiniteError(
        f'{what}; no results.json was written. '
        f'{fix or _nonfinite_fix(config)}')
  if int(state.nonfinite_total) >= num_steps:
    fail(f'all {num_steps} updates were skipped for a non-finite loss or '
         'gradient, so nothing was trained')
  if not bool(steps.all_finite(state.params, state.batch_stats)):
    fail('the final parameters or BatchNorm statistics are not finite')
  final = evaluate(state)
  bad = sorted(k for k, v in final.items() if not math.isfinite(v))
  if bad:
    fail(f'the final evaluation is not finite ({", ".join(bad[:3])})')
  writer.write(num_steps, final, 'eval')
  loss, threshold = final[metrics.head(0, 'loss')], _divergence_threshold(num_classes)
  if loss > threshold:
    fail(f'training diverged: head 1\'s test cross-entropy is {loss:.3g} nats, '
         f'above {threshold:.3g} (ten times a uniform guess over {num_classes} '
         f'classes; its test error is {final[metrics.head(0, "error")]:.1f}%)',
         'Lower --config.learning_rate and train in a new --workdir.')
  return final
