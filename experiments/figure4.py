"""Figure 4 analogue: per-layer weight distributions, single vs hierarchical.

The paper (Fig. 4) shows that a ResNet-50 trained alone has a large spike of
near-zero ("dead") weights in its bottom layers, and one trained with
hierarchical ILR sharing far fewer. Here: the exported head 1 of the
Fashion-MNIST study runs (experiments/runs/fmnist_table1/.../export/head_1),
which is the plain target network, so both are compared layer by layer.

  python experiments/figure4.py   # after the fmnist_table1 sweep

Writes experiments/results/fmnist_figure4.png (histograms of every conv
layer's weights) and fmnist_figure4.json / .md (fraction of near-zero weights
per layer, mean over seeds). "Near zero" = |w| < 1 % of the largest |w| of that
layer in that run.
"""

import glob
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join(HERE, 'runs', 'fmnist_table1')
OUT = os.path.join(HERE, 'results')
GRAPHS = {'single instance': 'single_instance',
          '4 heads, hierarchical ILR sharing': '4_heads_hierarchical_ilr_sharing'}
THRESHOLD = 0.01


def conv_kernels(export_dir):
  """{layer path: kernel} of the convolutions of an exported head, in order."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(os.path.abspath(export_dir))
  flat = {}
  def walk(tree, path):
    for key in sorted(tree, key=_natural):
      value = tree[key]
      if isinstance(value, dict):
        walk(value, path + (key,))
      elif key == 'kernel' and np.ndim(value) == 4:
        flat['/'.join(path)] = np.asarray(value)
  walk(variables['params'], ())
  return flat


def _natural(key):
  """Network order: the stem first, then blocks by number (block_2 < block_10)."""
  parts = key.replace('_', ' ').split()
  return (not key.startswith('stem'),
          [(0, int(p), '') if p.isdigit() else (1, 0, p) for p in parts])


def main():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  per_graph = {}
  for label, slug in GRAPHS.items():
    runs = sorted(glob.glob(os.path.join(RUNS, slug, 'seed_*', 'export', 'head_1')))
    per_graph[label] = [conv_kernels(r) for r in runs]
  if not all(per_graph.values()):
    raise SystemExit('no exported heads found: run `python experiments/sweep.py '
                     '--sweep=fmnist_table1` first.')
  layers = list(next(iter(per_graph.values()))[0])
  table = {'threshold': f'|w| < {THRESHOLD} * max|w| of the layer', 'layers': layers,
           'graphs': {}}
  for label, runs in per_graph.items():
    fractions = np.array([[np.mean(np.abs(r[l]) < THRESHOLD * np.abs(r[l]).max())
                           for l in layers] for r in runs])
    table['graphs'][label] = {'runs': len(runs),
                              'near_zero_fraction': fractions.mean(0).tolist()}
  os.makedirs(OUT, exist_ok=True)
  with open(os.path.join(OUT, 'fmnist_figure4.json'), 'w') as f:
    json.dump(table, f, indent=2)
    f.write('\n')
  lines = ['# Figure 4 analogue: near-zero weights per layer (head 1, exported)', '',
           f'Fraction of weights with {table["threshold"]}, mean over runs.', '',
           '| layer | ' + ' | '.join(f'{g} (n={v["runs"]})'
                                     for g, v in table['graphs'].items()) + ' |',
           '|---|' + '---|' * len(table['graphs'])]
  for i, layer in enumerate(layers):
    lines.append(f'| {layer} | ' + ' | '.join(
        f'{100 * v["near_zero_fraction"][i]:.2f} %' for v in table['graphs'].values()) + ' |')
  with open(os.path.join(OUT, 'fmnist_figure4.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')

  cols = 4
  rows = int(np.ceil(len(layers) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
  for ax, layer in zip(axes.flat, layers):
    for label, runs in per_graph.items():
      w = runs[0][layer].ravel()
      ax.hist(w, bins=80, histtype='step', density=True, label=label)
    ax.set_title(layer.replace('stage_', 's').replace('block_', 'b'), fontsize=7)
    ax.set_yscale('log')
    ax.tick_params(labelsize=6)
  for ax in axes.flat[len(layers):]:
    ax.axis('off')
  axes.flat[0].legend(fontsize=6)
  fig.suptitle('Conv weight distributions of head 1 (seed 0): single vs 4 heads hierarchical',
               fontsize=9)
  fig.tight_layout()
  fig.savefig(os.path.join(OUT, 'fmnist_figure4.png'), dpi=110)
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
