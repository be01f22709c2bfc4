"""CIFAR-100 ResNet-32, 4 instances: a row the paper does not report.
The alternating row updates the heads one after another with their own
optimizer states (Zhang et al. 2017); DML uses T = 1. Our recipe is He et
al.'s CIFAR-10 one; compare rows, not the paper's absolute numbers.

  python -m collab_jax.main --config=configs/cifar100_resnet32_h4_instances.py --workdir=runs/cifar100_resnet32_h4_instances

Cost: 164 epochs x 50k = 8.2M images through the training graph; measured throughput per graph: experiments/results/bench.md.
"""

from collab_jax.trainer import recipes


def get_config():
  return recipes.cifar('cifar100', 'cifar_resnet32', 'h4_instances')
