"""Fashion-MNIST clean labels where the single network fits its training set.

A ResNet-14 (width 16) on a fixed 5,000-image class-balanced subset, no
augmentation, 40 epochs with a cosine schedule; the training subset is
evaluated with clean labels at every evaluation (the fit). The argument after
':' names the training graph (`collab_jax.paper.GRAPHS`):

  python -m collab_jax.main --config=configs/fmnist_fit.py:single --workdir=runs/x

Sweep: python experiments/sweep.py --sweep=fmnist_fit (experiments/README.md).
Cost on one core of a 2-core machine: see the sweep's table (run time).
"""

from collab_jax import paper
from collab_jax.trainer import recipes

ARGUMENTS = tuple(paper.GRAPHS)  # every argument (tests/test_configs.py builds each)


def get_config(graph='single'):
  return recipes.fashion_mnist_fit(graph)
