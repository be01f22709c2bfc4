"""CIFAR-100 ResNet-32, single instance: paper Table 2, row
"simultaneous, T = 1", column "single instance (baseline)".
Paper: 30.52 +- 0.35 % test error.
The alternating row updates the heads one after another with their own
optimizer states (Zhang et al. 2017); DML uses T = 1. Our recipe is He et
al.'s CIFAR-10 one; compare rows, not the paper's absolute numbers.
The alternating row's own baseline: 31.01 % test error.

  python -m collab_jax.main --config=configs/cifar100_resnet32_single.py --workdir=runs/cifar100_resnet32_single

Cost: 164 epochs x 50k = 8.2M images through the training graph; measured throughput per graph: experiments/results/bench.md.
"""

from collab_jax.trainer import recipes


def get_config():
  return recipes.cifar('cifar100', 'cifar_resnet32', 'single')
