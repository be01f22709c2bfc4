"""The NNX head tree: topology, export of every head, rescaled shared gradient."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from collab_jax import nnx_heads
import collab_jax


class Stage(nnx.Module):
  def __init__(self, din, dout, rngs):
    self.linear = nnx.Linear(din, dout, rngs=rngs)
    self.norm = nnx.BatchNorm(dout, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.norm(self.linear(x)))


STAGES = (functools.partial(Stage, 5, 8), functools.partial(Stage, 8, 8),
          lambda rngs: nnx.Linear(8, 3, rngs=rngs))


@pytest.mark.parametrize('splits', [(), ((0, 2),), ((1, 2), (2, 2)), ((0, 2), (2, 3))])
def test_export_is_the_plain_network(splits):
  tree = nnx_heads.NnxHeadTree(STAGES, splits, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (6, 5))
  tree(x)  # one training-mode call: BatchNorm statistics move
  tree.eval()
  logits = tree(x)
  assert logits.shape == (collab_jax.num_heads(splits), 6, 3)
  for head in range(tree.num_heads):
    exported = tree.export_head(head)
    # Its variables load into a freshly built plain network, which then
    # reproduces head `head` exactly.
    plain = nnx.Sequential(*[make(nnx.Rngs(9)) for make in STAGES])
    nnx.update(plain, nnx.state(exported))
    plain.eval()
    np.testing.assert_array_equal(plain(x), logits[head])
  if splits:
    assert not np.allclose(logits[0], logits[-1])


def test_shared_gradient_is_mean_of_heads():
  splits = ((1, 4),)
  x = jax.random.normal(jax.random.key(1), (6, 5))
  labels = jnp.arange(6) % 3
  grads = {}
  for rescale in ('backprop', 'none'):
    tree = nnx_heads.NnxHeadTree(STAGES, splits, rngs=nnx.Rngs(0), rescale=rescale)
    tree.eval()
    loss = lambda m: collab_jax.collaborative_loss(m(x), labels)
    grads[rescale] = nnx.grad(loss)(tree)
  np.testing.assert_allclose(grads['backprop']['trunk'][0]['linear']['kernel'][...],
                             grads['none']['trunk'][0]['linear']['kernel'][...] / 4,
                             rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match='out of range'):
    nnx_heads.NnxHeadTree(STAGES, ((3, 2),), rngs=nnx.Rngs(0))


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match=r'^stages=\(\) is empty'):
    nnx_heads.NnxHeadTree((), (), rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=r'^stages\[0\]=None is not callable'):
    nnx_heads.NnxHeadTree((None,), (), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"^rescale='loss' is not one of "
                     r"\('backprop', 'none'\)"):
    nnx_heads.NnxHeadTree(STAGES, ((1, 2),), rngs=nnx.Rngs(0), rescale='loss')
  tree = nnx_heads.NnxHeadTree(STAGES, [[np.int64(1), 2]], rngs=nnx.Rngs(0))
  assert tree.splits == ((1, 2),)
  with pytest.raises(TypeError, match=r'^head=1.0 has type float; expected an '
                     r'int in \[0, 2\)'):
    tree.export_head(1.0)
  with pytest.raises(ValueError, match=r'^head=2 is out of range for 2 heads'):
    tree.export_head(2)
