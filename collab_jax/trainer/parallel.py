"""The device mesh and the shardings of a run, in one place.

Data parallelism over every device of every process: one `jax.jit` over a
1-D `Mesh` with axis `data`; the batch is sharded on it, the train state is
replicated (so BatchNorm statistics are those of the global batch).
"""

import dataclasses
from typing import Optional, Sequence

import jax
from jax.experimental.compilation_cache import compilation_cache
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class DataParallel:
  """A mesh over devices and the two shardings the trainer uses."""
  mesh: Mesh
  replicated: NamedSharding  # the train state, teachers, metrics
  batch: NamedSharding       # the batch axis split over `data`

  @property
  def platform(self) -> str:
    return self.mesh.devices.flat[0].platform


def data_parallel(devices: Optional[Sequence[jax.Device]] = None) -> DataParallel:
  """The mesh over `devices` (default: every device of every process)."""
  mesh = Mesh(np.array(jax.devices() if devices is None else devices), ('data',))
  return DataParallel(mesh, NamedSharding(mesh, P()), NamedSharding(mesh, P('data')))


def to_global(local, sharding):
  """A process-local batch (dict of numpy arrays) -> global arrays sharded by `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def avoid_multiprocess_cpu_cache():
  """Turns JAX's persistent compilation cache off in a multi-process CPU run.

  On jaxlib 0.12.1 a multi-process CPU step loaded from that cache
  deadlocks in its first collective (every process waits in its first
  device_get); compiled afresh it runs. Call before anything compiles.
  """
  if (jax.process_count() > 1 and jax.default_backend() == 'cpu'
      and jax.config.jax_enable_compilation_cache
      and jax.config.jax_compilation_cache_dir):
    jax.config.update('jax_enable_compilation_cache', False)
    compilation_cache.reset_cache()
    if jax.process_index() == 0:
      print('note: the persistent compilation cache is off in this '
            'multi-process CPU run (with it, jaxlib 0.12.1 deadlocks in the '
            'first collective).', flush=True)
