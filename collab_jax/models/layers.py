"""Building blocks shared by the stage-list networks."""

import functools

import flax.linen as nn
import jax.numpy as jnp

# He et al. 2015 initialisation (fan-out, as in the reference ResNet code).
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def batch_norm(train, dtype, scale_init=nn.initializers.ones, name=None):
  """BatchNorm with PyTorch/TF-slim constants (momentum 0.9, eps 1e-5)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                      scale_init=scale_init, name=name)


def conv(features, kernel, strides=1, dtype=jnp.float32, name=None):
  padding = [(kernel // 2, kernel // 2)] * 2
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=padding, use_bias=False, kernel_init=conv_init,
                 dtype=dtype, param_dtype=jnp.float32, name=name)


def classifier(x, num_classes, dtype):
  """Global average pool + dense layer; logits returned in float32."""
  x = jnp.mean(x, axis=(1, 2))
  x = nn.Dense(num_classes, dtype=dtype, param_dtype=jnp.float32,
               name='classifier')(x)
  return x.astype(jnp.float32)


def partial_stage(cls, **kwargs):
  """A stage factory: `cls` with its hyper-parameters bound."""
  return functools.partial(cls, **kwargs)
