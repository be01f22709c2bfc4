"""The head tree (paper Sec. 3.1, Fig. 1): one network, several classifier heads.

A network is an ordered list of *stages*: `g(x) = g_K(... g_1(x))`. Each stage
is given as a factory (a linen Module class or a `functools.partial` of one)
whose instances are called as `stage(x, train=...)`; the last stage returns
logits `[B, C]`.

The topology is data, `splits = ((stage_index, branches), ...)`: split before
stage `stage_index` (0 = before the first stage, i.e. independent instances)
into `branches` copies; every split multiplies the number of heads. Examples on
a 3-stage CIFAR ResNet: single `()`, 4 instances `((0, 4),)`, simple ILR sharing
`((1, 2),)`, hierarchical ILR sharing `((1, 2), (2, 2))`.

Parameters are laid out by *level*: `trunk` holds the stages before the first
split; `level_i` holds the stages between split `i` and split `i + 1`, stacked
with leading axes `[b_1, ..., b_i]` (one slice per branch), so all branches of a
level run as one batched computation (`nn.vmap`). Each branch therefore owns the
parameters *and* the BatchNorm statistics of its unshared stages. Head `h`
(0-based; "head 1" in logs is `h = 0`) is the branch path
`np.unravel_index(h, (b_1, ..., b_k))`.

At each split the shared activation passes through `backprop_rescale(x, 1/b)`
(paper eq. 5-6): with several splits, each split point divides the gradient by
its own branch count, which is the natural generalisation of `1/H` to a tree.
"""

import math
import operator
from typing import Any, Callable, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np

from collab_jax import rescale as rescale_lib

StageFactory = Callable[..., nn.Module]
Splits = Tuple[Tuple[int, int], ...]
# What callers may pass as splits: any sequence of (stage_index, branches)
# pairs of ints, numpy ints included; normalised to `Splits`.
SplitsLike = Sequence[Sequence[int]]

RESCALE_MODES = ('backprop', 'none', 'loss')
BRANCH_IMPLS = ('vmap', 'loop')


def _split_pairs(splits: Any) -> Splits:
  """`splits` as a tuple of `(stage_index, branches)` Python int pairs.

  Only the form is checked here (pairs of ints, numpy ints included); the
  ranges need the network (`validate_splits`).
  """
  try:
    pairs = tuple((s, b) for s, b in splits)
  except (TypeError, ValueError):
    raise ValueError(
        f'splits={splits!r} must be a sequence of (stage_index, branches) '
        'pairs, e.g. ((1, 2),) or ((1, 2), (2, 2)); () is the single model.'
    ) from None
  for s, b in pairs:
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
               for v in (s, b)):
      raise ValueError(
          f'splits={splits!r}: stage indices and branch counts must be ints.')
  return tuple((int(s), int(b)) for s, b in pairs)


def validate_splits(splits: SplitsLike, num_stages: int) -> Splits:
  """Checks a topology against a network of `num_stages` stages.

  Args:
    splits: `((stage_index, branches), ...)`, ints (numpy ints too).
    num_stages: the network's number of stages.

  Returns:
    The splits as a tuple of `(stage_index, branches)` Python int pairs.

  Raises:
    ValueError naming what is wrong and what is allowed.
  """
  pairs = _split_pairs(splits)
  previous = -1
  for s, b in pairs:
    if not 0 <= s < num_stages:
      raise ValueError(
          f'splits={splits!r}: split index {s} is out of range; this network '
          f'has {num_stages} stages, so split indices must be in '
          f'[0, {num_stages - 1}] (0 = separate instances).')
    if b < 2:
      raise ValueError(
          f'splits={splits!r}: a split needs at least 2 branches, got {b} at '
          f'stage {s}.')
    if s <= previous:
      raise ValueError(
          f'splits={splits!r}: split indices must be strictly increasing.')
    previous = s
  return pairs


def num_heads(splits: SplitsLike) -> int:
  """Number of heads of a topology: the product of its branch counts."""
  return math.prod(b for _, b in _split_pairs(splits))


def head_path(head: int, splits: SplitsLike) -> Tuple[int, ...]:
  """Branch index at every level for 0-based `head` (row-major over levels).

  Args:
    head: 0-based head index, an int (numpy ints too) in [0, num_heads).
    splits: the tree's topology.

  Raises:
    TypeError: `head` is not an int (e.g. 1.0 or True).
    ValueError: `head` is out of range, or `splits` malformed.
  """
  branches = tuple(b for _, b in _split_pairs(splits))
  count = math.prod(branches)
  expected = f'an int in [0, {count}) (0-based: head 1 is index 0)'
  try:
    if isinstance(head, (bool, np.bool_)):
      raise TypeError  # True would silently mean head 2
    index = operator.index(head)
  except TypeError:
    raise TypeError(f'head={head!r} has type {type(head).__name__}; expected '
                    f'{expected}.') from None
  if not 0 <= index < count:
    raise ValueError(f'head={index} is out of range for {count} heads; '
                     f'expected {expected}.')
  if not branches:
    return ()
  return tuple(int(i) for i in np.unravel_index(index, branches))


def loss_scale(rescale: str, heads: int) -> float:
  """Factor applied to the summed loss: `1/H` for the 'loss' ablation, else 1."""
  return 1.0 / heads if rescale == 'loss' else 1.0


def _check_stages(stages: Sequence[StageFactory]) -> None:
  if not tuple(stages):
    raise ValueError(
        f'stages={stages!r} is empty; a network needs at least one stage, '
        "e.g. collab_jax.get_stages('cifar_resnet20', 10).")
  for index, make_stage in enumerate(stages):
    if not callable(make_stage):
      raise TypeError(
          f'stages[{index}]={make_stage!r} is not callable; expected a stage '
          'factory: a linen Module class or a functools.partial of one.')


def _run_stages(module, x):
  """Applies `module.stages` in order as children `stage_{i}` of `module`.

  With `module.remat`, every stage is rematerialised (`nn.remat`): its
  activations are recomputed in the backward pass instead of being kept, so
  only stage boundaries stay live. The stages are created inside the lifted
  function as children of `module`, so the variable layout is the same.
  """
  for offset, make_stage in enumerate(module.stages):
    name = f'stage_{module.first_index + offset}'
    if module.remat:
      apply = lambda mdl, y, make=make_stage, name=name: make(name=name)(
          y, train=mdl.train)
      x = nn.remat(apply)(module, x)
    else:
      x = make_stage(name=name)(x, train=module.train)
  return x


class Segment(nn.Module):
  """Consecutive stages `first_index, first_index + 1, ...` applied in order."""
  stages: Sequence[StageFactory]
  first_index: int
  train: bool = False
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    return _run_stages(self, x)


class StageNetwork(nn.Module):
  """The plain target network: all stages in order, logits `[B, C]`.

  Its variables are `{'stage_0': ..., 'stage_1': ...}`; `export_head` produces
  exactly this layout from a trained `HeadTree`.
  """
  stages: Sequence[StageFactory]

  def __post_init__(self):
    _check_stages(self.stages)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for index, make_stage in enumerate(self.stages):
      x = make_stage(name=f'stage_{index}')(x, train=train)
    return x


class ScanSegment(nn.Module):
  """`Segment` with the `(carry, x) -> (carry, y)` signature of `nn.scan`."""
  stages: Sequence[StageFactory]
  first_index: int
  train: bool = False
  remat: bool = False

  @nn.compact
  def __call__(self, carry, x):
    return carry, _run_stages(self, x)


_VARIABLE_AXES = {'params': 0, 'batch_stats': 0}
_SPLIT_RNGS = {'params': True, 'dropout': True}


def _stacked(branches, impl):
  """A segment class mapped over branch axes `branches = (b_1, ..., b_i)`.

  Both implementations keep the parameters stacked with leading axes
  `[b_1, ..., b_i]`. The innermost map creates the new axis `b_i` (its input is
  not mapped: every branch reads the same activation); the outer maps follow
  the axes that already exist from earlier splits. 'vmap' batches the branches
  into one computation; 'loop' runs them one after another (a fully unrolled
  `nn.scan`, i.e. a Python loop over parameter slices).
  """
  if impl == 'vmap':
    target = Segment
    for depth, b in enumerate(reversed(branches)):
      target = nn.vmap(target, in_axes=None if depth == 0 else 0, out_axes=0,
                       axis_size=b, variable_axes=_VARIABLE_AXES,
                       split_rngs=_SPLIT_RNGS)
    return target
  target = ScanSegment
  for depth, b in enumerate(reversed(branches)):
    target = nn.scan(target, in_axes=nn.broadcast if depth == 0 else 0,
                     out_axes=0, length=b, unroll=b,
                     variable_axes=_VARIABLE_AXES, split_rngs=_SPLIT_RNGS)
  return target


class HeadTree(nn.Module):
  """A tree of heads over a stage-list network; returns logits `[H, B, C]`.

  Attributes:
    stages: the network as stage factories (see module docstring).
    splits: the topology `((stage_index, branches), ...)`; `()` = one head.
    rescale: 'backprop' (paper: gradient times 1/branches at each split),
      'none' (no rescaling) or 'loss' (no rescaling here; the trainer divides
      the summed loss by H, see `loss_scale`), the ablations of Table 3.
    branch_impl: 'vmap' runs the branches of a level as one batched
      computation; 'loop' runs them one after another. Same maths and the
      same stacked parameter layout; which is faster depends on the backend
      (on XLA:CPU, vmapped convolutions become slow grouped convolutions, so
      'loop' is the default; see experiments/results/bench.md).
    remat: rematerialise every stage (`nn.remat`): activations inside a
      stage are recomputed in the backward pass instead of stored. Same
      function, same variables; less memory for more compute.
  """
  stages: Sequence[StageFactory]
  splits: Sequence[Tuple[int, int]] = ()
  rescale: str = 'backprop'
  branch_impl: str = 'loop'
  remat: bool = False

  def __post_init__(self):
    _check_stages(self.stages)
    # Stored normalised (Python int pairs), so `tree.splits` is what
    # `export_head` and `num_heads` want whatever form was passed.
    object.__setattr__(self, 'splits',
                       validate_splits(self.splits, len(self.stages)))
    if self.rescale not in RESCALE_MODES:
      raise ValueError(
          f'rescale={self.rescale!r} is not one of {RESCALE_MODES}.')
    if self.branch_impl not in BRANCH_IMPLS:
      raise ValueError(
          f'branch_impl={self.branch_impl!r} is not one of {BRANCH_IMPLS}.')
    super().__post_init__()

  @property
  def num_heads(self) -> int:
    return num_heads(self.splits)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Logits `[H, B, C]` of every head for input `x` (`[B, ...]`)."""
    stages = tuple(self.stages)
    splits = validate_splits(self.splits, len(stages))
    bounds = [s for s, _ in splits] + [len(stages)]
    branches = [b for _, b in splits]

    first = bounds[0]
    if first > 0:
      x = Segment(stages[:first], 0, train, self.remat, name='trunk')(x)

    for level, (start, b) in enumerate(splits, 1):
      end = bounds[level]
      if self.rescale == 'backprop':
        x = rescale_lib.backprop_rescale(x, 1.0 / b)
      level_module = _stacked(branches[:level], self.branch_impl)(
          stages[start:end], start, train, self.remat, name=f'level_{level}')
      if self.branch_impl == 'vmap':
        x = level_module(x)
      else:
        _, x = level_module((), x)

    if not splits:
      return x[None]
    return x.reshape((-1,) + x.shape[len(splits):])


def export_head(variables: Mapping[str, Any], splits: SplitsLike,
                head: int = 0) -> dict[str, dict[str, Any]]:
  """Extracts head `head` (0-based) of a trained tree as target-network variables.

  Args:
    variables: the tree's variables, all collections: `{'params': ...,
      'batch_stats': ...}` as `HeadTree.init` returns them.
    splits: the tree's topology (`tree.splits`).
    head: 0-based head index (head 1 = 0), an int.

  Returns:
    Variables for `StageNetwork(stages)` (`{'stage_0': ..., ...}` per
    collection) whose outputs equal the tree's head `head` on the same input.

  Raises:
    TypeError: `variables` is not a dict of collections, or `head` not an int.
    ValueError: `variables` is empty, is one collection alone, is not a
      `HeadTree`'s, or does not match `splits`; `head` is out of range.
  """
  _check_variables(variables)
  splits = _split_pairs(splits)
  path = head_path(head, splits)
  _check_variables_match(variables, splits)
  out = {}
  for collection, tree in variables.items():
    merged = dict(tree.get('trunk', {}))
    for level in range(1, len(splits) + 1):
      prefix = path[:level]
      # A level may hold nothing of a collection (e.g. no BatchNorm there).
      merged.update(jax.tree.map(lambda a, p=prefix: a[p],
                                 tree.get(f'level_{level}', {})))
    if merged:  # a network without BatchNorm has no `batch_stats` at all
      out[collection] = merged
  return out


def _check_variables(variables: Any) -> None:
  """`variables` must be a non-empty dict of collections of a `HeadTree`."""
  expected = ("the tree's variables, e.g. {'params': ..., 'batch_stats': ...} "
              'as HeadTree.init returns them')
  if not isinstance(variables, Mapping):
    raise TypeError(f'variables has type {type(variables).__name__}; '
                    f'expected {expected}.')
  if not variables:
    raise ValueError(f'variables={variables!r} is empty; expected {expected}.')
  modules = sorted(k for k in variables
                   if k == 'trunk' or str(k).startswith('level_'))
  if modules:  # a common slip: `variables['params']` passed alone
    raise ValueError(
        f'variables has the keys {", ".join(modules)} of one collection; '
        f"expected {expected}: pass {{'params': params}} (and the other "
        'collections), not params alone.')
  for collection, tree in variables.items():
    if not isinstance(tree, Mapping):
      raise TypeError(
          f'variables[{collection!r}] has type {type(tree).__name__}; '
          f'expected a dict of the tree\'s modules (trunk, level_1, ...).')
    other = sorted(str(k) for k in tree
                   if k != 'trunk' and not str(k).startswith('level_'))
    if other:
      raise ValueError(
          f'variables[{collection!r}] has keys {", ".join(other)}, not those '
          "of a HeadTree (trunk, level_1, ...); a StageNetwork's variables "
          'need no export.')


def _check_variables_match(variables, splits):
  """ValueError unless `variables` are those of a tree with `splits`.

  Level `l`'s variables are stacked over the branches of levels 1..l, so their
  leading dimensions must be those branch counts.
  """
  branches = tuple(b for _, b in splits)
  want = {f'level_{l}' for l in range(1, len(splits) + 1)}
  for collection, tree in variables.items():
    if not tree:  # e.g. no BatchNorm statistics
      continue
    levels = {k for k in tree if k.startswith('level_')}
    if levels != want:
      raise ValueError(
          f'splits={splits!r} has {len(splits)} split level(s) but the '
          f'{collection!r} variables have {len(levels)} '
          f'({", ".join(sorted(levels)) or "none"}): pass the splits the tree '
          'was built with.')
    for l in range(1, len(splits) + 1):
      for leaf in jax.tree.leaves(tree[f'level_{l}']):
        if tuple(leaf.shape[:l]) != branches[:l]:
          raise ValueError(
              f'splits={splits!r}: {collection!r} level_{l} variables are '
              f'stacked as {tuple(leaf.shape[:l])}, not over the branches '
              f'{branches[:l]}: pass the splits the tree was built with.')
