"""Fashion-MNIST analogue of the paper's tables (experiments/README.md).

A ResNet-8 (width 16) on a fixed 1,000-image class-balanced subset of
Fashion-MNIST (test set whole), no augmentation, 100 epochs with a cosine
schedule, so that the single network fits its training set as in the paper;
the argument after ':' names the training graph.

  python -m collab_jax.main --config=configs/fmnist_study.py:h4_hierarchical --workdir=runs/x

Graphs: those of `collab_jax.paper.GRAPHS`, e.g. single, label_smoothing,
h2_simple. Expected runtime on 2 CPU cores (experiments/results/fmnist_table1.md,
steps x median step time): single 165 s, 2 heads simple 225 s, 4 heads
hierarchical 262 s, 2 instances 338 s, 4 instances 654 s.
"""

from collab_jax import paper
from collab_jax.trainer import recipes

ARGUMENTS = tuple(paper.GRAPHS)  # every argument (tests/test_configs.py builds each)


def get_config(graph='h4_hierarchical'):
  return recipes.fashion_mnist_study(graph)
