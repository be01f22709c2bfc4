"""CIFAR-10 ResNet-110, single instance (individual training): paper Table 1, row
"single instance (individual training)", column ResNet-110. Paper: 5.56 +- 0.16 % test error.

  python -m collab_jax.main --config=configs/cifar10_resnet110_single.py --workdir=runs/cifar10_resnet110_single

Cost: 164 epochs x 50k = 8.2M images through the training graph; measured throughput per graph: experiments/results/bench.md.
"""

from collab_jax import recipes


def get_config():
  return recipes.cifar('cifar10', 'cifar_resnet110', 'single')
