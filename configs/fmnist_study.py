"""Fashion-MNIST analogue of the paper's tables (experiments/README.md).

A narrow ResNet-8 on a fixed 5,000-image class-balanced subset of
Fashion-MNIST (test set whole), trained for a short cosine schedule; the
argument after ':' names the training graph.

  python -m collab_jax.main --config=configs/fmnist_study.py:h4_hierarchical --workdir=runs/x

Graphs: single, label_smoothing, h2_instances, h4_instances, h2_simple,
h4_simple, h4_hierarchical. Expected runtime on 2 CPU cores: see
experiments/README.md (wall time of each sweep).
"""

from collab_jax import recipes


def get_config(graph='h4_hierarchical'):
  return recipes.fashion_mnist_study(graph)
