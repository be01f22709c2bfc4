"""Run logs: JSON lines, TensorBoard event files, the console, run facts."""

import functools
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from collab_jax.trainer import fs


def console(message):
  """A line for the person running the trainer: stdout, process 0 only."""
  if jax.process_index() == 0:
    print(message, flush=True)


class MetricWriter:
  """Writes scalars to `metrics.jsonl` and TensorBoard events in `workdir`.

  Only process 0 writes; the others get a writer that does nothing. Files go
  through `fs` (etils.epath), so the workdir may be on gs://. TensorBoard's
  own record writer frames the events: its `EventFileWriter` would import
  TensorFlow (for `tf.io.gfile`), which the offline default never needs.
  """

  def __init__(self, workdir, enabled=True):
    self.enabled = enabled
    self._jsonl = None
    self._events = None
    if not enabled:
      return
    workdir = fs.path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._path = workdir / 'metrics.jsonl'
    # Object stores have no appends: there each record reopens the object
    # (tf.io.gfile rewrites it); a local file stays open.
    if fs.is_local(workdir):
      self._jsonl = self._path.open('a')
    try:
      from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
      from tensorboard.summary.writer import record_writer  # pylint: disable=g-import-not-at-top
    except ImportError:
      return
    logdir = workdir / 'tensorboard'
    logdir.mkdir(parents=True, exist_ok=True)
    name = (f'events.out.tfevents.{int(time.time()):010d}.'
            f'{socket.gethostname()}.{os.getpid()}.0')
    self._events = record_writer.RecordWriter((logdir / name).open('wb'))
    self._add_event(event_pb2.Event(wall_time=time.time(),
                                    file_version='brain.Event:2'))

  def _add_event(self, event):
    self._events.write(event.SerializeToString())
    self._events.flush()

  def write(self, step, scalars, kind='train'):
    if not self.enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
    record = {'step': int(step), 'kind': kind, 'time': time.time(), **scalars}
    line = json.dumps(record) + '\n'
    if self._jsonl is not None:
      self._jsonl.write(line)
      self._jsonl.flush()
    else:
      with self._path.open('a') as f:
        f.write(line)
    if self._events is not None:
      from tensorboard.compat.proto import event_pb2, summary_pb2  # pylint: disable=g-import-not-at-top
      values = [summary_pb2.Summary.Value(tag=f'{kind}/{k}', simple_value=v)
                for k, v in scalars.items()]
      self._add_event(event_pb2.Event(
          wall_time=time.time(), step=int(step),
          summary=summary_pb2.Summary(value=values)))

  def close(self):
    if self._jsonl:
      self._jsonl.close()
      self._jsonl = None
    if self._events:
      self._events.close()
      self._events = None


class Progress:
  """A one-line console progress bar: step, images/s, time left, loss."""

  def __init__(self, total_steps, batch_size, start_step=0, enabled=True,
               stream=sys.stderr):
    self.total = total_steps
    self.batch = batch_size
    self.enabled = enabled
    self.stream = stream
    self.tty = stream.isatty()
    self._t0 = time.time()
    self._s0 = start_step
    self._last = (self._t0, start_step)

  def update(self, step, **info):
    """Prints the line; `step` is the number of finished steps."""
    if not self.enabled:
      return
    now = time.time()
    last_t, last_s = self._last
    rate = (step - last_s) * self.batch / max(now - last_t, 1e-9)
    overall = (step - self._s0) / max(now - self._t0, 1e-9)
    left = (self.total - step) / overall if overall > 0 else float('inf')
    self._last = (now, step)
    width = 24
    filled = int(width * step / max(self.total, 1))
    bar = '#' * filled + '.' * (width - filled)
    extra = ' '.join(f'{k} {v:.4g}' for k, v in info.items())
    line = (f'[{bar}] {step}/{self.total} {rate:7.1f} img/s '
            f'left {_fmt_time(left)} {extra}')
    if self.tty:
      self.stream.write('\r' + line + '\x1b[K')
    else:
      self.stream.write(line + '\n')
    self.stream.flush()

  def close(self):
    if self.enabled and self.tty:
      self.stream.write('\n')
      self.stream.flush()


def _fmt_time(seconds):
  if not np.isfinite(seconds):
    return '--:--'
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m:02d}:{s:02d}'


# ----------------------------------------------------------------------------
# What a run records about itself (run_info.json, results.json).


def versions():
  """Versions of Python and the libraries that computed a run."""
  out = {'python': sys.version.split()[0]}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy',
               'tensorflow', 'tensorflow-cpu', 'tensorflow-datasets'):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


@functools.cache
def source_revision():
  """The git commit of the collab_jax source that runs, and whether it was dirty.

  `commit` is None when the package does not run from a git checkout (an
  installed wheel); `dirty` is True when tracked or untracked, not ignored,
  files differ from that commit (then the commit alone does not say what
  ran).
  """
  here = os.path.dirname(os.path.abspath(__file__))
  def git(*args):
    return subprocess.run(['git', *args], cwd=here, capture_output=True,
                          text=True, timeout=30, check=True).stdout.strip()
  try:
    commit = git('rev-parse', 'HEAD')
    dirty = bool(git('status', '--porcelain'))
  except (OSError, subprocess.SubprocessError):
    return {'commit': None, 'dirty': None}
  return {'commit': commit, 'dirty': dirty}


def provenance():
  """What computed a run: the source revision and the library versions."""
  return {**source_revision(), 'versions': versions()}


def peak_memory_bytes():
  """Peak memory of the first local device, where the backend reports it."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def compiled_stats(compiled):
  """FLOPs and memory of a compiled step, where the backend reports them."""
  out = {}
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and 'flops' in cost:
      out['flops_per_step'] = float(cost['flops'])
    if cost and 'bytes accessed' in cost:
      out['bytes_accessed_per_step'] = float(cost['bytes accessed'])
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    mem = compiled.memory_analysis()
    if mem is not None:
      for k in ('temp_size_in_bytes', 'argument_size_in_bytes',
                'output_size_in_bytes', 'generated_code_size_in_bytes'):
        out[k] = int(getattr(mem, k, 0))
  except Exception:  # pylint: disable=broad-except
    pass
  return out
