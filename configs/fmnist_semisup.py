"""Semi-supervised collaborative learning on Fashion-MNIST (the paper's future work).

100 labelled images per class (the fixed 1,000-image subset of the Fashion-MNIST
study), the other 59,000 training images unlabelled; ResNet-8 width 16, no
augmentation, batch 128 (64 labelled + 64 unlabelled), 700 steps. The argument
after ':' names the row (`recipes.fashion_mnist_semisup`):

  python -m collab_jax.main --config=configs/fmnist_semisup.py:semisup_h4_hierarchical --workdir=runs/x

Rows: supervised_single, supervised_h4_hierarchical (the labelled subset alone),
semisup_h2_instances, semisup_h4_hierarchical, mean_teacher (baseline).
Expected runtime on 2 CPU cores: 3-6 minutes a run (experiments/sweep.py,
sweep fmnist_semisup, has the measured step times).
"""

from collab_jax.trainer import recipes

ARGUMENTS = recipes.SEMISUP_ROWS  # every argument (tests/test_configs.py builds each)


def get_config(row='semisup_h4_hierarchical'):
  return recipes.fashion_mnist_semisup(row)
