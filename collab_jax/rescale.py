"""Backpropagation rescaling (paper Sec. 3.3, eq. 5-6).

At a split point `H` branches read the same shared tensor, so the backward pass
sums `H` gradients into it. `backprop_rescale(x, 1 / H)` is the identity in the
forward pass and multiplies the incoming gradient by `1 / H`, so the shared
layers receive the mean of the branches' gradients while every branch's own
layers see exactly the gradient of single-model training.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = jax.typing.ArrayLike


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


def _check_scale(scale: Any) -> None:
  """Type and shape always; finiteness when concrete (a traced scale passes)."""
  expected = 'a finite number, e.g. 1 / num_branches'
  dtype = getattr(scale, 'dtype', None)
  if isinstance(scale, bool) or dtype == np.bool_:
    raise TypeError(f'scale={scale!r} is a bool; expected {expected}.')
  if not isinstance(scale, (int, float, np.number, np.ndarray, jax.Array)):
    raise TypeError(f'scale={scale!r} has type {type(scale).__name__}; '
                    f'expected {expected}.')
  if dtype is not None and not (jnp.issubdtype(dtype, jnp.integer)
                                or jnp.issubdtype(dtype, jnp.floating)):
    raise TypeError(f'scale has dtype {dtype}; expected {expected}.')
  if np.ndim(scale):
    raise ValueError(
        f'scale has shape {np.shape(scale)}; backprop_rescale needs a scalar '
        '(the same factor for every element), e.g. 1 / num_branches.')
  if (not isinstance(scale, jax.core.Tracer)
      and getattr(scale, 'is_fully_addressable', True)
      and not np.isfinite(float(scale))):
    raise ValueError(f'scale={float(scale)} would make every gradient through '
                     f'x non-finite; expected {expected}.')


def backprop_rescale(x: Any, scale: float | ArrayLike) -> Any:
  """Identity forward; multiplies the gradient flowing back into `x` by `scale`.

  Args:
    x: an array or any pytree of arrays, any dtype and shape.
    scale: a finite scalar (Python number or 0-d array, possibly traced), e.g.
      `1 / H`. Its type and shape are checked always, its finiteness when it
      is concrete. 0 stops the gradient and a negative factor reverses it.

  Returns:
    `x` unchanged. Under `jax.grad`, the cotangent of every leaf of `x` is
    multiplied by `scale` (in float32, cast back to the leaf's dtype). Works
    under `jit`, `vmap`, `grad` and with sharded inputs (the operation is
    elementwise, so it never moves data).

  Raises:
    TypeError: `scale` is not a number (e.g. a string or a bool).
    ValueError: `scale` is not a scalar, or is concrete and not finite.
  """
  _check_scale(scale)
  return _rescale(x, jnp.asarray(scale, dtype=jnp.float32))
