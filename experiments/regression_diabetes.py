"""Collaborative regression on scikit-learn's diabetes data.

The paper names regression as future work; `collab_jax.collaborative_regression_loss`
is its loss with squared error (see its docstring). This compares, on the 442
diabetes patients (10 features, disease progression after one year):

  single     an MLP 10-64-64-1 (ReLU), plain squared error
  h2, h4     the same MLP as a `HeadTree` of 3 Dense stages with 2 or 4 heads
             sharing the first layer (splits ((1, H),), backprop rescaling),
             trained with the collaborative regression loss (beta = 0.5)

Each seed draws its own 80/20 train/test split (shared by the three graphs,
so the comparison is paired) and its own initialisation; full-batch Adam,
features and target standardised on the training part. The score is head 1's
test MSE in the target's original units (head 1 is exported as the plain MLP
and evaluated as such). Needs scikit-learn (not a collab_jax dependency):

  pip install scikit-learn
  python experiments/regression_diabetes.py --steps=50   # 5 seeds, 1-3 min on 2 shared CPU cores

Results (4 step counts, 5 seeds): experiments/README.md, "Regression".
"""

import argparse
import functools
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import collab_jax

GRAPHS = {'single': (), 'h2': ((1, 2),), 'h4': ((1, 4),)}


class Dense(nn.Module):
  """One MLP stage: a dense layer, ReLU unless it is the output."""
  features: int
  relu: bool = True

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = nn.Dense(self.features)(x)
    return nn.relu(x) if self.relu else x


STAGES = (functools.partial(Dense, 64), functools.partial(Dense, 64),
          functools.partial(Dense, 1, relu=False))


def load(seed, test_fraction=0.2):
  """A seeded train/test split, standardised with the training statistics."""
  from sklearn import datasets  # pylint: disable=import-outside-toplevel
  x, y = datasets.load_diabetes(return_X_y=True)
  order = np.random.default_rng(seed).permutation(len(y))
  n_test = int(round(test_fraction * len(y)))
  test, tr = order[:n_test], order[n_test:]
  mx, sx = x[tr].mean(0), x[tr].std(0)
  my, sy = y[tr].mean(), y[tr].std()
  f = lambda a: jnp.asarray((a - mx) / sx, jnp.float32)
  g = lambda a: jnp.asarray((a - my) / sy, jnp.float32)
  return f(x[tr]), g(y[tr]), f(x[test]), g(y[test]), sy


def run(graph, seed, *, steps, lr, beta=0.5):
  """Head 1's test MSE (original units) of one graph and seed."""
  x_tr, y_tr, x_te, y_te, sy = load(seed)
  splits = GRAPHS[graph]
  tree = collab_jax.HeadTree(STAGES, splits)
  params = tree.init(jax.random.key(seed), x_tr)['params']
  tx = optax.adam(lr)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      preds = tree.apply({'params': p}, x_tr, train=True)[..., 0]  # [H, B]
      return collab_jax.collaborative_regression_loss(preds, y_tr, beta=beta)
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for _ in range(steps):
    params, opt_state = step(params, opt_state)
  head_1 = collab_jax.export_head({'params': params}, splits, head=0)
  pred = collab_jax.StageNetwork(STAGES).apply(head_1, x_te)[:, 0]
  return float(jnp.mean((pred - y_te)**2)) * sy**2


def linear_reference(seed):
  """Least-squares linear regression's test MSE on the same split (context)."""
  x_tr, y_tr, x_te, y_te, sy = (np.asarray(a) if not np.isscalar(a) else a
                                for a in load(seed))
  design = lambda a: np.concatenate([a, np.ones((len(a), 1), a.dtype)], axis=1)
  w, *_ = np.linalg.lstsq(design(x_tr), y_tr, rcond=None)
  return float(np.mean((design(x_te) @ w - y_te)**2)) * sy**2


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seeds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=50)
  parser.add_argument('--lr', type=float, default=3e-3)
  args = parser.parse_args(argv)
  results = {g: [run(g, s, steps=args.steps, lr=args.lr)
                 for s in range(args.seeds)] for g in GRAPHS}
  print(f'diabetes, head 1 test MSE, {args.seeds} seeds, {args.steps} full-batch '
        f'Adam steps at lr {args.lr}')
  print('| graph | test MSE (mean +- std) | per seed | wins vs single |')
  print('|---|---|---|---|')
  linear = [linear_reference(s) for s in range(args.seeds)]
  print(f'| linear regression (reference) | {statistics.fmean(linear):.0f} | '
        f'{", ".join(f"{a:.0f}" for a in linear)} | - |')
  for g, v in results.items():
    wins = sum(a < b for a, b in zip(v, results['single']))
    std = statistics.stdev(v) if len(v) > 1 else 0.0
    print(f'| {g} | {statistics.fmean(v):.0f} +- {std:.0f} | '
          f'{", ".join(f"{a:.0f}" for a in v)} | '
          f'{"-" if g == "single" else f"{wins}/{len(v)}"} |')
  return results


if __name__ == '__main__':
  main()
