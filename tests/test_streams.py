"""Every random stream has its own tag: no two streams share a seed sequence."""

import itertools

import jax
import numpy as np
import pytest

from collab_jax.data import streams


def _first_draws(stream, values):
  return tuple(streams.rng(stream, *values).integers(0, 2**62, 4).tolist())


def test_numpy_streams_never_coincide():
  # Small seeds, epochs and run seeds are where untagged lists collided
  # (`[0, 0]` was both seed 0's epoch-0 order and noise_seed 0's corrupted
  # set); 2**32 + k checks that a two-word seed does not shift the others.
  values = (0, 1, 2, 2**32, 2**32 + 1, 2**63 - 1)
  seen = {}
  for stream, (_, count) in streams.NUMPY_STREAMS.items():
    for args in itertools.product(values, repeat=count):
      draw = _first_draws(stream, args)
      assert draw not in seen, (stream, args, seen.get(draw))
      seen[draw] = (stream, args)
  assert len(seen) == sum(len(values)**c for _, c in streams.NUMPY_STREAMS.values())


def test_tags_are_distinct_and_arity_is_checked():
  tags = [tag for tag, _ in streams.NUMPY_STREAMS.values()]
  assert len(set(tags)) == len(tags)
  with pytest.raises(ValueError, match='takes 2 values'):
    streams.rng('order', 0)
  with pytest.raises(ValueError, match='outside'):
    streams.rng('noise_set', -1)


def test_jax_streams_differ():
  keys = [streams.init_key(0), streams.augment_key(0, 0), streams.augment_key(0, 1),
          streams.init_key(1), jax.random.key(0)]
  data = {tuple(np.asarray(jax.random.key_data(k)).tolist()) for k in keys}
  assert len(data) == len(keys)
