"""collab_jax: collaborative learning (Song & Chai, NeurIPS 2018) in JAX/Flax.

Public API:
  backprop_rescale       identity forward, gradient times `scale` backward
  collaborative_loss     sum over heads of the paper's L_h (logits [H, B, C])
  consensus_targets      soft labels q_h of every head, [H, B, C]
  collaborative_regression_loss  the same for regression (preds [H, B(, D)])
  HeadTree               a stage-list network with a tree of heads
  StageNetwork           the plain target network (what is deployed)
  export_head            head k of a trained tree -> StageNetwork variables
  NnxHeadTree            the head tree for Flax NNX stages (same splits, same export)
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

__version__ = '0.1.0'
