"""A small Vision Transformer on Fashion-MNIST: single vs collaborative heads.

`vit_tiny` (collab_jax/models/vit.py): 28x28 images in 4x4 patches (49
tokens), width 64, 6 pre-LayerNorm blocks in 3 stages of 2, mean-pooled
classifier, 0.30M parameters. The argument after ':' names a training graph
of `collab_jax.paper.GRAPHS` with the split points of 3-stage networks
(default h4_hierarchical = splits after block groups 1 and 2).

  python -m collab_jax.main --config=configs/fmnist_vit.py:single --workdir=runs/vit_single
  python -m collab_jax.main --config=configs/fmnist_vit.py:h4_hierarchical --workdir=runs/vit_h4

Recipe: the trainer's SGD (momentum 0.9, coupled L2 1e-4 on kernels), batch
128, lr 0.1 with 1 warm-up epoch then cosine, 10 epochs of the 60k training
images with the default pad-and-crop + flip augmentation; T = 2, beta = 0.5.
Not tuned: ViTs are usually trained with AdamW, which the trainer does not
offer. Expected runtime: not measured for the full 10 epochs. The pilot in
experiments/README.md (6 epochs of a 5k subset) took 874 s (single) and
1223 s (4 heads) on 2 CPU cores shared with other jobs (27-55 images/s for
the single network); the 4-head tree compiles to 2.33x the single FLOPs.
"""

import ml_collections

from collab_jax import paper
from collab_jax.trainer import recipes

ARGUMENTS = tuple(paper.GRAPHS)  # every argument (tests/test_configs.py builds each)


def get_config(graph='h4_hierarchical'):
  c = recipes.base_config()
  c.model.name = 'vit_tiny'
  c.model.kwargs = ml_collections.ConfigDict()
  c.warmup_epochs = 1.0
  c.num_epochs = 10.0
  c.label_smoothing = 0.05  # used by the label_smoothing graph, as in the study
  return recipes.apply_graph(c, graph)
