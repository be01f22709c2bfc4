"""ImageNet ResNet-50 (He et al. 2016) as 4 stages.

  stage 0 = conv1 (7x7/2) + max pool + conv2_x
  stage 1 = conv3_x
  stage 2 = conv4_x
  stage 3 = conv5_x + global average pool + classifier

so the paper's split points are "after conv3_x" = split index 2 and "after
conv4_x" = split index 3: simple sharing `((2, 2),)`, hierarchical
`((2, 2), (3, 2))`. Bottleneck blocks stride in the 3x3 conv (the "v1.5"
variant of the Flax example and torchvision); the last BatchNorm of every block
starts at zero scale (Goyal et al. 2017).
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from collab_jax.models import layers


class Bottleneck(nn.Module):
  features: int
  strides: int = 1
  train: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = layers.conv(self.features, 1, 1, self.dtype)(x)
    y = nn.relu(layers.batch_norm(self.train, self.dtype)(y))
    y = layers.conv(self.features, 3, self.strides, self.dtype)(y)
    y = nn.relu(layers.batch_norm(self.train, self.dtype)(y))
    y = layers.conv(4 * self.features, 1, 1, self.dtype)(y)
    y = layers.batch_norm(self.train, self.dtype, nn.initializers.zeros)(y)
    if x.shape != y.shape:
      x = layers.conv(4 * self.features, 1, self.strides, self.dtype,
                      name='proj_conv')(x)
      x = layers.batch_norm(self.train, self.dtype, name='proj_bn')(x)
    return layers.materialize(nn.relu(x + y))


class ResNetStage(nn.Module):
  features: int
  num_blocks: int
  strides: int = 2
  stem_features: Optional[int] = None
  num_classes: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    if self.stem_features:
      x = nn.Conv(self.stem_features, (7, 7), (2, 2), padding=[(3, 3)] * 2,
                  use_bias=False, kernel_init=layers.conv_init,
                  dtype=self.dtype, name='conv1')(x)
      x = nn.relu(layers.batch_norm(train, self.dtype, name='bn1')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=[(1, 1)] * 2)
    for i in range(self.num_blocks):
      x = Bottleneck(self.features, self.strides if i == 0 else 1, train,
                     self.dtype, name=f'block_{i}')(x)
    if self.num_classes is not None:
      x = layers.classifier(x, self.num_classes, self.dtype)
    return x


def imagenet_resnet(stage_sizes: Sequence[int], num_classes, *, width=64,
                    dtype=jnp.float32):
  """Stage factories of a bottleneck ImageNet ResNet (ResNet-50: 3, 4, 6, 3)."""
  stages = []
  for i, blocks in enumerate(stage_sizes):
    stages.append(layers.partial_stage(
        ResNetStage, features=width * 2**i, num_blocks=blocks,
        strides=1 if i == 0 else 2,
        stem_features=width if i == 0 else None,
        num_classes=num_classes if i == len(stage_sizes) - 1 else None,
        dtype=dtype))
  return tuple(stages)
