"""Shared test helpers: small IDX datasets and tiny configs."""

import gzip
import os
import socket
import subprocess
import sys

import ml_collections
import numpy as np

from collab_jax.trainer import recipes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_idx(path, array, magic):
  """Writes `array` (uint8) as an IDX file, gzipped if `path` ends in .gz."""
  array = np.asarray(array, np.uint8)
  header = magic.to_bytes(4, 'big') + b''.join(
      int(d).to_bytes(4, 'big') for d in array.shape)
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(header + array.tobytes())


def fake_fashion_mnist(data_dir, *, num_train=100, num_test=20, gz=True,
                       shape=(6, 5), seed=0):
  """Writes a small Fashion-MNIST-like set of IDX files; returns the arrays.

  Each class has its own mean brightness, so a network can learn something.
  """
  rng = np.random.default_rng(seed)
  ext = '.gz' if gz else ''
  arrays = {}
  os.makedirs(data_dir, exist_ok=True)
  for split, n in (('train', num_train), ('t10k', num_test)):
    labels = np.arange(n) % 10
    noise = rng.integers(0, 120, (n,) + tuple(shape))
    images = np.clip(noise + 12 * labels[:, None, None], 0, 255).astype(np.uint8)
    write_idx(os.path.join(data_dir, f'{split}-images-idx3-ubyte{ext}'),
              images, 2051)
    write_idx(os.path.join(data_dir, f'{split}-labels-idx1-ubyte{ext}'),
              labels, 2049)
    arrays[split] = (images, labels)
  return arrays


def tiny_config(data_dir, **overrides):
  """A tiny 2-head run on the fake IDX data: a few seconds per step count."""
  c = recipes.base_config()
  c.data_dir = str(data_dir)
  c.model.name = 'tiny_resnet'
  c.model.kwargs = ml_collections.ConfigDict()
  c.model.splits = ((1, 2),)
  c.batch_size = 16
  c.eval_batch_size = 16
  c.num_train_steps = 6
  c.log_every_steps = 2
  c.checkpoint_every_steps = 3
  c.eval_every_epochs = 0.0
  c.lr_schedule = 'constant'
  c.learning_rate = 0.05
  c.progress = False
  for k, v in overrides.items():
    c.update_from_flattened_dict({k: v})
  return c


# ----------------------------------------------------------------------------
# The CLI in subprocesses, one or several (jax.distributed on localhost).


def env(devices=8, **extra):
  """The environment of a CLI subprocess with `devices` fake CPU devices."""
  out = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             **extra)
  if 'JAX_COORDINATOR_ADDRESS' in extra:
    # A multi-process CPU step loaded from the persistent compilation cache
    # (conftest's) deadlocks in its first collective on jaxlib 0.12.1: both
    # processes wait in the first device_get. Compile it afresh.
    out.pop('JAX_COMPILATION_CACHE_DIR', None)
  return out


_cli_env = env


def start_cli(args, log, env=None, module='collab_jax.main'):  # pylint: disable=redefined-outer-name
  """Starts `python -m module args` in the background, output to `log` (a path)."""
  out = open(log, 'w')
  return subprocess.Popen([sys.executable, '-m', module, *args],
                          stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                          env=env or _cli_env())


def free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def launch_two(args, workdir, log_prefix, devices):
  """The CLI as 2 processes of `devices` CPU devices each (jax.distributed)."""
  port = free_port()
  return [start_cli([*args, f'--workdir={workdir}'], f'{log_prefix}_{i}',
                    env=env(devices=devices,
                            JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
                            JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i)))
          for i in range(2)]


def wait_all(procs, log_prefix, timeout=300):
  """Waits for every process; asserts exit status 0; returns their logs."""
  try:
    rcs = [p.wait(timeout) for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    raise
  logs = [open(f'{log_prefix}_{i}').read() for i in range(len(procs))]
  for rc, log in zip(rcs, logs):
    assert rc == 0, log[-3000:]
  return logs
