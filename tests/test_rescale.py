"""backprop_rescale: identity forward, scaled gradient, under jit/vmap/sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import collab_jax


def test_forward_identity_and_scaled_gradient():
  x = jnp.arange(6.0).reshape(2, 3)
  np.testing.assert_array_equal(collab_jax.backprop_rescale(x, 0.25), x)
  g = jax.grad(lambda x: jnp.sum(collab_jax.backprop_rescale(x, 0.25) ** 2))(x)
  np.testing.assert_allclose(g, 0.25 * 2 * x)


def test_pytree_and_dtype_preserved():
  tree = {'a': jnp.ones(3, jnp.bfloat16), 'b': (jnp.ones(2), jnp.ones(()))}
  def f(t):
    t = collab_jax.backprop_rescale(t, 0.5)
    return (jnp.sum(t['a'].astype(jnp.float32)) + 3 * jnp.sum(t['b'][0])
            + 5 * t['b'][1])
  g = jax.grad(f)(tree)
  assert g['a'].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(g['a'], np.float32), 0.5)
  np.testing.assert_allclose(g['b'][0], 1.5)
  np.testing.assert_allclose(g['b'][1], 2.5)


def test_under_jit_vmap_and_traced_scale():
  x = jnp.arange(12.0).reshape(4, 3)
  scales = jnp.array([1.0, 0.5, 0.25, 0.0])
  f = lambda x, s: jnp.sum(collab_jax.backprop_rescale(x, s) * 3.0)
  g = jax.jit(jax.vmap(jax.grad(f)))(x, scales)
  np.testing.assert_allclose(g, 3.0 * scales[:, None] * jnp.ones((4, 3)))
  # The scale itself gets no gradient.
  np.testing.assert_array_equal(jax.grad(f, argnums=1)(x[0], 0.5), 0.0)


def test_second_order_keeps_identity_forward():
  f = lambda x: jnp.sum(jnp.sin(collab_jax.backprop_rescale(x, 0.5)))
  x = jnp.array([0.3, 1.2])
  np.testing.assert_allclose(jax.grad(f)(x), 0.5 * jnp.cos(x), rtol=1e-6)


def test_sharded_input():
  mesh = Mesh(np.array(jax.devices()[:8]), ('data',))
  sharding = NamedSharding(mesh, P('data'))
  x = jax.device_put(jnp.arange(16.0).reshape(8, 2), sharding)
  g = jax.jit(jax.grad(lambda x: jnp.sum(collab_jax.backprop_rescale(x, 0.125) * x)))(x)
  np.testing.assert_allclose(g, 0.125 * x + x)
  assert g.sharding.is_equivalent_to(sharding, 2)


def test_numpy_and_negative_scales():
  x = jnp.array([1.0, -2.0])
  f = lambda x, s: jnp.sum(collab_jax.backprop_rescale(x, s) * 3.0)
  np.testing.assert_allclose(jax.grad(f)(x, np.float32(0.5)), [1.5, 1.5])
  np.testing.assert_allclose(jax.grad(f)(x, np.array(2)), [6.0, 6.0])
  # A negative factor reverses the gradient (a gradient-reversal layer).
  np.testing.assert_allclose(jax.grad(f)(x, -1.0), [-3.0, -3.0])


@pytest.mark.parametrize('scale,error,match', [
    ('0.5', TypeError, r"^scale='0.5' has type str; expected a finite number, "
     r'e.g. 1 / num_branches\.$'),
    (None, TypeError, r'^scale=None has type NoneType'),
    (True, TypeError, r'^scale=True is a bool'),
    (jnp.ones(3), ValueError, r'^scale has shape \(3,\); backprop_rescale '
     r'needs a scalar \(the same factor for every element\)'),
    (float('nan'), ValueError, r'^scale=nan would make every gradient through '
     r'x non-finite; expected a finite number'),
    (np.float32('inf'), ValueError, r'^scale=inf would make every gradient'),
    (jnp.array(-jnp.inf), ValueError, r'^scale=-inf would make every gradient'),
], ids=['str', 'None', 'bool', 'vector', 'nan', 'numpy-inf', 'jax-inf'])
def test_bad_scale_is_named(scale, error, match):
  """#26: a string was read as a number and NaN or inf went through."""
  with pytest.raises(error, match=match):
    collab_jax.backprop_rescale(jnp.ones(2), scale)


def test_traced_scale_shape_is_checked_and_value_passes():
  with pytest.raises(ValueError, match=r'^scale has shape \(2,\)'):
    jax.jit(collab_jax.backprop_rescale)(jnp.ones(2), jnp.ones(2))
  # A traced non-finite value cannot be seen: used as given.
  g = jax.grad(lambda x, s: jnp.sum(collab_jax.backprop_rescale(x, s)))
  assert np.isnan(jax.jit(g)(jnp.ones(2), jnp.nan)).all()
