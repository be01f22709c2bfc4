"""Backpropagation rescaling (paper Sec. 3.3, eq. 5-6).

At a split point `H` branches read the same shared tensor, so the backward pass
sums `H` gradients into it. `backprop_rescale(x, 1 / H)` is the identity in the
forward pass and multiplies the incoming gradient by `1 / H`, so the shared
layers receive the mean of the branches' gradients while every branch's own
layers see exactly the gradient of single-model training.
"""

import jax
import jax.numpy as jnp


@jax.custom_vjp
def _rescale(x, scale):
  return x


def _rescale_fwd(x, scale):
  return x, scale


def _rescale_bwd(scale, g):
  # `scale` is an input too (it may be traced); it gets a zero cotangent so that
  # nothing downstream ever learns through the rescaling factor itself.
  scaled = jax.tree.map(lambda t: (t * scale).astype(t.dtype), g)
  return scaled, jnp.zeros_like(scale)


_rescale.defvjp(_rescale_fwd, _rescale_bwd)


def backprop_rescale(x, scale):
  """Identity forward; multiplies the gradient flowing back into `x` by `scale`.

  Args:
    x: an array or any pytree of arrays.
    scale: a scalar (Python number or 0-d array, possibly traced), e.g. `1 / H`.

  Returns:
    `x` unchanged. Under `jax.grad`, the cotangent of every leaf of `x` is
    multiplied by `scale`. Works under `jit`, `vmap`, `grad` and with sharded
    inputs (the operation is elementwise, so it never moves data).
  """
  scale = jnp.asarray(scale, dtype=jnp.float32)
  if scale.ndim != 0:
    raise ValueError(
        f'backprop_rescale: scale must be a scalar, got shape {scale.shape}; '
        'pass e.g. 1 / num_branches.')
  return _rescale(x, scale)
