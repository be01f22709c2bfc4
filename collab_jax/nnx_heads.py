"""The head tree for Flax NNX: the same `splits` contract, the same export.

`heads.HeadTree` (linen) stacks the branches' parameters to run them as one
batched computation; this NNX version keeps every branch as its own module
(a Python loop, the linen tree's `branch_impl='loop'` without stacking), which
is what NNX users write by hand. A stage is a factory `make(rngs)` returning
an `nnx.Module` (or any NNX callable) that maps the previous stage's output;
the last stage returns logits `[B, C]`. Train/eval behaviour (Dropout,
BatchNorm) follows NNX's own `model.train()` / `model.eval()`.

Topology as in `heads`: `splits = ((stage_index, branches), ...)`; level `i`
holds `b_1 * ... * b_i` copies of its stages, numbered row-major, so head `h`
takes the same branch path as in the linen tree (`heads.head_path`). Each
split passes the shared activation through `backprop_rescale(x, 1 / b)`.
"""

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from collab_jax import heads as heads_lib
from collab_jax import rescale as rescale_lib

NnxStageFactory = Callable[[nnx.Rngs], Callable[[Any], Any]]
RESCALE_MODES = ('backprop', 'none')


class NnxHeadTree(nnx.Module):
  """A tree of heads over NNX stage factories; returns logits `[H, B, C]`.

  Args:
    stages: the network as factories `make(rngs)`, in order; the last stage
      returns logits `[B, C]`.
    splits: the topology `((stage_index, branches), ...)`; `()` = one head.
    rngs: the `nnx.Rngs` every stage is built with.
    rescale: 'backprop' (gradient times 1/branches at each split, the
      paper's) or 'none'. (The linen tree's 'loss' ablation divides the loss,
      which is the training loop's business.)
  """

  def __init__(self, stages: Sequence[NnxStageFactory],
               splits: heads_lib.SplitsLike = (), *, rngs: nnx.Rngs,
               rescale: str = 'backprop'):
    stages = tuple(stages)
    if not stages:
      raise ValueError(
          'stages=() is empty; a network needs at least one stage factory '
          '`make(rngs)`.')
    for index, make in enumerate(stages):
      if not callable(make):
        raise TypeError(f'stages[{index}]={make!r} is not callable; expected '
                        'a factory `make(rngs)` returning an NNX module.')
    splits = heads_lib.validate_splits(splits, len(stages))
    if rescale not in RESCALE_MODES:
      raise ValueError(f'rescale={rescale!r} is not one of {RESCALE_MODES}.')
    self.splits, self.rescale = splits, rescale
    bounds = [s for s, _ in splits] + [len(stages)]
    self.trunk = nnx.List([make(rngs) for make in stages[:bounds[0]]])
    self.levels = nnx.List()
    copies = 1
    for level, (start, b) in enumerate(splits):
      copies *= b
      self.levels.append(nnx.List([
          nnx.List([make(rngs) for make in stages[start:bounds[level + 1]]])
          for _ in range(copies)]))

  @property
  def num_heads(self) -> int:
    return heads_lib.num_heads(self.splits)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits `[H, B, C]` of every head for input `x` (`[B, ...]`)."""
    for stage in self.trunk:
      x = stage(x)
    xs = [x]
    for (_, b), level in zip(self.splits, self.levels):
      if self.rescale == 'backprop':
        xs = [rescale_lib.backprop_rescale(y, 1.0 / b) for y in xs]
      outputs = []
      for index, branch in enumerate(level):
        y = xs[index // b]  # row-major: branch `index` hangs off parent index // b
        for stage in branch:
          y = stage(y)
        outputs.append(y)
      xs = outputs
    return jnp.stack(xs)

  def export_head(self, head: int = 0) -> nnx.Sequential:
    """Head `head` (0-based) as the plain network: `nnx.Sequential` of its stages.

    The stages are this tree's own modules (shared, not copied); its
    `nnx.state` is therefore exactly the variables of
    `nnx.Sequential(*[make(rngs) for make in stages])`, and its outputs equal
    the tree's head `head`. `head` is an int in [0, num_heads) (TypeError or
    ValueError otherwise).
    """
    path = heads_lib.head_path(head, self.splits)
    branches = [b for _, b in self.splits]
    modules = list(self.trunk)
    for level, stages in enumerate(self.levels, 1):
      flat = int(np.ravel_multi_index(path[:level], branches[:level]))
      modules.extend(stages[flat])
    return nnx.Sequential(*modules)
