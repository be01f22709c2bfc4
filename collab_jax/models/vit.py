"""A small Vision Transformer (Dosovitskiy et al. 2021) as a list of stages.

Pre-LayerNorm transformer blocks (x + MHA(LN(x)), x + MLP(LN(x)), GELU), a
learned position embedding, and a pooled classifier: a final LayerNorm, the
mean over tokens (global average pooling, as big_vision's `pool_type='gap'`,
so no class token) and a dense layer initialised at zero (big_vision's
`head_zeroinit`). The `depth` blocks are grouped into `num_stages` stages of
equal size, so split points fall on block-group boundaries:

  stage 0 = patch embedding (a `patch x patch` conv, stride `patch`) +
            position embedding + the first group of blocks
  stage i = the next group of blocks (tokens `[B, N, D]` in and out)
  stage K-1 = the last group + LayerNorm + mean over tokens + classifier

With 3 stages the paper's CIFAR split points carry over: "split after
block 1" = split index 1, hierarchical = `((1, 2), (2, 2))`; index 0 gives
every instance its own patch embedding.

No dropout or stochastic depth: the stage contract gives a stage only
`train`, and the trainer passes no dropout RNG (a ViT this small on
Fashion-MNIST is regularised enough by augmentation and weight decay). No
BatchNorm either, so the tree has no `batch_stats` collection.
"""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from collab_jax.models import layers

# Transformer initialisation of the Flax / big_vision ViT.
_dense_init = nn.initializers.xavier_uniform()
_bias_init = nn.initializers.normal(stddev=1e-6)


def _dense(features, dtype, name=None, kernel_init=_dense_init,
           bias_init=_bias_init):
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=kernel_init, bias_init=bias_init, name=name)


def _layer_norm(dtype, name=None):
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32,
                      name=name)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: self-attention, then an MLP, both residual."""
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = _layer_norm(self.dtype, 'ln_attention')(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=_dense_init, deterministic=True, name='attention')(y, y)
    x = x + y
    y = _layer_norm(self.dtype, 'ln_mlp')(x)
    y = nn.gelu(_dense(self.mlp_dim, self.dtype, 'mlp_in')(y))
    y = _dense(x.shape[-1], self.dtype, 'mlp_out')(y)
    return layers.materialize(x + y)  # a stored residual, as in the ResNets


class ViTStage(nn.Module):
  """Optional patch embedding, `num_blocks` blocks, optional classifier."""
  hidden: int
  num_blocks: int
  num_heads: int
  mlp_dim: int
  patch: Optional[int] = None  # set on the first stage: embed patches
  num_classes: Optional[int] = None  # set on the last stage: classify
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no dropout, no BatchNorm: train and eval are the same function
    x = x.astype(self.dtype)
    if self.patch:
      p = self.patch
      x = nn.Conv(self.hidden, (p, p), strides=(p, p), padding='VALID',
                  dtype=self.dtype, param_dtype=jnp.float32,
                  name='patch_embedding')(x)
      x = x.reshape(x.shape[0], -1, self.hidden)
      pos = self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                       (1,) + x.shape[1:], jnp.float32)
      x = x + pos.astype(self.dtype)
    for i in range(self.num_blocks):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.dtype,
                       name=f'block_{i}')(x)
    if self.num_classes is not None:
      x = _layer_norm(self.dtype, 'ln_final')(x)
      x = jnp.mean(x, axis=1)
      x = _dense(self.num_classes, self.dtype, 'classifier',
                 kernel_init=nn.initializers.zeros,
                 bias_init=nn.initializers.zeros)(x)
      x = x.astype(jnp.float32)
    return x


def vit(num_classes, *, patch=4, hidden=64, depth=6, num_heads=4, mlp_dim=256,
        num_stages=3, dtype=jnp.float32):
  """Stage factories of a ViT with `depth` blocks in `num_stages` equal groups."""
  if num_stages < 1 or depth % num_stages:
    raise ValueError(
        f'ViT depth {depth} does not split into {num_stages} equal stages; '
        'choose a depth that is a multiple of num_stages.')
  if hidden % num_heads:
    raise ValueError(
        f'ViT hidden size {hidden} is not a multiple of num_heads={num_heads}.')
  per_stage = depth // num_stages
  common = dict(hidden=hidden, num_blocks=per_stage, num_heads=num_heads,
                mlp_dim=mlp_dim, dtype=dtype)
  return tuple(
      layers.partial_stage(
          ViTStage, patch=patch if i == 0 else None,
          num_classes=num_classes if i == num_stages - 1 else None, **common)
      for i in range(num_stages))
