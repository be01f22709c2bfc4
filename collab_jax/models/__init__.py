"""Networks written as lists of stages, and the paper's split points on them.

`get_stages(name, num_classes, **kwargs)` returns a tuple of stage factories
for `collab_jax.heads.HeadTree`. Adding a network means writing a function that
returns its stages and listing it in `NETWORKS`; nothing else changes.
"""

import functools
import operator
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from collab_jax import paper
from collab_jax.models.cifar_resnet import cifar_resnet
from collab_jax.models.densenet import densenet
from collab_jax.models.imagenet_resnet import imagenet_resnet
from collab_jax.models.layers import compiler_options
from collab_jax.models.layers import optimization_barriers
from collab_jax.models.vit import vit

NETWORKS = {
    **{f'cifar_resnet{d}': functools.partial(cifar_resnet, d)
       for d in (8, 14, 20, 32, 44, 56, 110)},
    'densenet40_12': functools.partial(densenet, 40, growth_rate=12),
    'resnet18_bottleneck': functools.partial(imagenet_resnet, (2, 2, 2, 2)),
    'resnet50': functools.partial(imagenet_resnet, (3, 4, 6, 3)),
    # Fashion-MNIST ViT: 28x28 in 4x4 patches (49 tokens), 6 blocks in 3 stages.
    'vit_tiny': functools.partial(vit, patch=4, hidden=64, depth=6, num_heads=4,
                                  mlp_dim=256),
    # Tiny networks for tests: same code paths, a few thousand parameters.
    'tiny_resnet': functools.partial(cifar_resnet, 8, width=4),
    'tiny_densenet': functools.partial(densenet, 7, growth_rate=4),
    'tiny_resnet50': functools.partial(imagenet_resnet, (1, 1, 1, 1), width=4),
    'tiny_vit': functools.partial(vit, patch=4, hidden=8, depth=3, num_heads=2,
                                  mlp_dim=16),
}


def paper_splits(name: str, graph: str) -> tuple[tuple[int, int], ...]:
  """The split topology of training graph `graph` on network `name`.

  The paper's split points depend only on the network's stage count, e.g.
  `paper_splits('cifar_resnet32', 'h4_hierarchical')`.
  """
  return paper.splits(graph, len(get_stages(name, 1)))


def get_stages(name: str, num_classes: int, *, dtype: Any = jnp.float32,
               **kwargs: Any) -> tuple[Callable[..., nn.Module], ...]:
  """Stage factories of network `name` with `num_classes` outputs.

  Args:
    name: one of `NETWORKS`.
    num_classes: classifier size, an int >= 1.
    dtype: computation dtype (parameters stay float32), e.g. jnp.bfloat16
      or 'bfloat16'.
    **kwargs: network hyper-parameters, e.g. `width` for the ResNets.

  Returns:
    The stage factories, for `HeadTree(stages, splits)` or
    `StageNetwork(stages)`; the last stage returns logits `[B, num_classes]`.
  """
  try:
    if isinstance(num_classes, (bool, np.bool_)):
      raise TypeError  # True would silently mean one class
    operator.index(num_classes)  # ints and numpy ints, not 10.0 or '10'
  except TypeError:
    raise TypeError(f'num_classes={num_classes!r} has type '
                    f'{type(num_classes).__name__}; expected an int >= 1.'
                    ) from None
  if num_classes < 1:
    raise ValueError(f'num_classes={num_classes} must be >= 1.')
  if name not in NETWORKS:
    raise ValueError(
        f'name={name!r} is an unknown network; choose one of: '
        f'{", ".join(sorted(NETWORKS))}.')
  try:
    as_dtype = jnp.dtype(dtype)
  except TypeError:
    raise ValueError(f'dtype={dtype!r} is not a dtype; use float32 or '
                     'bfloat16.') from None
  if not jnp.issubdtype(as_dtype, jnp.floating):
    raise ValueError(f'dtype={dtype!r} is not a floating-point dtype; use '
                     'float32 or bfloat16.')
  # The dtypes the layers compute in: 8-bit floats have no implicit promotion
  # with the float32 parameters, and float64 needs jax_enable_x64 (else JAX
  # computes in float32 while the name says float64).
  usable = ['float32', 'bfloat16', 'float16']
  if jax.config.jax_enable_x64:
    usable.append('float64')
  if as_dtype.name not in usable:
    raise ValueError(f'dtype={dtype!r} cannot be computed in; use one of '
                     f'{", ".join(usable)}.')
  for key, value in kwargs.items():  # width, growth_rate, depth, ...: sizes
    if isinstance(value, int) and not isinstance(value, bool) and value < 1:
      raise ValueError(f'{key}={value} must be >= 1.')
  if isinstance(dtype, str):
    dtype = as_dtype
  return NETWORKS[name](num_classes, dtype=dtype, **kwargs)
