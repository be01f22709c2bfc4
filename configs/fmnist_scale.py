"""Fashion-MNIST at a larger scale: the clean-label study (experiments/README.md).

A ResNet-14 (width 16) on a fixed 10,000-image class-balanced subset of
Fashion-MNIST with standard augmentation (pad-and-crop, flip), 20 epochs with
a cosine schedule; the test set whole. The argument after ':' names the
training graph:

  python -m collab_jax.main --config=configs/fmnist_scale.py:h4_hierarchical --workdir=runs/x

Sweep: python experiments/sweep.py --sweep=fmnist_scale
Expected runtime on one core of 2 (experiments/results/fmnist_scale.md, steps
x median step time): single 605 s, 2 heads simple 887 s, 4 heads hierarchical
1063 s, 2 instances 1236 s.
"""

from collab_jax import paper
from collab_jax.trainer import recipes

ARGUMENTS = tuple(paper.GRAPHS)  # every argument (tests/test_configs.py builds each)


def get_config(graph='h4_hierarchical'):
  return recipes.fashion_mnist_scale(graph)
