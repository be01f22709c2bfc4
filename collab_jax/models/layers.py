"""Building blocks shared by the stage-list networks."""

import contextlib
import contextvars
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

# He et al. 2015 initialisation (fan-out, as in the reference ResNet code).
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def batch_norm(train, dtype, scale_init=nn.initializers.ones, name=None):
  """BatchNorm with PyTorch/TF-slim constants (momentum 0.9, eps 1e-5)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                      scale_init=scale_init, name=name)


# What `conv` layers call instead of `lax.conv_general_dilated` (None: lax's).
_CONV_GENERAL_DILATED = contextvars.ContextVar('conv_general_dilated',
                                               default=None)


@contextlib.contextmanager
def conv_implementation(conv_general_dilated):
  """`conv` layers built (traced) inside this call `conv_general_dilated`.

  A drop-in for `lax.conv_general_dilated`, e.g.
  `onednn_conv.conv_general_dilated` (CPU only). Parameters and their names
  do not change. Used by experiments/bench.py; the trainer does not use it.
  """
  token = _CONV_GENERAL_DILATED.set(conv_general_dilated)
  try:
    yield
  finally:
    _CONV_GENERAL_DILATED.reset(token)


def conv(features, kernel, strides=1, dtype=jnp.float32, name=None):
  padding = [(kernel // 2, kernel // 2)] * 2
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=padding, use_bias=False, kernel_init=conv_init,
                 dtype=dtype, param_dtype=jnp.float32, name=name,
                 conv_general_dilated=_CONV_GENERAL_DILATED.get())


def classifier(x, num_classes, dtype):
  """Global average pool + dense layer; logits returned in float32."""
  x = jnp.mean(x, axis=(1, 2))
  x = nn.Dense(num_classes, dtype=dtype, param_dtype=jnp.float32,
               name='classifier')(x)
  return x.astype(jnp.float32)


def partial_stage(cls, **kwargs):
  """A stage factory: `cls` with its hyper-parameters bound."""
  return functools.partial(cls, **kwargs)


# Whether `materialize` emits optimisation barriers: a CPU-only choice, set
# by the trainer's step builder for the platform it compiles for.
_BARRIERS = contextvars.ContextVar('optimization_barriers', default=False)


@contextlib.contextmanager
def optimization_barriers(enabled=True):
  """`materialize` traced inside this call emits barriers (if `enabled`).

  Outside it (the default, e.g. a HeadTree in another project) `materialize`
  is the identity and XLA fuses as it chooses. The trainer traces its steps
  inside it on CPU only, where the barriers were measured to pay
  (`compiler_options('cpu')` keeps them); on GPU and TPU it does not.
  """
  token = _BARRIERS.set(bool(enabled))
  try:
    yield
  finally:
    _BARRIERS.reset(token)


def materialize(x):
  """Marks a residual-block output as a value to store, not to recompute.

  XLA treats the BatchNorm-add-ReLU chain of a residual stage as cheap
  elementwise work and fuses (duplicates) all of it into every consumer; in
  the backward pass each weight-gradient convolution transposes its input,
  and that transpose recomputed the whole chain of earlier blocks (quadratic
  in the depth; 60 % of a ResNet-32 step on XLA:CPU). An optimisation barrier
  stops the duplication. The value is exact either way (a barrier is the
  identity). XLA:CPU removes barriers before fusion unless the step is
  compiled with `compiler_options(platform)`, so without them nothing
  changes. Barriers are emitted only inside `optimization_barriers()`, which
  the trainer opens on CPU only: on GPU and TPU nothing was measured, and
  there XLA keeps barriers, which would stop its own fusion choices.
  Measured on CPU (experiments/results/bench.md).
  """
  return jax.lax.optimization_barrier(x) if _BARRIERS.get() else x


# XLA:CPU (jaxlib 0.12) runs convolutions, the weight-gradient ones among
# them, through YNNPACK on one thread; its Eigen convolutions use the
# intra-op thread pool. YNNPACK stays on for reductions (BatchNorm's, where
# it is fast). Measured in experiments/results/bench.md (options).
_CPU_YNN_FUSIONS = ('xla_cpu_experimental_ynn_fusion_type',
                    'LIBRARY_FUSION_TYPE_REDUCE')


@functools.lru_cache(maxsize=None)
def _cpu_knows(name, value):
  """Whether this jaxlib's XLA:CPU accepts the debug option `name=value`."""
  try:
    jax.jit(lambda x: x + 1, backend='cpu').lower(jnp.zeros(())).compile(
        compiler_options={name: value})
  except Exception:  # pylint: disable=broad-except
    return False
  return True


def compiler_options(platform):
  """XLA compile options for the train step on `platform`.

  For `jax.jit(..., compiler_options=...)`. On CPU: keep optimisation
  barriers through fusion (XLA's `cse_barrier_expander` pass would remove
  them, and `materialize` would do nothing), and leave convolutions to
  XLA's multi-threaded Eigen kernels rather than single-threaded YNNPACK
  (where this jaxlib has the option). Neither changes the maths: the same
  values, computed in another order (float rounding differs). Measured in
  experiments/results/bench.md.
  """
  if platform == 'cpu':
    options = {'xla_disable_hlo_passes': 'cse_barrier_expander'}
    if _cpu_knows(*_CPU_YNN_FUSIONS):
      options[_CPU_YNN_FUSIONS[0]] = _CPU_YNN_FUSIONS[1]
    return options
  return {}
