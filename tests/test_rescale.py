"""backprop_rescale: identity forward, scaled gradient, under jit/vmap/sharding."""

import jax
import jax.numpy as jnp
import numpy as np
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
