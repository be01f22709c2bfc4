"""Tests run on CPU with 8 fake devices (set before JAX initialises its backends)."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
# Start the backends now, so that no test (e.g. bench.main, which sets its own
# device count when it can) changes the count for the tests after it.
assert len(jax.devices()) == 8


# The tests' programs are tiny: XLA's optimisation passes and LLVM's expensive
# ones cost more compile time than they save at run time (the suite spends
# most of its time compiling). Same maths, other code; COLLAB_JAX_TEST_FULL_OPT=1
# runs the suite with the optimisations users get.
FAST_COMPILE = ({} if os.environ.get('COLLAB_JAX_TEST_FULL_OPT') == '1' else
                {'jax_disable_most_optimizations': True})


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for the session, subprocesses included.

  The tests compile the same tiny programs again and again (in this process,
  in the other pytest-xdist worker and in the `python -m collab_jax.main`
  subprocesses); on a 2-core machine a compile takes seconds, a cache hit a
  fraction of one. Cached executables are the programs XLA would compile
  again, so results do not change. The xdist workers share one cache (in the
  run's base temporary directory, fresh for every pytest run); JAX falls back
  to compiling when an entry cannot be read.
  """
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent  # the controller's directory, above each worker's own
  cache = base / 'jax_compilation_cache'
  cache.mkdir(exist_ok=True)
  settings = {**FAST_COMPILE, 'jax_compilation_cache_dir': str(cache),
              'jax_persistent_cache_min_compile_time_secs': 0,
              'jax_persistent_cache_min_entry_size_bytes': 0}
  for name, value in settings.items():
    jax.config.update(name, value)
    os.environ[name.upper()] = str(value)  # inherited by subprocesses
  yield str(cache)
  for name in settings:
    os.environ.pop(name.upper(), None)

