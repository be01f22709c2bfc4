"""ImageNet ResNet-50, label smoothing (0.1): paper Table 4, columns
"top-1 error" / "top-5 error".
Paper: 23.34 / 6.80 % validation error.
Needs the prepared tfds `imagenet2012` (manual download; pass
--config.data_dir).

  python -m collab_jax.main --config=configs/imagenet_resnet50_label_smoothing.py --workdir=runs/imagenet_resnet50_label_smoothing

Cost: 90 epochs x 1.28M = 115M images through the training graph; on 2 CPU
cores this is out of reach; see experiments/results/bench.md.
"""

from collab_jax.trainer import recipes


def get_config():
  return recipes.imagenet('label_smoothing')
