"""ImageNet ResNet-50, 4 heads hierarchical (Table 4): an alias of
configs/imagenet.py:h4_hierarchical, whose docstring has the paper's numbers and the cost.

  python -m collab_jax.main --config=configs/imagenet_resnet50_h4.py --workdir=runs/imagenet_resnet50_h4
"""

from collab_jax.trainer import recipes


def get_config():
  return recipes.imagenet('h4_hierarchical')
