"""What agreeing on a pre-emption stop at every step costs (README, Reliability).

  python experiments/preemption_cost.py --config=configs/default.py
  python experiments/preemption_cost.py --config=tiny

Runs itself as 2 processes of 1 CPU device each (jax.distributed on
localhost), builds the run's train step the trainer's way, and times
`--steps` steps of two loops in turn, `--rounds` times, in the same pair of
processes:

  log_steps   the loop before the change: the step without the divergence
              metric; the processes gather their stop flags on log steps
              only (`multihost_utils.process_allgather`).
  every_step  the loop now: the step with the divergence metric
              (`metrics.DIVERGING`); JAX's pre-emption sync point is asked
              after every step (`signals.StopSignal.stop_after`).

Both reduce the metrics on log steps, as the trainer does. Prints the median
seconds per step of each loop and their ratio. `tiny` is the tests' model
(`testutil.tiny_config`) on fake data.
"""

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, data_dir):
  if name == 'tiny':
    sys.path.insert(0, os.path.join(REPO, 'tests'))
    import testutil  # pylint: disable=g-import-not-at-top
    testutil.fake_fashion_mnist(data_dir, num_train=96, num_test=40,
                                shape=(12, 12))
    return testutil.tiny_config(data_dir, log_every_steps=50)
  spec = importlib.util.spec_from_file_location('config', name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _measure(args):
  """One of the 2 processes: both loops, `args.rounds` times each."""
  import jax  # pylint: disable=g-import-not-at-top
  env = os.environ
  jax.distributed.initialize(env['JAX_COORDINATOR_ADDRESS'],
                             int(env['JAX_NUM_PROCESSES']),
                             int(env['JAX_PROCESS_ID']))
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from collab_jax.trainer import metrics  # pylint: disable=g-import-not-at-top
  from collab_jax.trainer import parallel  # pylint: disable=g-import-not-at-top
  from collab_jax.trainer import steps  # pylint: disable=g-import-not-at-top
  from collab_jax.trainer import train  # pylint: disable=g-import-not-at-top
  from collab_jax.data import streams  # pylint: disable=g-import-not-at-top

  config = _config(args.config, args.data_dir)
  built = train.build(config)
  placement = parallel.data_parallel()
  log_every = config.log_every_steps

  def make_step(with_divergence):
    head_metrics = steps.head_metrics
    def without(*a, **k):
      out = head_metrics(*a, **k)
      out.pop(metrics.DIVERGING)
      return out
    fn = steps.head_metrics if with_divergence else without
    steps.head_metrics = fn
    try:
      step = steps.make_train_step(
          placement, model=built.model, tx=built.tx, method=built.method,
          preprocess=built.data.preprocess, seed=config.seed,
          unlabeled_weight_fn=built.unlabeled_weight_fn)
      state = jax.device_put(steps.create_train_state(
          streams.init_key(0), built.model, built.data.image_shape, built.tx,
          built.method.init_opt_state), placement.replicated)
      batch = parallel.to_global(next(built.data.train_iter(0)), placement.batch)
      return step.lower(state, batch, {}).compile(), state
    finally:
      steps.head_metrics = head_metrics

  batches = [parallel.to_global(b, placement.batch) for b, _ in zip(
      built.data.train_iter(0), range(args.steps))]

  def log_steps(step):
    if step % log_every == 0:
      multihost_utils.process_allgather(np.int32(0))

  session = [0]
  def every_step(step):
    session[0] += 1
    multihost_utils.reached_preemption_sync_point(session[0])

  loops = {'log_steps': (make_step(False), log_steps),
           'every_step': (make_step(True), every_step)}
  times = {name: [] for name in loops}
  for _ in range(args.rounds + 1):  # the first round warms up
    for name, ((compiled, state), check) in loops.items():
      state = jax.tree.map(lambda x: x.copy(), state)
      acc = None
      t0 = time.perf_counter()
      for i, batch in enumerate(batches, 1):
        state, out = compiled(state, batch, {})
        acc = metrics.accumulate(acc, out)
        if i % log_every == 0:
          metrics.reduce(acc)
          acc = None
        check(i)
      jax.block_until_ready(state)
      times[name].append((time.perf_counter() - t0) / len(batches))
  if jax.process_index() == 0:
    med = {k: float(np.median(v[1:])) for k, v in times.items()}
    print(f'{args.config}: {args.steps} steps, {args.rounds} rounds, 2 '
          'processes x 1 CPU device')
    for name, value in med.items():
      print(f'  {name:10s} {value * 1e3:8.2f} ms/step  (rounds: '
            f'{", ".join(f"{t * 1e3:.2f}" for t in times[name][1:])})')
    print(f'  ratio every_step / log_steps: '
          f'{med["every_step"] / med["log_steps"]:.3f}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='tiny')
  parser.add_argument('--steps', type=int, default=100)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--data_dir', default='')
  args = parser.parse_args()
  if os.environ.get('JAX_PROCESS_ID') is not None:
    return _measure(args)
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  with tempfile.TemporaryDirectory() as data_dir:
    env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
               JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
               JAX_NUM_PROCESSES='2', PYTHONPATH=REPO)
    env.pop('JAX_COMPILATION_CACHE_DIR', None)  # see parallel.py
    procs = [subprocess.Popen(
        [sys.executable, __file__, *sys.argv[1:], f'--data_dir={data_dir}'],
        env=dict(env, JAX_PROCESS_ID=str(i)), cwd=REPO) for i in range(2)]
    return max(p.wait() for p in procs)


if __name__ == '__main__':
  sys.exit(main())
