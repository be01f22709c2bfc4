"""A pytest plugin: per test, its wall time and the XLA compilation in-process.

    PYTHONPATH=experiments .venv/bin/python -m pytest -q -p pytest_compile_profile \
        -n 2 --dist worksteal tests
    .venv/bin/python experiments/pytest_compile_profile.py   # the summary

Every worker writes `compile_profile_<worker>.json` to $COMPILE_PROFILE_DIR
(default: the current directory): {test id: [compile seconds, compiles, wall
seconds]}, the compile seconds from JAX's backend-compile duration events.
Compilation in subprocesses (the CLI tests) is not seen.
"""

import collections
import glob
import json
import os
import sys
import time

import pytest

EVENT = '/jax/core/compile/backend_compile_duration'
_current = {'test': 'outside tests'}
_records = {}


def _listener(event, duration, **kwargs):
  del kwargs
  if event == EVENT:
    record = _records.setdefault(_current['test'], [0.0, 0, 0.0])
    record[0] += duration
    record[1] += 1


def pytest_configure(config):
  del config
  import jax  # pylint: disable=g-import-not-at-top
  jax.monitoring.register_event_duration_secs_listener(_listener)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  del nextitem
  _current['test'] = item.nodeid
  record = _records.setdefault(item.nodeid, [0.0, 0, 0.0])
  start = time.time()
  yield
  record[2] += time.time() - start
  _current['test'] = 'outside tests'


def pytest_sessionfinish(session):
  del session
  worker = os.environ.get('PYTEST_XDIST_WORKER', 'main')
  out = os.environ.get('COMPILE_PROFILE_DIR', '.')
  with open(os.path.join(out, f'compile_profile_{worker}.json'), 'w') as f:
    json.dump(_records, f)


def summary(directory='.', top='25'):
  top = int(top)
  records = {}
  for path in glob.glob(os.path.join(directory, 'compile_profile_*.json')):
    with open(path) as f:
      records.update(json.load(f))
  by_test = collections.defaultdict(lambda: [0.0, 0, 0.0, 0])
  for test_id, (compile_s, compiles, wall_s) in records.items():
    total = by_test[test_id.split('[')[0]]
    total[0] += compile_s
    total[1] += compiles
    total[2] += wall_s
    total[3] += 1
  print(f'{sum(r[2] for r in records.values()):.0f} s of tests, '
        f'{sum(r[0] for r in records.values()):.0f} s compiling '
        f'{sum(r[1] for r in records.values())} programs in-process')
  print(' wall_s compile_s programs cases test')
  for name, (compile_s, compiles, wall_s, cases) in sorted(
      by_test.items(), key=lambda kv: -kv[1][2])[:top]:
    print(f'{wall_s:7.1f} {compile_s:9.1f} {compiles:8d} {cases:5d} {name}')


if __name__ == '__main__':
  summary(*sys.argv[1:])
