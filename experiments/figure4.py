"""Figure 4 analogue: per-layer weight distributions, single vs hierarchical.

The paper (Fig. 4) shows that a ResNet-50 trained alone has a large spike of
near-zero ("dead") weights in its bottom layers, and one trained with
hierarchical ILR sharing far fewer. Here: the exported head 1 of the
Fashion-MNIST study's runs (`<runs>/fmnist_table1/<graph>/seed_<k>/export/head_1`),
which is the plain target network, so both are compared layer by layer.

The layer statistics are computed once from the exports into
experiments/results/fmnist_figure4.json (near-zero fraction per layer and
run, and seed 0's weight histograms); the table (fmnist_figure4.md) and the
plot (fmnist_figure4.png) are rebuilt from that JSON alone. "Near zero" =
|w| < 1 % of the largest |w| of that layer in that run.

  python experiments/figure4.py                            # table and plot from the JSON
  python experiments/figure4.py --runs=experiments/runs    # the JSON from the exports first
"""

import argparse
import glob
import io
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, 'results')
SWEEP = 'fmnist_table1'
GRAPHS = {'single instance': 'single_instance',
          '4 heads, hierarchical ILR sharing': '4_heads_hierarchical_ilr_sharing'}
THRESHOLD = 0.01
BINS = 80


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


def _short(x):
  return float(f'{x:.6g}')  # a plot needs no more digits


def layer_stats(runs_dir):
  """The statistics of the exports under `runs_dir` (a JSON-ready dict)."""
  stats = {'threshold': f'|w| < {THRESHOLD} * max|w| of the layer', 'graphs': {}}
  for label, slug in GRAPHS.items():
    exports = sorted(glob.glob(os.path.join(
        glob.escape(runs_dir), SWEEP, slug, 'seed_*', 'export', 'head_1')))
    if not exports:
      raise SystemExit(f'error: no exported head 1 under {runs_dir}/{SWEEP}/{slug}; '
                       'run `python experiments/sweep.py --sweep=fmnist_table1` first.')
    runs = [conv_kernels(e) for e in exports]
    layers = stats.setdefault('layers', list(runs[0]))
    fractions = np.array([[np.mean(np.abs(r[l]) < THRESHOLD * np.abs(r[l]).max())
                           for l in layers] for r in runs])
    histograms = []
    for layer in layers:  # the first run's (seed 0's) weights, as the figure shows
      density, edges = np.histogram(runs[0][layer].ravel(), bins=BINS, density=True)
      histograms.append({'edges': [_short(e) for e in edges],
                         'density': [_short(d) for d in density]})
    stats['graphs'][label] = {
        'runs': len(runs),
        'run_ids': [os.path.relpath(os.path.dirname(os.path.dirname(e)), runs_dir)
                    for e in exports],
        'near_zero_fraction': fractions.mean(0).tolist(),
        'near_zero_fraction_per_run': fractions.tolist(),
        'histograms': histograms}
  return stats


def to_markdown(stats):
  graphs = stats['graphs']
  lines = ['# Figure 4 analogue: near-zero weights per layer (head 1, exported)', '',
           f'Fraction of weights with {stats["threshold"]}, mean over runs.', '',
           '| layer | ' + ' | '.join(f'{g} (n={v["runs"]})' for g, v in graphs.items())
           + ' |', '|---|' + '---|' * len(graphs)]
  for i, layer in enumerate(stats['layers']):
    lines.append(f'| {layer} | ' + ' | '.join(
        f'{100 * v["near_zero_fraction"][i]:.2f} %' for v in graphs.values()) + ' |')
  return '\n'.join(lines) + '\n'


def plot(stats):
  """The PNG (bytes) of every layer's weight histogram, one line per graph."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  layers = stats['layers']
  cols = 4
  rows = int(np.ceil(len(layers) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
  try:
    for i, (ax, layer) in enumerate(zip(axes.flat, layers)):
      for label, graph in stats['graphs'].items():
        h = graph['histograms'][i]
        ax.stairs(h['density'], h['edges'], label=label)
      ax.set_title(layer.replace('stage_', 's').replace('block_', 'b'), fontsize=7)
      ax.set_yscale('log')
      ax.tick_params(labelsize=6)
    for ax in axes.flat[len(layers):]:
      ax.axis('off')
    axes.flat[0].legend(fontsize=6)
    fig.suptitle('Conv weight distributions of head 1 (seed 0): single vs 4 heads '
                 'hierarchical', fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format='png')
    return buffer.getvalue()
  finally:
    plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--runs', default=None,
                      help='recompute the statistics from the exports under this root')
  parser.add_argument('--out', default=OUT, help='where the JSON, table and plot live')
  args = parser.parse_args(argv)
  path = os.path.join(args.out, 'fmnist_figure4.json')
  if args.runs is not None:
    stats = layer_stats(args.runs)
    os.makedirs(args.out, exist_ok=True)
    with open(path, 'w') as f:
      json.dump(stats, f, indent=1)
      f.write('\n')
  elif not os.path.exists(path):
    sys.exit(f'error: {path} does not exist; compute it with --runs=<runs root>')
  with open(path) as f:
    stats = json.load(f)
  markdown = to_markdown(stats)
  with open(os.path.join(args.out, 'fmnist_figure4.md'), 'w') as f:
    f.write(markdown)
  with open(os.path.join(args.out, 'fmnist_figure4.png'), 'wb') as f:
    f.write(plot(stats))
  print(markdown, end='')


if __name__ == '__main__':
  main()
