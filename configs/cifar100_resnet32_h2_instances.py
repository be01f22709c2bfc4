"""CIFAR-100 ResNet-32, simultaneous, T = 2: paper Table 2, columns
"head 1 in two instances" / "head 2 in two instances".
Paper: 26.32 +- 0.26 / 26.36 +- 0.27 % test error.
The alternating row updates the heads one after another with their own
optimizer states (Zhang et al. 2017); DML uses T = 1. Our recipe is He et
al.'s CIFAR-10 one; compare rows, not the paper's absolute numbers.

  python -m collab_jax.main --config=configs/cifar100_resnet32_h2_instances.py --workdir=runs/cifar100_resnet32_h2_instances

Cost: 164 epochs x 50k = 8.2M images through the training graph; measured throughput per graph: experiments/results/bench.md.
"""

from collab_jax.trainer import recipes


def get_config():
  return recipes.cifar('cifar100', 'cifar_resnet32', 'h2_instances')
