"""CIFAR ResNet-{20, 32, 44, 56, 110} as 3 stages (He et al. 2016, Sec. 4.2).

Depth `6n + 2`: a 3x3 stem conv with 16 channels, then three stages of `n`
basic blocks with 16, 32 and 64 channels (the second and third start with
stride 2), global average pooling and a dense classifier. Shortcuts are
parameter-free identities with zero-padded channels (option A of the paper), so
ResNet-32 has 0.46M parameters as reported there.

Stages: 0 = stem + blocks of 16 channels; 1 = blocks of 32; 2 = blocks of 64 +
classifier. "Split after block 1" (paper Sec. 4.1) is split index 1.
"""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from collab_jax.models import layers


class BasicBlock(nn.Module):
  features: int
  strides: int = 1
  train: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = layers.conv(self.features, 3, self.strides, self.dtype)(x)
    y = nn.relu(layers.batch_norm(self.train, self.dtype)(y))
    y = layers.conv(self.features, 3, 1, self.dtype)(y)
    y = layers.batch_norm(self.train, self.dtype)(y)
    if x.shape != y.shape:  # option A: subsample and zero-pad the channels
      x = x[:, ::self.strides, ::self.strides, :]
      pad = self.features - x.shape[-1]
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))
    return layers.materialize(nn.relu(x + y))


class CifarResNetStage(nn.Module):
  """One stage: optional stem, `num_blocks` blocks, optional classifier."""
  features: int
  num_blocks: int
  strides: int = 1
  stem: bool = False
  num_classes: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    if self.stem:
      x = layers.conv(self.features, 3, 1, self.dtype, name='stem_conv')(x)
      x = nn.relu(layers.batch_norm(train, self.dtype, name='stem_bn')(x))
      x = layers.materialize(x)
    for i in range(self.num_blocks):
      x = BasicBlock(self.features, self.strides if i == 0 else 1, train,
                     self.dtype, name=f'block_{i}')(x)
    if self.num_classes is not None:
      x = layers.classifier(x, self.num_classes, self.dtype)
    return x


def cifar_resnet(depth, num_classes, *, width=16, dtype=jnp.float32):
  """Stage factories of a CIFAR ResNet of `depth = 6n + 2` layers."""
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(
        f'CIFAR ResNet depth {depth} is not 6n + 2 with n >= 1 '
        '(e.g. 20, 32, 44, 56, 110).')
  n = (depth - 2) // 6
  return (
      layers.partial_stage(CifarResNetStage, features=width, num_blocks=n,
                           stem=True, dtype=dtype),
      layers.partial_stage(CifarResNetStage, features=2 * width, num_blocks=n,
                           strides=2, dtype=dtype),
      layers.partial_stage(CifarResNetStage, features=4 * width, num_blocks=n,
                           strides=2, num_classes=num_classes, dtype=dtype),
  )
