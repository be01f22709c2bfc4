"""Compile times of ImageNet ResNet-50: the initial state and the train step.

  python experiments/compile_times.py [--image_size=224] [--batch=8]

Builds `configs/imagenet.py`'s single network and 4-head tree the way the
trainer does (steps.create_train_state: one jitted program placed on the
mesh; steps.make_train_step) on one device of the default backend, and
prints the seconds spent creating the initial state (compile and run) and
compiling the train step. No data is read (a zero uint8 batch).
"""

import argparse
import time

import jax
import numpy as np

from collab_jax.data import augment
from collab_jax.data import imagenet
from collab_jax.data import streams
from collab_jax.trainer import methods
from collab_jax.trainer import parallel
from collab_jax.trainer import recipes
from collab_jax.trainer import steps


def measure(graph, image_size, batch):
  """(init seconds, train-step compile seconds) of `graph` on one device."""
  config = recipes.imagenet(graph, batch_size=batch, image_size=image_size)
  placement = parallel.data_parallel(jax.devices()[:1])
  model = steps.create_model(config, 1000, placement.platform)
  method = methods.create(config, model.num_heads)
  tx = steps.create_optimizer(config, steps.create_learning_rate_fn(config, 100),
                              method)
  t = time.perf_counter()
  state = jax.block_until_ready(steps.create_train_state(
      streams.init_key(0), model, (image_size, image_size, 3), tx,
      method.init_opt_state, sharding=placement.replicated))
  init_s = time.perf_counter() - t
  step = steps.make_train_step(
      placement, model=model, tx=tx, method=method, seed=0,
      preprocess=augment.Preprocess(imagenet.IMAGENET_MEAN, imagenet.IMAGENET_STD,
                                    augment=False))
  batch = jax.device_put(
      {'image': np.zeros((batch, image_size, image_size, 3), np.uint8),
       'label': np.zeros(batch, np.int32)}, placement.batch)
  t = time.perf_counter()
  step.lower(state, batch, {}).compile()
  return init_s, time.perf_counter() - t


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch', type=int, default=8)
  args = parser.parse_args()
  print(f'{jax.devices()[0].platform}, JAX {jax.__version__}, ResNet-50 at '
        f'{args.image_size}x{args.image_size}, batch {args.batch}')
  for graph in ('single', 'h4_hierarchical'):
    init_s, compile_s = measure(graph, args.image_size, args.batch)
    print(f'{graph}: initial state (compile + run) {init_s:.1f} s, train step '
          f'compile {compile_s:.1f} s', flush=True)


if __name__ == '__main__':
  main()
