"""The device mesh and the shardings of a run, in one place.

Data parallelism over every device of every process: one `jax.jit` over a
1-D `Mesh` with axis `data`; the batch is sharded on it, the train state is
replicated (so BatchNorm statistics are those of the global batch).
"""

import dataclasses
from typing import Optional, Sequence

import jax
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
