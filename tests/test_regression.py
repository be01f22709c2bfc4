"""Collaborative regression: the loss against NumPy, and the diabetes example."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import collab_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _reference(preds, targets, beta):
  """NumPy: sum_h mean_b [beta |p_h - y|^2 + (1 - beta) |p_h - mean_{j!=h} p_j|^2]."""
  p = np.asarray(preds, np.float64).reshape(preds.shape[:2] + (-1,))
  y = np.asarray(targets, np.float64).reshape(p.shape[1:])
  total = 0.0
  for h in range(p.shape[0]):
    hard = np.sum((p[h] - y)**2, axis=-1).mean()
    if p.shape[0] == 1:
      total += hard
      continue
    others = np.mean([p[j] for j in range(p.shape[0]) if j != h], axis=0)
    total += beta * hard + (1 - beta) * np.sum((p[h] - others)**2, axis=-1).mean()
  return total


@pytest.mark.parametrize('shape', [(1, 8), (2, 8), (4, 8), (3, 8, 5)])
@pytest.mark.parametrize('beta', [0.5, 0.2, 1.0])
def test_matches_numpy(shape, beta):
  rng = np.random.default_rng(0)
  preds = rng.normal(size=shape).astype(np.float32)
  targets = rng.normal(size=shape[1:]).astype(np.float32)
  got = collab_jax.collaborative_regression_loss(jnp.asarray(preds),
                                                 jnp.asarray(targets), beta=beta)
  np.testing.assert_allclose(got, _reference(preds, targets, beta), rtol=1e-5)


def test_consensus_is_a_fixed_target():
  """d/dp_h = (2 / B) [beta (p_h - y) + (1 - beta)(p_h - m_h)]: nothing through m_h."""
  rng = np.random.default_rng(1)
  preds = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(6,)), jnp.float32)
  grad = jax.grad(lambda p: collab_jax.collaborative_regression_loss(p, y, beta=0.3))(preds)
  others = (preds.sum(0, keepdims=True) - preds) / 2
  want = 2 / 6 * (0.3 * (preds - y) + 0.7 * (preds - others))
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)


def test_bad_shapes_name_the_problem():
  with pytest.raises(ValueError, match='heads, batch'):
    collab_jax.collaborative_regression_loss(jnp.zeros((4,)), jnp.zeros((4,)))
  with pytest.raises(ValueError, match='targets have shape'):
    collab_jax.collaborative_regression_loss(jnp.zeros((2, 4)), jnp.zeros((5,)))
  with pytest.raises(ValueError, match='beta'):
    collab_jax.collaborative_regression_loss(jnp.zeros((2, 4)), jnp.zeros((4,)), beta=0.0)


def test_diabetes_example_runs():
  """experiments/regression_diabetes.py end to end, 1 seed, few steps."""
  pytest.importorskip('sklearn')
  sys.path.insert(0, os.path.join(REPO, 'experiments'))
  try:
    import regression_diabetes  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  results = regression_diabetes.main(['--seeds=1', '--steps=20'])
  assert set(results) == {'single', 'h2', 'h4'}
  assert all(np.isfinite(v[0]) and v[0] > 0 for v in results.values())
