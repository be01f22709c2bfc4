"""collab_jax: collaborative learning (Song & Chai, NeurIPS 2018) in JAX/Flax.

Public API (`__all__`; logits are `[heads, batch, classes]`, heads first):
  backprop_rescale       identity forward, gradient times `scale` backward
  collaborative_loss     sum over heads of the paper's L_h (logits [H, B, C]);
                         `per_example=True` gives the [H, B] values
  collaborative_head_losses  its per-head hard, soft and total terms
  consensus_targets      soft labels q_h of every head, [H, B, C]
  collaborative_regression_loss  the same for regression (preds [H, B(, D)])
  distillation_loss      the distillation baseline (student and teacher [B, C])
  cross_entropy          the single-network baseline ([B, C])
  smooth_labels          label smoothing of [..., C] targets
  HeadTree               a stage-list network with a tree of heads (linen)
  StageNetwork           the plain target network (what is deployed)
  export_head            head k of a trained tree -> StageNetwork variables
  NnxHeadTree            the head tree for Flax NNX stages (same splits, same export)
  num_heads              the number of heads of a topology `splits`
  validate_splits        checks a topology against a network's stage count
  get_stages             the networks (CIFAR ResNets, DenseNet, ResNet-50, ViT)
                         as stage lists

The library needs jax, flax, optax and numpy only; the trainer
(`python -m collab_jax.main`) is not imported here.
"""

from collab_jax.heads import export_head
from collab_jax.heads import HeadTree
from collab_jax.heads import num_heads
from collab_jax.heads import StageNetwork
from collab_jax.heads import validate_splits
from collab_jax.losses import collaborative_head_losses
from collab_jax.losses import collaborative_loss
from collab_jax.losses import collaborative_regression_loss
from collab_jax.losses import consensus_targets
from collab_jax.losses import cross_entropy
from collab_jax.losses import distillation_loss
from collab_jax.losses import smooth_labels
from collab_jax.models import get_stages
from collab_jax.nnx_heads import NnxHeadTree
from collab_jax.rescale import backprop_rescale

__all__ = [
    'backprop_rescale',
    'collaborative_head_losses',
    'collaborative_loss',
    'collaborative_regression_loss',
    'consensus_targets',
    'cross_entropy',
    'distillation_loss',
    'export_head',
    'get_stages',
    'HeadTree',
    'NnxHeadTree',
    'num_heads',
    'smooth_labels',
    'StageNetwork',
    'validate_splits',
]

__version__ = '0.1.0'
