"""The collaborative loss (paper Sec. 3.2, eq. 2-4) and the baselines' losses.

Notation as in the paper: `H` heads, logits `z_h`, `sigma(z; T) = softmax(z / T)`.

* hard loss   `J_hard(y, z_h) = CE(y, sigma(z_h; 1))`
* soft label  `q_h = sigma(mean_{j != h} z_j; T)`: the consensus of the *other*
  heads, a target under stop-gradient (as in distillation)
* soft loss   `J_soft(q_h, z_h) = CE(q_h, sigma(z_h; T))`, times `T^2` (Hinton et
  al. 2015) so the hard/soft balance does not move with `T`
* head loss   `L_h = beta * J_hard + (1 - beta) * T^2 * J_soft`
* total       `L = sum_h mean_batch L_h` (weight decay is the optimizer's job)

Semi-supervised (the paper's future work; `labeled` argument): an unlabelled
example has no hard loss and keeps only its consensus term, weighted by
`unlabeled_weight` instead of `1 - beta`; see `collaborative_head_losses`.

Layout: logits are `[heads, batch, classes]`, heads first. Logits given
batch-first are reported when the labels' length gives them away (it equals
`logits.shape[0]` but not `logits.shape[1]`); with as many heads as examples
the two layouts have the same shape and nothing can tell them apart.

`per_example=True` (every loss here) returns the values before the batch mean,
as `optax.losses` does; see `collaborative_head_losses` for how masks and the
semi-supervised normalisation enter them.

Arguments are checked where that costs nothing: shapes and dtypes always (they
are static under `jit`), values when they are concrete. Traced values (a
hyper-parameter schedule, labels inside `jit`) pass through unchecked. Every
mistake is one `ValueError` (a wrong value or shape) or `TypeError` (a wrong
type) line that names the argument, what it got and what it expects.

All reductions run in float32 whatever the logits' dtype, and every
cross-entropy is `optax.softmax_cross_entropy` (a `log_softmax`, never
`log(softmax)`), so bfloat16 logits and saturated heads stay finite.
"""

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

_LAYOUT = '[heads, batch, classes]'


# ----------------------------------------------------------------------------
# Argument checks.


def _is_concrete(x: Any) -> bool:
  """Whether `x`'s values can be read here and now.

  Not for a tracer (under `jit`, `grad`, `vmap`), nor for a global array whose
  shards live on other hosts (reading it would need every process).
  """
  if isinstance(x, jax.core.Tracer):
    return False
  return bool(getattr(x, 'is_fully_addressable', True))


def _is_bool(value: Any) -> bool:
  dtype = getattr(value, 'dtype', None)
  return isinstance(value, bool) or (dtype is not None and dtype == np.bool_)


def _check_number(name: str, value: Any, ok: Callable[[float], bool],
                  bad: str, expected: str) -> None:
  """Checks a scalar hyper-parameter's type and shape; its value if concrete.

  Args:
    name: the argument's name as the caller wrote it.
    value: what the caller passed.
    ok: whether a (concrete) value is allowed.
    bad: what is wrong when `ok` fails, e.g. 'is outside (0, 1]'.
    expected: the allowed values, e.g. 'a number in (0, 1], e.g. 0.5'.
  """
  if _is_bool(value):
    # A bool is an int to Python: True would silently mean 1.
    shown = f'={value}' if isinstance(value, bool) else ' has dtype bool'
    raise TypeError(f'{name}{shown} is a bool; expected {expected}.')
  if not isinstance(value, (int, float, np.number, np.ndarray, jax.Array)):
    raise TypeError(f'{name}={value!r} has type {type(value).__name__}; '
                    f'expected {expected}.')
  dtype = getattr(value, 'dtype', None)
  if dtype is not None:
    if not (jnp.issubdtype(dtype, jnp.integer)
            or jnp.issubdtype(dtype, jnp.floating)):
      raise TypeError(f'{name} has dtype {dtype}; expected {expected}.')
    if np.ndim(value):
      raise ValueError(
          f'{name} has shape {np.shape(value)}; expected a scalar (a number or '
          f'a 0-d array): {expected}.')
  if not _is_concrete(value):
    return
  number = float(value)
  if not ok(number):
    shown = value if isinstance(value, (int, float)) else f'{number:.6g}'
    raise ValueError(f'{name}={shown} {bad}.')


def _check_beta(beta: Any) -> None:
  _check_number('beta', beta, lambda v: 0.0 < v <= 1.0,
                'is outside (0, 1]; the paper uses 0.5',
                'a number in (0, 1] (the paper uses 0.5)')


def _check_temperature(temperature: Any) -> None:
  _check_number('temperature', temperature, lambda v: 0.0 < v < math.inf,
                'must be > 0 and finite; the paper uses 2',
                'a number > 0 (the paper uses 2)')


def _check_flag(name: str, value: Any) -> None:
  """A Python bool: it chooses the computation, so it cannot be traced."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f'{name} is traced; it chooses what is computed, so it must be a '
        f"Python bool: mark it static, e.g. jax.jit(fn, static_argnames="
        f"'{name}').")
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f'{name}={value!r} has type {type(value).__name__}; '
                    'expected True or False.')


def _is_zero(value: Any) -> bool:
  """A concrete 0 (so the operation can be skipped); False when traced."""
  return _is_concrete(value) and float(value) == 0.0


def _as_array(name: str, value: Any, expected: str) -> Array:
  """`value` as a jax array; TypeError naming `name` if it is not numeric."""
  if isinstance(value, jax.Array):  # also a tracer: no conversion, no copy
    array = value
  else:
    try:
      array = jnp.asarray(value)
    except (TypeError, ValueError):
      raise TypeError(f'{name} of type {type(value).__name__} is not a numeric '
                      f'array; expected {expected}.') from None
  if not (jnp.issubdtype(array.dtype, jnp.integer)
          or jnp.issubdtype(array.dtype, jnp.floating)
          or array.dtype == np.bool_):
    raise TypeError(f'{name} has dtype {array.dtype}; expected {expected}.')
  return array


def _check_nonempty(name: str, shape: tuple[int, ...],
                    axes: tuple[str, ...]) -> None:
  for axis, size in zip(axes, shape):
    if size == 0:
      hint = ('the loss is a mean over the batch: skip empty batches'
              if axis == 'batch' else 'at least one is needed')
      raise ValueError(
          f'{name} has shape {shape} [{", ".join(axes)}] with an empty {axis} '
          f'axis; {hint}.')


def _check_logits(logits: Any, name: str = 'logits') -> Array:
  """`logits` as a non-empty `[heads, batch, classes]` float or int array."""
  logits = _as_array(name, logits, f'{_LAYOUT} logits')
  if logits.dtype == np.bool_:
    raise TypeError(f'{name} has dtype bool; expected {_LAYOUT} logits.')
  if logits.ndim != 3:
    raise ValueError(
        f'{name} must be {_LAYOUT}, got shape {logits.shape}; for a single '
        f"network's [batch, classes] logits use {name}[None].")
  _check_nonempty(name, logits.shape, ('heads', 'batch', 'classes'))
  return logits


def _check_batch_first(name: str, size: int, logits_name: str,
                       shape: tuple[int, ...], layout: str) -> None:
  """ValueError unless `size` (of `name`) is the batch size `shape[1]`.

  A size equal to `shape[0]` instead means the array is batch-first; that is
  said, with the fix. (With `shape[0] == shape[1]` nothing can be detected.)
  """
  if size == shape[1]:
    return
  message = (f'{name} have batch size {size} but {logits_name} of shape '
             f'{shape} have batch size {shape[1]} (axis 1 of {layout})')
  if size == shape[0]:
    raise ValueError(
        f'{message}: {logits_name} look batch-first; the layout is {layout}, '
        f'e.g. jnp.swapaxes({logits_name}, 0, 1).')
  raise ValueError(f'{message}.')


def _check_example_weights(mask: Any, batch: int) -> Array | None:
  """`mask` as a `[B]` array of finite weights >= 0 (values if concrete)."""
  if mask is None:
    return None
  expected = f'[batch] = ({batch},) example weights (1 = real, 0 = padding)'
  mask = _as_array('mask', mask, expected)
  if mask.shape != (batch,):
    raise ValueError(f'mask has shape {mask.shape}; expected {expected}.')
  if _is_concrete(mask):
    values = np.asarray(mask, np.float64)
    if not np.all(np.isfinite(values)) or np.any(values < 0):
      bad = values[~(np.isfinite(values) & (values >= 0))][0]
      raise ValueError(f'mask holds {bad:g}; expected {expected}, finite and '
                       '>= 0.')
  return mask


def _check_labeled(labeled: Any, batch: int) -> Array | None:
  """`labeled` as a `[B]` 0/1 array (values checked if concrete)."""
  if labeled is None:
    return None
  expected = (f'[batch] = ({batch},) bools or 0/1 numbers (1 = labelled), or '
              'None for a fully labelled batch')
  labeled = _as_array('labeled', labeled, expected)
  if labeled.shape != (batch,):
    raise ValueError(f'labeled has shape {labeled.shape}; expected '
                     f'{expected}.')
  if _is_concrete(labeled):
    values = np.asarray(labeled, np.float64)
    odd = values[(values != 0) & (values != 1)]
    if odd.size:
      raise ValueError(f'labeled holds {odd[0]:g}; expected {expected}.')
  return labeled


def _check_labels(labels, num_classes, labeled=None):
  """Concrete labels only: ids in [0, C), soft labels that are distributions.

  Under `jit` (traced labels) nothing is checked: an id outside [0, C) becomes
  an all-zero one-hot row (`jax.nn.one_hot`), so that example adds nothing to
  the hard loss, and soft labels are used as given. With a `labeled` mask only
  the labelled rows are checked (unlabelled ones may hold any placeholder,
  e.g. -1), and nothing when the mask is traced.
  """
  if not _is_concrete(labels):
    return
  values = np.asarray(labels)
  if labeled is not None:
    keep = np.asarray(labeled).astype(bool) if _is_concrete(labeled) else None
    if keep is None or keep.shape != values.shape[:1]:
      return  # traced, or the wrong shape (reported by the caller)
    values = values[keep]
  if values.size == 0:
    return
  if values.ndim == 1:
    low, high = values.min(), values.max()
    if low < 0 or high >= num_classes:
      bad = low if low < 0 else high
      raise ValueError(f'label id {bad} is outside [0, {num_classes}): labels '
                       f'must be class ids of the {num_classes} logits.')
    return
  values = values.astype(np.float32)
  # A few float32 (or bfloat16) roundings per row are fine.
  tol = max(1e-3, 8 * float(jnp.finfo(labels.dtype).eps)
            if jnp.issubdtype(labels.dtype, jnp.floating) else 1e-3)
  if not np.all(np.isfinite(values)) or values.min() < 0:
    raise ValueError('soft labels must be finite and non-negative (a '
                     'probability distribution per row).')
  sums = values.sum(-1)
  worst = int(np.argmax(np.abs(sums - 1.0)))
  if abs(sums[worst] - 1.0) > tol:
    raise ValueError(f'soft labels must sum to 1 per row; row {worst} sums to '
                     f'{sums[worst]:.6g}.')


def _labels_array(labels: Any) -> Array:
  return _as_array('labels', labels,
                   '[batch] integer class ids or [batch, classes] targets')


# ----------------------------------------------------------------------------
# The losses.


def _soft_cross_entropy(targets, logits):
  """Per-example `CE(targets, softmax(logits))` in float32, `[..., C] -> [...]`."""
  return optax.softmax_cross_entropy(logits.astype(jnp.float32),
                                     targets.astype(jnp.float32))


def _batch_weights(mask, batch):
  """Per-example weights of a batch mean: uniform, or over the masked examples."""
  if mask is None:
    return jnp.full((batch,), 1.0 / batch, jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)
  return mask / jnp.maximum(jnp.sum(mask), 1.0)


def _example_weights(mask, batch):
  """`mask` as float32 `[B]` (ones without a mask): the per-example factors."""
  if mask is None:
    return jnp.ones((batch,), jnp.float32)
  return jnp.asarray(mask, jnp.float32)


def label_targets(labels: ArrayLike, num_classes: int,
                  labeled: ArrayLike | None = None) -> Array:
  """Integer ids `[B]` -> one-hot float32 `[B, C]`; `[B, C]` passes through.

  Concrete labels are checked (`_check_labels`): ids outside [0, C) and soft
  labels that are not distributions raise ValueError. Traced labels (inside
  `jit`) cannot be checked: an out-of-range id then counts as no label.

  Args:
    labels: `[B]` integer class ids, or `[B, C]` one-hot / soft labels (any
      float dtype).
    num_classes: `C`.
    labeled: optional `[B]` mask; only labelled rows are checked.

  Returns:
    float32 `[B, C]` targets.
  """
  labels = _labels_array(labels)
  if labels.ndim == 1:
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(
          f'labels of shape {labels.shape} must be integer class ids, got '
          f'dtype {labels.dtype}; pass soft labels as [batch, classes].')
    _check_labels(labels, num_classes, labeled)
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if labels.ndim == 2:
    if labels.shape[-1] != num_classes:
      raise ValueError(
          f'labels have {labels.shape[-1]} classes but logits have '
          f'{num_classes}; they must agree.')
    _check_labels(labels, num_classes, labeled)
    return labels.astype(jnp.float32)
  hint = '; for one example use labels[None]' if labels.ndim == 0 else ''
  raise ValueError(
      f'labels must be [batch] integer ids or [batch, classes], got shape '
      f'{labels.shape}{hint}.')


def smooth_labels(targets: ArrayLike, epsilon: float | ArrayLike) -> Array:
  """Label smoothing (Szegedy et al. 2016): `(1 - eps) * y + eps / C`.

  Args:
    targets: `[..., C]` targets, e.g. one-hot float32 labels.
    epsilon: the smoothing, in [0, 1) (checked when concrete).

  Returns:
    The smoothed targets, same shape.
  """
  _check_number('label smoothing epsilon', epsilon, lambda v: 0.0 <= v < 1.0,
                'must be in [0, 1)', 'a number in [0, 1), e.g. 0.1')
  return optax.smooth_labels(jnp.asarray(targets), epsilon)


def consensus_targets(logits: ArrayLike, temperature: float | ArrayLike, *,
                      stop_gradient: bool = True) -> Array:
  """Soft labels `q_h = softmax(mean_{j != h} z_j / T)` for every head.

  Args:
    logits: `[H, B, C]` (heads first) with `H >= 2`, any float dtype.
    temperature: the softmax temperature `T > 0`, a scalar.
    stop_gradient: the paper treats `q_h` as a fixed target (default). `False`
      lets gradients flow into the other heads through their consensus.

  Returns:
    `[H, B, C]` float32 probabilities; row `h` excludes head `h` itself.
  """
  logits = _check_logits(logits)
  _check_temperature(temperature)
  _check_flag('stop_gradient', stop_gradient)
  num_heads = logits.shape[0]
  if num_heads < 2:
    raise ValueError(
        'consensus_targets needs at least 2 heads: with H = 1 there is no '
        'consensus (collaborative_loss then reduces to cross-entropy).')
  z = logits.astype(jnp.float32)
  others = (jnp.sum(z, axis=0, keepdims=True) - z) / (num_heads - 1)
  q = jax.nn.softmax(others / temperature, axis=-1)
  return jax.lax.stop_gradient(q) if stop_gradient else q


def collaborative_head_losses(
    logits: ArrayLike, labels: ArrayLike, *,
    beta: float | ArrayLike = 0.5, temperature: float | ArrayLike = 2.0,
    label_smoothing: float | ArrayLike = 0.0, mask: ArrayLike | None = None,
    consensus_gradient: bool = False, labeled: ArrayLike | None = None,
    unlabeled_weight: float | ArrayLike = 1.0,
    per_example: bool = False) -> dict[str, Array]:
  """Per-head terms of the collaborative loss, each averaged over the batch.

  Semi-supervised batches (`labeled` given): labelled examples get the full
  `L_h`, unlabelled ones only the consensus term, weighted by
  `unlabeled_weight` (`w`). Normalisation (as in Mean Teacher, Tarvainen &
  Valpola 2017): the hard loss is averaged over the labelled examples, the
  consensus term over all examples of the batch:

      L_h = beta * mean_{i labelled} J_hard(y_i, z_hi)
            + mean_{i in batch} c_i * T^2 * J_soft(q_hi, z_hi),
      c_i = 1 - beta (labelled) or w (unlabelled),

  so the hard loss keeps the scale of supervised training whatever the
  labelled share of the batch. With every example labelled this is the
  paper's `L_h`, and the result equals that of `labeled=None` bit for bit.
  Everything is mask arithmetic (no boolean indexing), so it runs under `jit`
  with a traced `labeled` and `unlabeled_weight` (e.g. a ramp-up). A batch
  without labelled examples has a zero hard loss. With `H = 1` there is no
  consensus, so unlabelled examples contribute nothing.

  Per-example values (`per_example=True`): `[H, B]` arrays whose batch mean
  is the scalar, i.e. for each of `hard`, `soft` and `total`

      values.sum(axis=1) / max(mask.sum(), 1)   (values.mean(axis=1) without
                                                 a mask) == the [H] result

  up to float rounding. So that this holds: every value is multiplied by its
  example's `mask` weight (padding gives 0), and with `labeled` a labelled
  example's hard term is multiplied by `n / n_labelled` (real examples over
  real labelled ones), the factor between the hard loss's mean over the
  labelled examples and a mean over the batch; an unlabelled example's hard
  term is 0 and its total `w * T^2 * J_soft`. Without a mask and with every
  example labelled the values are the plain per-example `L_h,i`.

  Layout: logits must be heads first. Batch-first logits `[B, H, C]` are
  reported when the labels' length equals `logits.shape[0]` but not
  `logits.shape[1]`; with `H == B` they cannot be told apart by shape and are
  silently read as `[H, B, C]`.

  Args:
    logits: `[H, B, C]` (heads first), any float dtype; `B >= 1`.
    labels: `[B]` integer class ids, or `[B, C]` one-hot / soft labels.
    beta: weight of the hard loss, a scalar in (0, 1].
    temperature: softmax temperature `T > 0` of the soft loss, a scalar.
    label_smoothing: epsilon in [0, 1) applied to the hard targets (0 = off).
    mask: optional `[B]` float/int/bool weights >= 0 (1 = real example, 0 =
      padding); batch means are taken over the weighted examples.
    consensus_gradient: let gradients flow through the soft labels.
    labeled: optional `[B]` bool or 0/1 int/float, 1 = labelled; None = all
      labelled. The labels of unlabelled examples are ignored (e.g. -1).
    unlabeled_weight: `w >= 0`, the weight of the consensus term `T^2 *
      J_soft` of unlabelled examples (labelled ones weigh it by `1 - beta`).
    per_example: return `[H, B]` values before the batch mean (see above).

  Returns:
    dict of float32 arrays, `[H]` each (`[H, B]` with `per_example=True`):
    `hard` (J_hard, over the labelled examples), `soft` (T^2 * J_soft over
    all examples, zero when H = 1) and `total` (L_h).

  Raises:
    ValueError: a wrong shape (naming the `[heads, batch, classes]` layout),
      an empty axis, or a concrete value out of range.
    TypeError: an argument of the wrong type (e.g. `beta='0.5'`).
  """
  logits = _check_logits(logits)
  num_heads, batch, num_classes = logits.shape
  _check_beta(beta)
  _check_temperature(temperature)
  _check_number('label_smoothing', label_smoothing, lambda v: 0.0 <= v < 1.0,
                'must be in [0, 1)', 'a number in [0, 1), e.g. 0.1')
  _check_number('unlabeled_weight', unlabeled_weight,
                lambda v: 0.0 <= v < math.inf, 'must be >= 0 and finite',
                'a number >= 0, e.g. 1')
  _check_flag('consensus_gradient', consensus_gradient)
  _check_flag('per_example', per_example)
  labels = _labels_array(labels)
  if labels.ndim in (1, 2):
    _check_batch_first('labels', labels.shape[0], 'logits', logits.shape,
                       _LAYOUT)
  mask = _check_example_weights(mask, batch)
  labeled = _check_labeled(labeled, batch)
  targets = label_targets(labels, num_classes, labeled)
  if not _is_zero(label_smoothing):
    targets = smooth_labels(targets, label_smoothing)
  weights = _batch_weights(mask, batch)
  if labeled is None:
    hard_weights = weights
  else:
    labeled = jnp.asarray(labeled, jnp.float32)
    # The mean over the labelled (and real) examples; when all are labelled
    # these are exactly `weights` (same operations on the same values).
    hard_weights = _batch_weights(
        labeled if mask is None else jnp.asarray(mask, jnp.float32) * labeled,
        batch)

  hard_ce = _soft_cross_entropy(targets[None], logits)   # [H, B]
  if per_example:
    return _per_example_terms(hard_ce, logits, mask, labeled, beta,
                              temperature, consensus_gradient,
                              unlabeled_weight)
  hard = hard_ce @ hard_weights   # [H]
  if num_heads == 1:
    soft = jnp.zeros_like(hard)
    total = hard  # no consensus: plain cross-entropy, whatever beta is
  else:
    q = consensus_targets(logits, temperature,
                          stop_gradient=not consensus_gradient)
    soft_ce = _soft_cross_entropy(q, logits.astype(jnp.float32) / temperature)
    soft = temperature**2 * (soft_ce @ weights)
    if labeled is None:
      total = beta * hard + (1.0 - beta) * soft
    else:
      # The unlabelled examples' share of the batch mean `soft`; it is
      # exactly 0 when every example is labelled, so `total` is unchanged.
      soft_unl = temperature**2 * ((soft_ce * (1.0 - labeled)) @ weights)
      total = (beta * hard + (1.0 - beta) * (soft - soft_unl)
               + unlabeled_weight * soft_unl)
  return {'hard': hard, 'soft': soft, 'total': total}


def _per_example_terms(hard_ce, logits, mask, labeled, beta, temperature,
                       consensus_gradient, unlabeled_weight):
  """`[H, B]` terms whose mask-weighted batch mean is the `[H]` result."""
  num_heads, batch = hard_ce.shape
  real = _example_weights(mask, batch)
  hard = hard_ce * real
  if labeled is not None:
    count = jnp.maximum(jnp.sum(real), 1.0)
    labeled_count = jnp.maximum(jnp.sum(real * labeled), 1.0)
    # The scalar averages the hard loss over the labelled examples only.
    hard = hard * labeled * (count / labeled_count)
  if num_heads == 1:
    return {'hard': hard, 'soft': jnp.zeros_like(hard), 'total': hard}
  q = consensus_targets(logits, temperature,
                        stop_gradient=not consensus_gradient)
  soft_ce = _soft_cross_entropy(q, logits.astype(jnp.float32) / temperature)
  soft = temperature**2 * soft_ce * real
  if labeled is None:
    coef = 1.0 - beta
  else:
    coef = (1.0 - beta) * labeled + unlabeled_weight * (1.0 - labeled)
  return {'hard': hard, 'soft': soft, 'total': beta * hard + coef * soft}


def collaborative_loss(
    logits: ArrayLike, labels: ArrayLike, *,
    beta: float | ArrayLike = 0.5, temperature: float | ArrayLike = 2.0,
    label_smoothing: float | ArrayLike = 0.0, mask: ArrayLike | None = None,
    consensus_gradient: bool = False, labeled: ArrayLike | None = None,
    unlabeled_weight: float | ArrayLike = 1.0,
    per_example: bool = False) -> Array:
  """The collaborative loss `L = sum_h mean_batch L_h` (paper eq. 4).

  Args:
    logits: `[H, B, C]` logits of the `H` heads, heads first (a single
      network's `[B, C]` logits: `logits[None]`), any float dtype. Batch-first
      logits are reported when the labels' length shows it; with `H == B`
      they cannot be and give a wrong result (see
      `collaborative_head_losses`).
    labels: `[B]` integer class ids, or `[B, C]` one-hot / soft labels.
      Concrete labels are checked (ids in [0, C), soft rows non-negative and
      summing to 1: ValueError otherwise); traced ones (inside `jit`) cannot
      be, and an id outside [0, C) then adds nothing to the hard loss.
    beta: weight of the hard (label) loss, a scalar in (0, 1]; paper: 0.5.
    temperature: temperature `T > 0` of the soft (consensus) loss, a scalar;
      paper: 2.
    label_smoothing: epsilon in [0, 1) applied to the hard targets (0 = off).
    mask: optional `[B]` example weights >= 0 (1 = real example, 0 =
      padding); batch means are over the weighted examples.
    consensus_gradient: let gradients flow through the soft labels (default:
      stop-gradient, as in the paper).
    labeled: optional `[B]` mask, 1 = labelled (None: all labelled). Unlabelled
      examples get only the consensus term, times `unlabeled_weight`; the hard
      loss is averaged over the labelled examples, the consensus term over all
      (see `collaborative_head_losses`).
    unlabeled_weight: weight `>= 0` of the unlabelled examples' consensus
      term.
    per_example: return the `[H, B]` per-example `L_h,i` instead of the
      scalar; their batch mean (`sum(1) / max(sum(mask), 1)` with a mask),
      summed over heads, is the scalar. With `mask` or `labeled` the values
      carry the weights that make this hold (see
      `collaborative_head_losses`).

  Returns:
    A float32 scalar (`[H, B]` float32 with `per_example=True`). With `H = 1`
    it is the plain cross-entropy.

  Raises:
    ValueError: a wrong shape (naming the `[heads, batch, classes]` layout),
      an empty batch, or a concrete value out of range.
    TypeError: an argument of the wrong type.
  """
  terms = collaborative_head_losses(
      logits, labels, beta=beta, temperature=temperature,
      label_smoothing=label_smoothing, mask=mask,
      consensus_gradient=consensus_gradient, labeled=labeled,
      unlabeled_weight=unlabeled_weight, per_example=per_example)['total']
  return terms if per_example else jnp.sum(terms)


def _check_batch_logits(name: str, logits: Any) -> Array:
  """`logits` as a non-empty `[batch, classes]` array (one network's logits)."""
  logits = _as_array(name, logits, '[batch, classes] logits')
  if logits.ndim != 2:
    hint = (f'; for one example use {name}[None]' if logits.ndim == 1 else
            '; average an ensemble over its first axis first'
            if logits.ndim == 3 else '')
    raise ValueError(f'{name} must be [batch, classes], got shape '
                     f'{logits.shape}{hint}.')
  _check_nonempty(name, logits.shape, ('batch', 'classes'))
  return logits


def _check_labels_batch(labels: Array, batch: int, shape: tuple[int, ...],
                        name: str = 'logits') -> None:
  if labels.ndim in (1, 2) and labels.shape[0] != batch:
    raise ValueError(f'labels have batch size {labels.shape[0]} but {name} '
                     f'[batch, classes] = {shape} have {batch}.')


def distillation_loss(student_logits: ArrayLike, teacher_logits: ArrayLike,
                      labels: ArrayLike, *, beta: float | ArrayLike = 0.5,
                      temperature: float | ArrayLike = 2.0,
                      mask: ArrayLike | None = None,
                      per_example: bool = False) -> dict[str, Array]:
  """Distillation from fixed teacher logits (Hinton et al. 2015).

  `beta * CE(y, sigma(z_s)) + (1 - beta) * T^2 * CE(sigma(z_t; T), sigma(z_s; T))`
  averaged over the batch; the teacher is under stop-gradient.

  Args:
    student_logits: `[B, C]`, any float dtype; `B >= 1`.
    teacher_logits: `[B, C]`, e.g. the mean logits of a teacher ensemble.
    labels: `[B]` ids or `[B, C]` targets.
    beta, temperature: as in `collaborative_loss`.
    mask: optional `[B]` example weights >= 0.
    per_example: return `[B]` values, each times its `mask` weight, whose sum
      over `max(sum(mask), 1)` (their mean without a mask) is the scalar.

  Returns:
    dict of float32 scalars (`[B]` with `per_example=True`), as
    `collaborative_head_losses` gives per head: `hard` (CE to the labels),
    `soft` (T^2 * CE to the teacher) and `total`.
  """
  student_logits = _check_batch_logits('student_logits', student_logits)
  teacher_logits = _as_array('teacher_logits', teacher_logits,
                             '[batch, classes] logits')
  if teacher_logits.shape != student_logits.shape:
    hint = ('; average the ensemble first, e.g. teacher_logits.mean(0)'
            if teacher_logits.shape[1:] == student_logits.shape else '')
    raise ValueError(
        f'teacher_logits have shape {teacher_logits.shape} but must be '
        f'[batch, classes] = {student_logits.shape} like student_logits{hint}.')
  _check_beta(beta)
  _check_temperature(temperature)
  _check_flag('per_example', per_example)
  batch, num_classes = student_logits.shape
  labels = _labels_array(labels)
  _check_labels_batch(labels, batch, student_logits.shape, 'student_logits')
  mask = _check_example_weights(mask, batch)
  targets = label_targets(labels, num_classes)
  teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  q = jax.nn.softmax(teacher / temperature, axis=-1)
  hard_ce = _soft_cross_entropy(targets, student_logits)
  soft_ce = _soft_cross_entropy(
      q, student_logits.astype(jnp.float32) / temperature)
  if per_example:
    real = _example_weights(mask, batch)
    hard, soft = hard_ce * real, temperature**2 * soft_ce * real
  else:
    weights = _batch_weights(mask, batch)
    hard, soft = hard_ce @ weights, temperature**2 * (soft_ce @ weights)
  return {'hard': hard, 'soft': soft,
          'total': beta * hard + (1.0 - beta) * soft}


def cross_entropy(logits: ArrayLike, labels: ArrayLike, *,
                  label_smoothing: float | ArrayLike = 0.0,
                  mask: ArrayLike | None = None,
                  per_example: bool = False) -> Array:
  """Batch-mean cross-entropy of one network's `[B, C]` logits.

  Args:
    logits: `[B, C]`, any float dtype; `B >= 1`.
    labels: `[B]` integer ids or `[B, C]` targets.
    label_smoothing: epsilon in [0, 1) (0 = off).
    mask: optional `[B]` example weights >= 0.
    per_example: return the `[B]` values (each times its `mask` weight)
      instead of their mean.

  Returns:
    A float32 scalar (`[B]` with `per_example=True`).
  """
  logits = _check_batch_logits('logits', logits)
  _check_labels_batch(_labels_array(labels), logits.shape[0], logits.shape)
  loss = collaborative_loss(logits[None], labels, beta=1.0,
                            label_smoothing=label_smoothing, mask=mask,
                            per_example=per_example)
  return loss[0] if per_example else loss


def collaborative_regression_loss(preds: ArrayLike, targets: ArrayLike, *,
                                  beta: float | ArrayLike = 0.5,
                                  mask: ArrayLike | None = None,
                                  per_example: bool = False) -> Array:
  """Collaborative learning for regression (the paper's future work, Sec. 5).

  The classification loss with squared error in place of cross-entropy and
  the other heads' mean prediction in place of their softened consensus:

    `L_h = beta * |p_h - y|^2 + (1 - beta) * |p_h - sg(mean_{j != h} p_j)|^2`

  with `sg` the stop-gradient (the consensus is a target, as `q_h` is) and
  `|.|^2` summed over output dimensions. No temperature: a prediction has no
  softmax to soften. Total: `sum_h mean_batch L_h`; with `H = 1` it is the
  plain squared error, whatever `beta` is.

  Args:
    preds: `[H, B]` or `[H, B, D]` float predictions of the `H` heads (heads
      first); `B >= 1`.
    targets: `[B]` or `[B, D]`, matching `preds[0]`.
    beta: weight of the squared error to the target, a scalar in (0, 1].
    mask: optional `[B]` example weights >= 0 (1 = real example, 0 = padding).
    per_example: return the `[H, B]` values `L_h,i` (each times its `mask`
      weight) instead of the scalar; `sum(1) / max(sum(mask), 1)` (their
      mean without a mask), summed over heads, is the scalar.

  Returns:
    A float32 scalar (`[H, B]` with `per_example=True`).
  """
  layout = '[heads, batch] or [heads, batch, dims]'
  preds = _as_array('preds', preds, f'{layout} predictions')
  targets = _as_array('targets', targets, '[batch] or [batch, dims] targets')
  _check_beta(beta)
  _check_flag('per_example', per_example)
  if preds.ndim not in (2, 3):
    raise ValueError(
        f'preds must be {layout}, got shape {preds.shape}; for a single '
        'network use preds[None], for one example per head preds[:, None].')
  _check_nonempty('preds', preds.shape,
                  ('heads', 'batch', 'dims')[:preds.ndim])
  if tuple(targets.shape) != tuple(preds.shape[1:]):
    message = (f'targets have shape {targets.shape} but preds {preds.shape} '
               f'need {preds.shape[1:]} (preds[0]\'s shape)')
    if (targets.ndim == preds.ndim - 1 and targets.shape[0] == preds.shape[0]
        and targets.shape[1:] == preds.shape[2:]):
      raise ValueError(
          f'{message}: preds look batch-first; the layout is {layout}, e.g. '
          'jnp.swapaxes(preds, 0, 1).')
    raise ValueError(f'{message}.')
  p = preds.astype(jnp.float32)
  if p.ndim == 2:
    p, targets = p[..., None], targets[..., None]
  num_heads, batch = p.shape[:2]
  mask = _check_example_weights(mask, batch)
  hard = jnp.sum((p - targets.astype(jnp.float32)[None])**2, axis=-1)  # [H, B]
  if num_heads > 1:
    others = (jnp.sum(p, axis=0, keepdims=True) - p) / (num_heads - 1)
    soft = jnp.sum((p - jax.lax.stop_gradient(others))**2, axis=-1)
  if per_example:
    real = _example_weights(mask, batch)
    if num_heads == 1:
      return hard * real
    return (beta * hard + (1.0 - beta) * soft) * real
  weights = _batch_weights(mask, batch)
  hard = hard @ weights
  if num_heads == 1:
    return jnp.sum(hard)
  soft = soft @ weights
  return jnp.sum(beta * hard + (1.0 - beta) * soft)
