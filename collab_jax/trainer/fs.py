"""The workdir's filesystem: its paths, atomic writes and the trainer lock.

Every file of a workdir goes through `etils.epath`, the layer orbax uses
too: on a local path it is the `os` module; `gs://` goes through
`tf.io.gfile` when TensorFlow is installed, else fsspec (gcsfs). Orbax
writes the arrays of checkpoints and of the export with tensorstore, and
orbax 0.12.8 picks tensorstore's GCS driver for `gs://` and its local-file
driver for every other path. So a workdir is a local path (a mounted bucket
included) or `gs://BUCKET/PATH`; any other scheme (`s3://`, `memory://`,
...) is refused: its checkpoints would land in a local folder named after
the scheme.
"""

import contextlib
import fcntl
import json
import os
import re
import socket
import time
import uuid

from etils import epath
import jax

from collab_jax import errors

LOCK_FILE = 'trainer.lock'
SCHEMES = ('gs',)
# `scheme:/...`: a URL (or a mistyped one, such as `gs:/bucket`), not a local
# path: the OS would make a folder named `gs:` of it.
_URL = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*):/')


def path(workdir) -> epath.Path:
  """`workdir` (a str or path) as an `epath.Path`; WorkdirError for a scheme we cannot use."""
  text = os.fspath(workdir)
  match = _URL.match(text)
  if match:
    scheme = match.group(1)
    if scheme not in SCHEMES:
      raise errors.WorkdirError(
          f'workdir {text}: the {scheme}:// scheme is not supported (orbax '
          'writes checkpoints to local paths and gs:// only); use a local '
          'path, a mounted bucket, or gs://BUCKET/PATH.')
    if not re.match(rf'^{scheme}://[^/]', text):
      raise errors.WorkdirError(
          f'workdir {text} is not a {scheme}:// URL; write '
          f'{scheme}://BUCKET/PATH.')
  return epath.Path(text)


def is_local(p) -> bool:
  """Whether `p` is on a local (or mounted) filesystem, not an object store."""
  return _URL.match(os.fspath(p)) is None


def orbax_dir(p) -> str:
  """`p` as orbax wants a directory: absolute when local."""
  return os.path.abspath(os.fspath(p)) if is_local(p) else os.fspath(p)


def write_json_atomic(p, obj):
  """Writes strict JSON (no NaN/Infinity) to `p` via a temporary file.

  Raises ValueError for a non-finite float before anything is written.
  """
  p = epath.Path(p)
  text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + '\n'
  tmp = p.parent / f'{p.name}.tmp.{os.getpid()}'
  try:
    tmp.write_text(text)
    tmp.replace(p)
  except BaseException:
    if tmp.exists():  # e.g. a full disk: leave no half-written file
      tmp.unlink()
    raise


# ----------------------------------------------------------------------------
# One trainer per workdir.


@contextlib.contextmanager
def workdir_lock(workdir, *, break_lock=False):
  """Holds the workdir's lock for the life of a run: one trainer per workdir.

  Each process takes its own lock (`trainer.lock` for process 0,
  `trainer.lock.<i>` for process i), so a second multi-process run on the
  same workdir is refused by every one of its processes.

  Local filesystems: `fcntl.flock` on the lock file. The kernel releases it
  when the process ends, however it ends (kill -9 included), so a lock left
  by a dead process is never stale. flock works on NFS too (Linux emulates
  it there with byte-range locks).

  Object stores (gs://) have no locks: the lock is an object written once
  with its owner (host, pid, start time) and removed when the run ends. A
  run killed without warning leaves it behind; the next run is refused,
  naming the owner, unless `break_lock` (after checking that the owner is
  gone), or unless the owner was a process of this host that no longer
  exists.

  Raises:
    WorkdirError: another trainer holds the lock.
  """
  workdir = path(workdir)
  index = jax.process_index()
  lock = workdir / (LOCK_FILE if index == 0 else f'{LOCK_FILE}.{index}')
  if is_local(lock):
    with _flock(workdir, lock):
      yield
  else:
    with _lock_object(workdir, lock, break_lock):
      yield


@contextlib.contextmanager
def _flock(workdir, lock):
  try:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise errors.WorkdirError(
        f'cannot open the lock file {lock}: {e.strerror}.') from None
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
          f'({holder or "pid unknown"}; lock {lock}); wait for it to end or '
          'use another --workdir.') from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'pid {os.getpid()} on host {socket.gethostname()}'.encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock


def _owner_gone(owner):
  """Whether the lock's owner was a process of this host that has ended."""
  if owner.get('host') != socket.gethostname():
    return False  # cannot tell from here
  try:
    os.kill(int(owner['pid']), 0)
  except ProcessLookupError:
    return True
  except (OSError, KeyError, TypeError, ValueError):
    return False
  return False


@contextlib.contextmanager
def _lock_object(workdir, lock, break_lock):
  """The lock of an object store: an object naming its owner, written once."""
  def read():
    try:
      return json.loads(lock.read_text())
    except Exception:  # pylint: disable=broad-except
      return {}  # unreadable: half-written or damaged; still a lock
  if lock.exists() and not break_lock:
    owner = read()
    if not _owner_gone(owner):
      since = owner.get('start')
      since = (time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))
               if isinstance(since, (int, float)) else 'an unknown time')
      raise errors.WorkdirError(
          f'workdir {workdir} is in use by another trainer (pid '
          f'{owner.get("pid", "unknown")} on host {owner.get("host", "unknown")}'
          f', since {since}; lock {lock}); wait for it to end or use another '
          '--workdir. If that trainer is gone (killed, or its machine '
          'pre-empted), rerun with --break_lock.')
  token = uuid.uuid4().hex
  mine = {'host': socket.gethostname(), 'pid': os.getpid(),
          'start': time.time(), 'token': token}
  lock.write_text(json.dumps(mine))
  # No create-if-absent write through epath: of two trainers that wrote at
  # once, the one whose object was overwritten sees it here and gives way.
  if read().get('token') != token:
    raise errors.WorkdirError(
        f'workdir {workdir} was locked by another trainer at the same moment '
        f'(lock {lock}); use another --workdir.')
  try:
    yield
  finally:
    try:
      if read().get('token') == token:
        lock.unlink()
    except Exception:  # pylint: disable=broad-except
      pass  # the next run reports the lock left behind
