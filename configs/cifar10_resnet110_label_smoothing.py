"""CIFAR-10 ResNet-110, label smoothing: paper Table 1, row
"label smoothing", column ResNet-110. Paper: 5.66 +- 0.08 % test error.

  python -m collab_jax.main --config=configs/cifar10_resnet110_label_smoothing.py --workdir=runs/cifar10_resnet110_label_smoothing

Cost: 164 epochs x 50k = 8.2M images through the training graph; measured throughput per graph: experiments/results/bench.md.
"""

from collab_jax import recipes


def get_config():
  return recipes.cifar('cifar10', 'cifar_resnet110', 'label_smoothing')
