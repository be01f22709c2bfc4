"""CIFAR-10 ResNet-110, 2 instances (nothing shared): paper Table 1, row
"2 instances (nothing shared)", column ResNet-110. Paper: 5.21 +- 0.14 % test error.

  python -m collab_jax.main --config=configs/cifar10_resnet110_h2_instances.py --workdir=runs/cifar10_resnet110_h2_instances

Cost: 164 epochs x 50k = 8.2M images through the training graph; measured throughput per graph: experiments/results/bench.md.
"""

from collab_jax import recipes


def get_config():
  return recipes.cifar('cifar10', 'cifar_resnet110', 'h2_instances')
