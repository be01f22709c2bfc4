"""DenseNet-40-12 as 3 stages (Huang et al. 2017, CIFAR variant, no bottleneck).

Depth 40 = 3 dense blocks of 12 layers (BN-ReLU-3x3 conv, growth rate 12) plus
the first conv (16 channels), two transitions and the classifier. Transitions
(BN-ReLU-1x1 conv keeping the channels-2x2 average pool) sit at the *start* of
the stage that follows them:

  stage 0 = first conv + dense block 1
  stage 1 = transition 1 + dense block 2
  stage 2 = transition 2 + dense block 3 + BN-ReLU + classifier

so "split after block 1" (split index 1) gives every branch its own transition
layer, and the shared part ends exactly at the output of dense block 1 (the
ILR named by the paper). Reimplementations that keep the transition in the
shared trunk differ only by one 1x1 conv per split. No dropout: Huang et al.
use dropout only without data augmentation.
"""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from collab_jax.models import layers


class DenseStage(nn.Module):
  num_layers: int
  growth_rate: int
  stem_features: Optional[int] = None
  transition: bool = False
  num_classes: Optional[int] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    if self.stem_features:
      x = layers.conv(self.stem_features, 3, 1, self.dtype, name='stem_conv')(x)
    if self.transition:
      y = nn.relu(layers.batch_norm(train, self.dtype, name='trans_bn')(x))
      y = layers.conv(x.shape[-1], 1, 1, self.dtype, name='trans_conv')(y)
      x = nn.avg_pool(y, (2, 2), strides=(2, 2))
    for i in range(self.num_layers):
      y = nn.relu(layers.batch_norm(train, self.dtype, name=f'bn_{i}')(x))
      y = layers.conv(self.growth_rate, 3, 1, self.dtype, name=f'conv_{i}')(y)
      x = jnp.concatenate([x, y], axis=-1)
    if self.num_classes is not None:
      x = nn.relu(layers.batch_norm(train, self.dtype, name='final_bn')(x))
      x = layers.classifier(x, self.num_classes, self.dtype)
    return x


def densenet(depth, num_classes, *, growth_rate=12, dtype=jnp.float32):
  """Stage factories of a CIFAR DenseNet (no bottleneck, no compression)."""
  if depth < 7 or (depth - 4) % 3:
    raise ValueError(f'DenseNet depth {depth} is not 3n + 4 (e.g. 40, 100).')
  n = (depth - 4) // 3
  common = dict(num_layers=n, growth_rate=growth_rate, dtype=dtype)
  return (
      layers.partial_stage(DenseStage, stem_features=16, **common),
      layers.partial_stage(DenseStage, transition=True, **common),
      layers.partial_stage(DenseStage, transition=True,
                           num_classes=num_classes, **common),
  )
