"""The offline default: Fashion-MNIST, a ResNet-8, 4 heads with hierarchical ILR sharing.

No network needed: reads the original IDX files of Debian's
`dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist).

Command:  make run
   i.e.   python -m collab_jax.main --config=configs/default.py --workdir=runs/default

Expected (measured, see README): 7 epochs, about 7-11 minutes on 2 quiet CPU
cores (JAX 0.12), head 1 test error 9.65 % (seed 0).
"""

from collab_jax.trainer import recipes


def get_config():
  return recipes.base_config()
